"""The evaluate stage's classifier (CAS, rejection): its passes split over ranks, bf16 through
DeepSpeed, a finished one reused only for the same data and recipe, CAS on true vs random labels."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EVAL_ARGS, val_images
from pipeline.config import compose
from pipeline.data import shards
from pipeline.data.shard_images import ShardImages, write_image_shard
from pipeline.evaluation.classifier import (NOT_RECIPE, ClassifierTask, accuracy, confidences, manifest_digest,
                                             recipe_changes, same_classifier, train_or_reuse)
from pipeline.models import load_exported
from pipeline.stages import StageContext
from pipeline.tracking import StageRun


def _score_share(rank: int, world: int, init_file: str, model_path: str, shards_dir: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, _ = load_exported(model_path)
    rows = []  # the images this rank's classifier saw
    model.register_forward_hook(lambda module, args, output: rows.append(len(args[0])))
    val = ShardImages(shards.shard_urls(Path(shards_dir), "val"), 32, "none")
    top = accuracy(model, val, 16, rank=rank, world_size=world)
    seen_by_accuracy = sum(rows)
    scores = confidences(model, val, 16, rank=rank, world_size=world)
    torch.save({"top": top, "scores": scores, "rows": (seen_by_accuracy, sum(rows) - seen_by_accuracy)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ranks_split_the_classifier_passes_and_agree_with_one_process(evaluated, tmp_path):
    """accuracy and confidences on 2 gloo ranks: each rank classifies its contiguous half of the
    images once per pass, and every rank returns what one process computes over all of them."""
    root = evaluated["root"]
    model_path = root / "digits" / "evaluate" / "classifier_real" / "model.pt"
    shards_dir = root / "digits" / "prepare" / "shards"
    torch.multiprocessing.spawn(_score_share, args=(2, str(tmp_path / "init"), str(model_path), str(shards_dir),
                                                   str(tmp_path)), nprocs=2, join=True)
    model, _ = load_exported(model_path)
    val = val_images(root)
    n, one_top, one_scores = len(val), accuracy(model, val, 16), confidences(model, val, 16)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        share = n // 2 if rank == 0 else n - n // 2
        assert out["rows"] == (share, share)
        assert out["top"] == pytest.approx(one_top, abs=1e-12)  # counts summed over the ranks
        assert out["scores"].shape == (n,)
        np.testing.assert_allclose(out["scores"], one_scores, atol=1e-5)  # all rows, in order


def test_a_finished_classifier_is_shared_only_for_the_same_data_and_recipe(evaluated, tmp_path):
    root = evaluated["root"]
    real_dir = root / "digits" / "prepare" / "shards"
    model = root / "digits" / "evaluate" / "classifier_real" / "model.pt"

    def task(*overrides, trained_on=f"real train {manifest_digest(shards.read_manifest(real_dir))}"):
        cfg = compose(["stage=evaluate", f"run_root={root}", *EVAL_ARGS, *overrides])
        return ClassifierTask(cfg, shards.shard_urls(real_dir, "train"), val_images(root, 64), 10,
                              [str(c) for c in range(10)], trained_on), int(cfg.train.max_steps)

    assert same_classifier(model, *task())
    assert same_classifier(model, *task("sample_set=hot", "eval.accept_rates=[0.2]"))  # not the training's
    # nor logging, the checks during training or the checkpoints kept (same weights: the test below)
    assert same_classifier(model, *task("train.log_every=5", "train.eval_every=50", "train.eval_samples=64",
                                        "train.keep_ckpts=3"))
    assert not same_classifier(model, *task(trained_on="real train 0123456789abcdef"))
    for other in ("seed=1", "train.lr=1e-3", "eval.classifier_augment=center", "deepspeed.micro_batch=32"):
        assert not same_classifier(model, *task(other)), other
    assert not same_classifier(model, task()[0], 151)
    assert not same_classifier(tmp_path / "model.pt", *task())


def test_settings_left_out_of_the_recipe_leave_the_weights_identical(evaluated, tmp_path):
    root = evaluated["root"]
    real_dir = root / "digits" / "prepare" / "shards"
    weights = []
    for name, extra in (("a", ["train.log_every=25", "train.eval_every=100", "train.eval_samples=512"]),
                        ("b", ["train.log_every=10", "train.eval_every=30", "train.eval_samples=64"])):
        cfg = compose(["stage=evaluate", f"run_root={tmp_path / 'runs'}", *EVAL_ARGS, "train.max_steps=60",
                       "train.ckpt_every=60", "train.keep_ckpts=" + ("1" if name == "a" else "3"), *extra])
        sdir = tmp_path / "runs" / name
        sdir.mkdir(parents=True)
        ctx = StageContext("evaluate", sdir, StageRun(cfg, "evaluate", sdir), logging.getLogger("test"))
        task = ClassifierTask(cfg, shards.shard_urls(real_dir, "train"), val_images(root, 64), 10,
                              [str(c) for c in range(10)], "real train")
        assert {k for k in task.recipe_settings if k.startswith("train.")} >= NOT_RECIPE
        weights.append(load_exported(train_or_reuse(cfg, ctx, "classifier_real", task))[0].state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_finished_classifier_of_another_recipe_is_kept_and_named_key_by_key(evaluated, tmp_path, caplog):
    root = evaluated["root"]
    real_dir = root / "digits" / "prepare" / "shards"
    finished = root / "digits" / "evaluate" / "classifier_real" / "model.pt"
    sdir = tmp_path / "evaluate"
    (sdir / "classifier_real").mkdir(parents=True)
    kept = sdir / "classifier_real" / "model.pt"
    shutil.copy(finished, kept)
    stamp = kept.stat().st_mtime_ns

    def reuse(*overrides):
        cfg = compose(["stage=evaluate", f"run_root={tmp_path}", *EVAL_ARGS, *overrides])
        task = ClassifierTask(cfg, shards.shard_urls(real_dir, "train"), val_images(root, 64), 10,
                              [str(c) for c in range(10)], f"real train {manifest_digest(shards.read_manifest(real_dir))}")
        ctx = StageContext("evaluate", sdir, StageRun(cfg, "evaluate", sdir), logging.getLogger("test"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test"):
            assert train_or_reuse(cfg, ctx, "classifier_real", task) == kept  # not trained again
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING], task

    assert reuse()[0] == []  # the recipe it was trained with: nothing to say
    warnings, task = reuse("train.lr=0.00123", "seed=7", "train.log_every=5")
    assert len(warnings) == 1, warnings
    assert "train.lr 0.002 there, 0.00123 now" in warnings[0] and "seed 0 there, 7 now" in warnings[0], warnings
    assert "train.max_steps" not in warnings[0] and "log_every" not in warnings[0] and f"move {sdir / 'classifier_real'} away" in warnings[0]
    assert kept.stat().st_mtime_ns == stamp  # finished work kept as it was
    # a model exported before the settings were recorded still says that the recipe differs
    _, meta = load_exported(kept)
    assert recipe_changes({"recipe": meta["recipe"]}, task) == [f"recipe {meta['recipe']} there, {task.recipe} now"]
    assert recipe_changes({}, task) == []  # older still: nothing recorded to compare


def test_cas_on_correct_labels_beats_cas_on_random_labels(evaluated, tmp_path):
    root = evaluated["root"]
    cfg = compose(["stage=evaluate", f"run_root={tmp_path / 'runs'}", *EVAL_ARGS, "train.max_steps=100"])
    val = val_images(root)
    train = ShardImages(shards.shard_urls(root / "digits" / "prepare" / "shards", "train"), 32, "none")
    images = np.stack([train[i].permute(1, 2, 0).numpy() for i in range(len(train))])
    rng = np.random.default_rng(0)
    scores = {}
    for name, labels in (("correct", train.labels.tolist()), ("random", rng.integers(0, 10, len(train)).tolist())):
        urls = [str(write_image_shard(tmp_path / name / "samples-000000.tar", images, labels))]
        sdir = tmp_path / "runs" / name
        sdir.mkdir(parents=True)
        ctx = StageContext("evaluate", sdir, StageRun(cfg, "evaluate", sdir), logging.getLogger("test"))
        task = ClassifierTask(cfg, urls, val.subset(list(range(64))), 10, [str(c) for c in range(10)], name)
        model, _ = load_exported(train_or_reuse(cfg, ctx, "classifier_samples", task))
        scores[name] = accuracy(model, val)[0]
    assert scores["correct"] > 0.8 and scores["random"] < 0.35, scores


def test_the_classifier_trains_in_bf16_through_deepspeed(evaluated, tmp_path):
    root = evaluated["root"]
    # half the width and batch: CPUs without AVX-512 BF16 run bf16 convolutions ~30x slower than fp32
    cfg = compose(["stage=evaluate", f"run_root={tmp_path / 'runs'}", *EVAL_ARGS, "train.max_steps=100",
                   "deepspeed.micro_batch=32", "model.classifier.widths=[16,32,64]", "deepspeed.bf16=true"])
    sdir = tmp_path / "runs" / "bf16"
    sdir.mkdir(parents=True)
    ctx = StageContext("evaluate", sdir, StageRun(cfg, "evaluate", sdir), logging.getLogger("test"))
    val = val_images(root)
    task = ClassifierTask(cfg, shards.shard_urls(root / "digits" / "prepare" / "shards", "train"),
                          val.subset(list(range(64))), 10, [str(c) for c in range(10)], "real train")
    model, _ = load_exported(train_or_reuse(cfg, ctx, "classifier_real", task))
    assert next(model.parameters()).dtype == torch.float32  # exported as fp32 for evaluation
    assert model.body[1].running_var.dtype == torch.float32 and not torch.equal(model.body[1].running_var,
                                                                               torch.ones_like(model.body[1].running_var))
    assert accuracy(model, val)[0] > 0.9
