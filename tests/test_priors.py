"""`submit stage=train_top_prior` / `train_bottom_prior` (run by the ``priors`` fixture) on real digits code shards with the real
DeepSpeed engine: the priors learn more than the codes' frequencies, log sample grids, export, and
resume the same MLflow run after SIGKILL."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow.tracking import MlflowClient

from conftest import PRIOR_ARGS, copy_stages, submit
from pipeline import atomic
from pipeline.config import compose
from pipeline.data import codes
from pipeline.models import load_exported
from pipeline.models.sampling import sample_bottom, sample_top
from pipeline.stages.train_priors import PriorTask
from test_train_vqvae import _history, _popen, _wait_for_checkpoint

FAST = PRIOR_ARGS[:5]  # without the step counts


@pytest.fixture
def experiment(encoded, tmp_path):
    return copy_stages(encoded, tmp_path / "runs", "train_vqvae", "encode")


def _run(run_root, stage):
    record = json.loads((run_root / "digits" / stage / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    return client, client.get_run(record["run_id"])


def _unigram_bits(run_root, key: str, k: int) -> float:
    """Entropy of the val codes' own histogram: the best any position- and context-blind model gets."""
    urls = codes.shard_urls(run_root / "digits" / "encode" / "shards", "val")
    counts = np.zeros(k)
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        counts += np.bincount(codes.load_npy(s[key]).ravel(), minlength=k)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("stage, key, k, grid", [
    ("train_top_prior", "top.npy", 32, "samples_top_prior_with_nearest_real_bottom"),
    ("train_bottom_prior", "bottom.npy", 64, "samples_bottom_prior_real_top_originals_above"),
])
def test_prior_learns_more_than_code_frequencies_logs_samples_and_exports(priors, stage, key, k, grid):
    experiment = priors  # trained by the fixture with conftest.PRIOR_ARGS: 150 steps, eval every 50
    client, run = _run(experiment, stage)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == stage
    val = dict(_history(client, run, "val_bits_per_code"))
    assert sorted(val) == [50, 100, 150], val
    unigram = _unigram_bits(experiment, key, k)
    assert unigram < math.log2(k)
    assert val[150] < val[50] and val[150] < unigram - 0.5, (val, unigram)
    for metric in ("loss", "bits_per_code", "accuracy", "val_accuracy", "lr", "grad_norm", "samples_per_s"):
        assert _history(client, run, metric), metric
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(grid in p for p in images), images

    model, meta = load_exported(experiment / "digits" / stage / "model.pt")
    assert meta["num_codes"] == k and meta["num_classes"] == 10 and len(meta["class_names"]) == 10
    assert meta["vqvae_sha256"] == atomic.file_digest(experiment / "digits" / "train_vqvae" / "model.pt")
    g = torch.Generator().manual_seed(0)
    classes = torch.arange(3)
    if stage == "train_top_prior":
        out = sample_top(model, classes, (meta["top_size"],) * 2, generator=g)
        assert out.shape == (3, 4, 4)
    else:
        top = torch.randint(0, 32, (3, meta["top_size"], meta["top_size"]), generator=g)
        out = sample_bottom(model, top, classes, (meta["bottom_size"],) * 2, generator=g)
        assert out.shape == (3, 8, 8)
    assert out.dtype == torch.long and 0 <= int(out.min()) and int(out.max()) < k


def test_top_prior_sigkill_then_rerun_resumes_the_same_run(experiment, tmp_path):
    ckpt_dir = experiment / "digits" / "train_top_prior" / "checkpoints"
    args = ["stage=train_top_prior", f"run_root={experiment}", *FAST, "train.ckpt_every=20",
            "train.eval_every=1000", "train.sample_grid=false"]
    proc = _popen([*args, "train.max_steps=5000"], tmp_path)
    _wait_for_checkpoint(proc, ckpt_dir, "step_00000040")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = int((ckpt_dir / "latest").read_text().strip()[5:])
    _, run = _run(experiment, "train_top_prior")

    again = submit(*args, f"train.max_steps={killed_at + 30}", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt_dir / f'step_{killed_at:08d}'}" in again.stdout
    client, resumed = _run(experiment, "train_top_prior")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [s for s, _ in _history(client, resumed, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == killed_at + 30, steps


def test_a_codebook_size_other_than_the_codes_is_refused(encoded):
    cfg = compose(["stage=train_top_prior", f"run_root={encoded}", "model.vqvae.codebook_size_top=16"])
    with pytest.raises(ValueError, match=r"model.vqvae.codebook_size_top=16, .* codebook_size_top=32"):
        PriorTask(cfg, "top_prior")


def test_validation_takes_a_class_balanced_val_subset_read_as_the_stream_reads_it(encoded, tmp_path):
    cfg = compose(["stage=train_top_prior", f"run_root={encoded}", "train.eval_samples=20",
                   "train.sample_grid=false", "deepspeed.micro_batch=8"])
    task = PriorTask(cfg, "top_prior")
    model = task.build_model().eval()
    rng = torch.get_rng_state()
    with torch.no_grad():
        metrics = task.evaluate(model, 0, None)
    assert torch.equal(rng, torch.get_rng_state())  # validating leaves training's randomness alone
    assert np.bincount(task.val.labels, minlength=10).tolist() == [2] * 10  # not the first 20 val maps
    urls = codes.shard_urls(encoded / "digits" / "encode" / "shards", "val")
    stream = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    maps = [task.val[i] for i in range(len(task.val))]
    for (top, bottom, cls), entry in zip(maps, task.val.entries):
        ref_top, ref_bottom, ref_cls = codes.CodeSample()(stream[entry.key], None)
        assert torch.equal(top, torch.from_numpy(ref_top)) and torch.equal(bottom, torch.from_numpy(ref_bottom))
        assert int(cls) == ref_cls
    top, cls = torch.stack([m[0] for m in maps]), torch.stack([m[2] for m in maps])
    with torch.no_grad():
        bits = float(torch.nn.functional.cross_entropy(model(top, cls), top)) / math.log(2)
    assert metrics["val_bits_per_code"] == pytest.approx(bits, rel=1e-5)

    # a sample without both maps or with an unreadable class is left out and counted
    shard = tmp_path / "val-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, cls in enumerate([0, 0, 1, 1, 2, 2]):
            sample = {"__key__": f"k{i}", "top.npy": codes.npy_bytes(np.full((2, 2), i, np.uint8)),
                      "bottom.npy": codes.npy_bytes(np.full((4, 4), i, np.uint8)), "cls": str(cls)}
            if i == 3:
                del sample["bottom.npy"]
            if i == 5:
                sample["cls"] = "x"
            sink.write(sample)
    maps = codes.CodeMaps([str(shard)])
    assert maps.skipped == 2 and [e.key for e in maps.entries] == ["k0", "k1", "k2", "k4"]
    assert maps[3][1].dtype == torch.int64 and maps[3][1].tolist() == [[4] * 4] * 4 and int(maps[3][2]) == 2
    assert [e.key for e in codes.CodeMaps([str(shard)], limit=3).entries] == ["k0", "k2", "k4"]
    assert [e.key for e in maps.shard_for_rank(1, 2).entries] == ["k1", "k4"]
