"""`evaluate`: how good the trained pipeline is, in the VQ-VAE-2 paper's terms.

1. a classifier trained on the real train split (the engine): the real-data accuracy baseline, the
   FID features of ``eval.features=classifier`` and the scores of rejection sampling;
2. reconstructions of the real val split: MSE, PSNR, codebook usage per level, reconstruction FID;
3. samples vs real val: FID, IS, KID, precision, recall (torch-fidelity, shard datasets), and the
   FID of real train images with the samples' count per class vs real val: the floor a perfect model
   would reach;
4. classifier-based rejection: the same metrics for the samples kept at each ``eval.accept_rates``,
   each FID beside that of real train images with the kept count per class (FID depends on both),
   and a grid of each class's most and least confident samples (rejection.png, in MLflow too);
5. Classification Accuracy Score: the same classifier recipe trained on the samples only, tested on
   the real val split;
6. a report beside the paper's numbers (report.md / report.html) and every number in results.json.

Expensive work is kept: trained classifiers are reused, reconstruction shards carry markers, and
every image set's features are extracted once and cached (real val, reconstructions, samples, the
real train baselines); rejection subsets and baselines are rows of those features, and a rerun
recomputes only the cheap metrics.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from pipeline import atomic
from pipeline.config import stage_dir
from pipeline.data import grids, shards
from pipeline.data.images import png_bytes
from pipeline.data.shard_images import ShardImages
from pipeline.evaluation import fidelity, report
from pipeline.evaluation.classifier import ClassifierTask, accuracy, confidences, manifest_digest, train_or_reuse
from pipeline.evaluation.reconstruction import reconstruct
from pipeline.evaluation.rejection import accepted, class_matched, extremes, rate_name
from pipeline.models import load_exported, load_exported_digest
from pipeline.stages import StageContext, vqvae_model
from pipeline.training import distributed
from pipeline.training.distributed import detect

SAMPLE_METRICS = ("fid", "isc", "kid", "precision", "recall")


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    # One process group for both classifier trainings: a second group created after the first was
    # destroyed can hang at its rendezvous under torchrun (its store still holds the first's keys).
    with distributed.process_group():
        return _run(cfg, ctx)


def _run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    start = time.time()
    e, env, res = cfg.eval, detect(), int(cfg.data.resolution)
    device = env.device
    real_dir, sample_dir = stage_dir(cfg, "prepare") / "shards", stage_dir(cfg, "sample") / "shards"
    real_manifest, sample_manifest = shards.read_manifest(real_dir), shards.read_manifest(sample_dir, made_by="sample")
    if int(sample_manifest["num_classes"]) != int(real_manifest["num_classes"]) or \
            int(sample_manifest["resolution"]) != res:
        raise ValueError(f"{sample_dir}: samples of {sample_manifest['num_classes']} classes at "
                         f"{sample_manifest['resolution']}² do not match the data ({real_manifest['num_classes']} "
                         f"classes at {res}²); rerun `submit stage=sample` for this experiment")
    crop = "none" if cfg.data.augment == "none" else "center"
    val = ShardImages(shards.shard_urls(real_dir, "val"), res, crop, limit=e.max_real)
    samples = ShardImages(shards.shard_urls(sample_dir, "samples"), res, "none")
    ctx.log.info("evaluating %d samples against %d real val images (%s features)", len(samples), len(val),
                 e.features)
    drawn_with = sample_manifest.get("sampling", {})
    # the evaluate config has no sample.* keys: these tags let the MLflow UI set sample sets side by side
    ctx.run.set_tags({f"sampling.{k}": v for k, v in drawn_with.items()})
    num_classes, names = int(real_manifest["num_classes"]), list(real_manifest["class_names"])
    results: dict[str, float] = {}

    # every rank takes its share of each pass over images (classifier, extractor, VQ-VAE)
    ranks, batch = dict(rank=env.rank, world_size=env.world_size), int(e.batch_size)
    real_task = ClassifierTask(cfg, shards.shard_urls(real_dir, "train"), val, num_classes, names,
                               f"real train {manifest_digest(real_manifest)}")
    # the real-data classifier and the reconstructions do not depend on the samples: other sample
    # sets' evaluate dirs may hold them already (on ImageNet, a ResNet's training not redone per set)
    others = tuple(d for d in sorted(ctx.stage_dir.parent.glob("evaluate*")) if d != ctx.stage_dir)
    real_path = train_or_reuse(cfg, ctx, "classifier_real", real_task, elsewhere=others)
    real_clf, _ = load_exported(real_path, device)
    results["real/top1"], results["real/top5"] = accuracy(real_clf, val, batch, **ranks)

    ext = (fidelity.extractor(fidelity.CLASSIFIER, real_path) if e.features == "classifier"
           else fidelity.extractor(fidelity.INCEPTION, Path(str(e.inception_weights)).expanduser()))
    cache_root = Path(str(e.cache_root))

    def features(images: ShardImages, cache_name: str) -> fidelity.Features:
        # every image set is extracted once (cached across reruns and sample sets), its rows split
        # over the ranks; subsets are rows
        return fidelity.features(images, ext, cache_name=cache_name, cache_root=cache_root, batch_size=batch,
                                 log=ctx.log, **ranks)
    real_digest = manifest_digest(real_manifest)
    val_name = f"{cfg.data.name}-val-{real_digest}-{res}{crop}-n{len(val)}" + ("-even" if e.max_real else "")
    val_f = features(val, val_name)  # "-even": eval.max_real took a class-balanced subset
    val_stats = fidelity.fid_statistics(val_f, ext)  # shared by every FID below
    score = dict(ext=ext, reference_stats=val_stats, kid_subset_size=int(e.kid_subset_size),
                 prc_neighborhood=int(e.prc_neighborhood), seed=int(cfg.seed))

    vqvae_path = vqvae_model(cfg)
    vqvae, _, vqvae_sha256 = load_exported_digest(vqvae_path, device)
    recon, recon_urls = reconstruct(vqvae, val, ctx.stage_dir / "reconstructions", batch, ctx.log,
                                    model_id=vqvae_sha256[:16], elsewhere=tuple(d / "reconstructions" for d in others),
                                    **ranks)
    results.update({f"recon/{k}": v for k, v in recon.items()})
    recon_f = features(ShardImages(recon_urls, res, "none"), f"recon-{vqvae_sha256[:16]}-{val_name}")
    samples_f = features(samples, f"samples-{manifest_digest(sample_manifest)}-n{len(samples)}")
    scores = confidences(real_clf, samples, batch, **ranks)
    rates = sorted({float(r) for r in e.accept_rates}, reverse=True)
    kept_at = {rate: accepted(samples.labels, scores, rate) for rate in rates}
    # FID moves with the image count and the class mix: each real baseline is real train images with
    # the same count per class as the samples it is set beside; all of them rows of one extraction
    train = ShardImages(shards.shard_urls(real_dir, "train"), res, crop)
    baselines = _baselines(train.labels, [samples.labels] + [samples.labels[k] for k in kept_at.values()], ctx)
    union = sorted(set().union(*baselines.values()))
    train_f = features(train.subset(union),
                       f"{cfg.data.name}-train-{real_digest}-{res}{crop}-{_digest(union)}-n{len(union)}")
    row = {i: k for k, i in enumerate(union)}

    def real_train_fid(labels: np.ndarray) -> float:
        return fidelity.fid(fidelity.rows(train_f, [row[i] for i in baselines[_counts(labels)]]), val_f, ext, val_stats)

    def sample_metrics(keep: np.ndarray | None) -> dict[str, float]:  # None: every sample
        feats, labels = (samples_f, samples.labels) if keep is None else \
            (fidelity.rows(samples_f, keep), samples.labels[keep])
        return {**fidelity.metrics(feats, val_f, **score), "real_train_fid": real_train_fid(labels)}
    # each image set's metrics on one rank: precision/recall compare every pair of images (on
    # ImageNet 50,000 x 50,000, for the samples and each acceptance rate), once, not on every rank
    calls = {"samples": partial(sample_metrics, None),
             "recon": lambda: {"fid": fidelity.fid(recon_f, val_f, ext, val_stats)}}
    calls.update({rate_name(rate): partial(sample_metrics, keep) for rate, keep in kept_at.items()
                  if len(keep) < len(samples)})
    computed = distributed.split_calls(_logged(calls, ctx, env.rank, env.world_size), **ranks)
    results["recon/fid"] = computed["recon"]["fid"]
    results.update({m: computed["samples"][m] for m in SAMPLE_METRICS})
    results.update({f"{m}/std": computed["samples"][f"{m}_std"] for m in ("isc", "kid")})
    results["real_train/fid"] = computed["samples"]["real_train_fid"]
    results["fid/vs_real_train"] = results["fid"] / max(results["real_train/fid"], 1e-12)
    for rate, keep in kept_at.items():
        name = rate_name(rate)
        kept = dict(computed.get(name, computed["samples"]))  # every sample kept: the samples' own
        kept["fid_vs_real_train"] = kept["fid"] / max(kept["real_train_fid"], 1e-12)
        results.update({f"{name}/{m}": v for m, v in kept.items()})
        results[f"{name}/kept"] = float(len(keep))
        results[f"{name}/confidence"] = float(np.mean(scores[keep]))

    if env.rank == 0:  # what rejection keeps and drops, per class, in the MLflow UI
        grid = _rejection_grid(samples, scores)
        atomic.write_bytes(ctx.stage_dir / report.GRID, png_bytes(grid))  # the reports show it
        ctx.run.log_image(grid, report.GRID)

    cas_task = ClassifierTask(cfg, shards.shard_urls(sample_dir, "samples"), val, num_classes, names,
                              f"samples {manifest_digest(sample_manifest)}")
    cas, _ = load_exported(train_or_reuse(cfg, ctx, "classifier_samples", cas_task), device)
    results["cas/top1"], results["cas/top5"] = accuracy(cas, val, batch, **ranks)
    results["cas/vs_real"] = results["cas/top1"] / max(results["real/top1"], 1e-12)

    facts = {"data": cfg.data.name, "resolution": res, "features": ext.name,
             "sampled": report.describe_samples(sample_dir.parent.name, drawn_with)}
    accept = [rate_name(r) for r in rates]
    if env.rank == 0:  # every rank holds the same numbers
        atomic.write_json(ctx.stage_dir / "results.json", {"results": results, **facts, "samples": len(samples),
                                                           "sampling": drawn_with, "real": len(val)})
        atomic.write_text(ctx.stage_dir / "report.md", report.markdown(results, accept, facts))
        atomic.write_text(ctx.stage_dir / "report.html", report.html_table(results, accept, facts))
    ctx.run.log_metrics(results, step=ctx.run.attempt)
    for name in ("results.json", "report.md", "report.html"):
        ctx.run.log_artifact(ctx.stage_dir / name)
    ctx.log.info("evaluation:\n%s", report.markdown(results, accept, facts))
    return {"fid": results["fid"], "fid_real_train": results["real_train/fid"], "cas_top1": results["cas/top1"],
            "real_top1": results["real/top1"], "recon_psnr": results["recon/psnr"],
            "usage_top": results["recon/usage_top"], "usage_bottom": results["recon/usage_bottom"],
            "seconds": round(time.time() - start, 2), "outputs": str(ctx.stage_dir)}


def _logged(calls: dict[str, Callable[[], dict[str, float]]], ctx: StageContext, rank: int,
            world_size: int) -> dict[str, Callable[[], dict[str, float]]]:
    """``calls``, each logging which image set's metrics it computes, on which rank, and how long."""
    def timed(name: str, call: Callable[[], dict[str, float]]) -> dict[str, float]:
        start = time.time()
        ctx.log.info("metrics of %s: on rank %d of %d", name, rank, world_size)
        out = call()
        ctx.log.info("metrics of %s: done in %.1f s", name, time.time() - start)
        return out
    return {name: partial(timed, name, call) for name, call in calls.items()}


def _counts(labels: np.ndarray) -> tuple:
    return tuple(zip(*np.unique(labels, return_counts=True)))


def _baselines(pool: np.ndarray, label_sets: list[np.ndarray], ctx: StageContext) -> dict[tuple, list[int]]:
    """For each distinct class mix of ``label_sets``: the real train images (indices into ``pool``,
    their labels) with the same count per class."""
    out: dict[tuple, list[int]] = {}
    for labels in label_sets:
        if _counts(labels) not in out:
            idx, short = class_matched(pool, labels)
            if short:
                ctx.log.warning("real train baseline: too few train images of classes %s (missing %s); "
                                "the baseline has %d images for %d samples", list(short), list(short.values()),
                                len(idx), len(labels))
            out[_counts(labels)] = idx
    return out


def _rejection_grid(samples: ShardImages, scores: np.ndarray, per_side: int = 5) -> Image.Image:
    """One row per class: its samples the real classifier is most sure of (most first), a grey
    cell, then those it is least sure of (least last): rejection keeps from the left."""
    rows = []
    for best, worst in extremes(samples.labels, scores, per_side, grids.GRID_CLASSES):
        cells = [samples[i] for i in best]
        gap = torch.full_like(cells[0], grids.GUTTER)
        row = torch.stack(cells + [gap] + [samples[i] for i in worst]).float() / 127.5 - 1
        if row.shape[-1] > 128:  # 20 rows of 11 ImageNet samples at 256² would be a 15-megapixel image
            row = torch.nn.functional.interpolate(row, size=(128, 128), mode="bilinear", antialias=True)
        rows.append(row)
    return grids.grid(rows, max(1, 64 // rows[0].shape[-1]))


def _digest(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]
