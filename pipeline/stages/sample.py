"""`sample`: class-conditional ancestral samples — top codes from the top prior, bottom codes from
the bottom prior given them, decoded by the VQ-VAE — written as image shards that `evaluate` reads
like the real ones (split ``samples``).

The plan (which class and sample index goes to which shard) depends only on the config, and every
shard draws from its own generator seeded by (sample.seed, else seed; shard index): the samples are the same however
the shards are split over array tasks or requeues. Array task i of n writes shards i, i+n, ...; a
shard is written atomically with a completion marker, so a requeued task continues where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from omegaconf import DictConfig
from PIL import Image

from pipeline import atomic
from pipeline.config import stage_dir
from pipeline.data import grids, shards
from pipeline.data.images import png_bytes
from pipeline.models import load_exported_digest
from pipeline.models.sampling import sample_bottom, sample_top
from pipeline.progress import progress_bar
from pipeline.stages import (StageContext, completed_the_stage, logging_progress, record_shard_total, verify_outputs,
                             vqvae_model)
from pipeline.training.distributed import detect

SPLIT = "samples"


def plan(cfg: DictConfig, num_classes: int) -> list[list[tuple[int, int]]]:
    """Shards of (class, index within the class), classes in the order asked for."""
    classes = list(range(num_classes)) if cfg.sample.classes is None else [int(c) for c in cfg.sample.classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"sample.classes: {bad} out of range, the models know classes 0..{num_classes - 1}")
    items = [(c, i) for c in classes for i in range(int(cfg.sample.per_class))]
    size = int(cfg.sample.shard_size)
    return [items[i:i + size] for i in range(0, len(items), size)]


def settings(cfg: DictConfig) -> dict[str, Any]:
    s = cfg.sample
    # batch_size is here because a shard's batches draw one after another from the shard's generator:
    # other batches, other samples, so a resumed shard set must keep it
    return {"seed": int(cfg.seed if s.seed is None else s.seed), "temperature": float(s.temperature), "top_k": int(s.top_k),
            "top_p": float(s.top_p), "batch_size": int(s.batch_size)}


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    if cfg.verify:
        return verify_outputs(ctx, ctx.stage_dir / "shards", functools.partial(shards.verify, stage="sample"))
    start = time.time()
    device = detect().device
    paths = {"train_vqvae": vqvae_model(cfg), "train_top_prior": stage_dir(cfg, "train_top_prior") / "model.pt",
             "train_bottom_prior": stage_dir(cfg, "train_bottom_prior") / "model.pt"}
    # the models by content, not path or mtime: a run_root moved or copied elsewhere still resumes
    loaded = {name: load_exported_digest(p, device) for name, p in paths.items()}
    digests = {name: sha for name, (_, _, sha) in loaded.items()}
    models = {name: (model, meta) for name, (model, meta, _) in loaded.items()}
    vqvae, vq_meta = models["train_vqvae"]
    (top_prior, top_meta), (bottom_prior, bottom_meta) = models["train_top_prior"], models["train_bottom_prior"]
    num_classes = int(top_meta["num_classes"])
    if int(bottom_meta["num_classes"]) != num_classes or int(vq_meta["num_classes"]) != num_classes:
        raise ValueError("the VQ-VAE and the two priors were trained on different class sets; retrain the "
                         "priors after `submit stage=encode` with this VQ-VAE")
    for name, meta in (("train_top_prior", top_meta), ("train_bottom_prior", bottom_meta)):
        if meta.get("vqvae_sha256") not in (None, digests["train_vqvae"]):
            raise ValueError(f"{paths[name]} learned the codes of another VQ-VAE (sha256 {meta['vqvae_sha256'][:16]}) "
                             f"than {paths['train_vqvae']} ({digests['train_vqvae'][:16]}), which would decode its "
                             "samples -- retrain the priors after `submit stage=encode` with this VQ-VAE")
    shard_plan = plan(cfg, num_classes)
    how = settings(cfg)
    # what a shard depends on (its stats keep it, and its digest as "plan", like prepare's shards)
    made_with = {"sampling": how, "models": {k: v[:16] for k, v in digests.items()}, "plan": _sha(shard_plan)}
    out_dir = ctx.stage_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{SPLIT}-{i:06d}" for i in range(len(shard_plan))]
    mine = list(range(len(shard_plan)))[ctx.task::ctx.tasks]
    todo = [i for i in mine if _completed(out_dir, names[i], made_with) is None]
    record_shard_total(ctx.stage_dir, len(shard_plan))  # once the settings are known to match
    ctx.log.info("sampling %d classes x %d per class (temperature %g, top-k %d, top-p %g) on %s: %d of %d "
                 "shards of this task to write", len({c for s in shard_plan for c, _ in s}),
                 int(cfg.sample.per_class), how["temperature"], how["top_k"], how["top_p"], device,
                 len(todo), len(mine))
    sizes = (int(top_meta["top_size"]),) * 2, (int(bottom_meta["bottom_size"]),) * 2
    t0, drawn = time.time(), 0
    with progress_bar(total=sum(len(shard_plan[i]) for i in todo), unit="sample", desc="sample",
                      disable=not todo) as bar, logging_progress(ctx, float(cfg.tracking.progress_every_s)):
        for i in todo:
            g = torch.Generator(device=device).manual_seed(how["seed"] * 1_000_003 + i)
            rows = []
            for b in range(0, len(shard_plan[i]), int(cfg.sample.batch_size)):
                items = shard_plan[i][b:b + int(cfg.sample.batch_size)]
                classes = torch.tensor([c for c, _ in items], device=device)
                images = _draw(vqvae, top_prior, bottom_prior, classes, sizes, g, how, device,
                               str(cfg.sample.method))
                rows += [(c, k, img) for (c, k), img in zip(items, images)]
                bar.update(len(items))
            _write_shard(out_dir, names[i], rows, made_with)
            drawn += len(rows)
    seconds = time.time() - t0
    complete = all(_completed(out_dir, n, made_with) is not None for n in names)
    summary: dict[str, Any] = {"shards": len(mine), "shards_written": len(todo), "samples_drawn": drawn,
                               "samples_per_s": round(drawn / seconds, 2) if drawn else 0.0,
                               "seconds": round(time.time() - start, 2)}
    ctx.run.log_metrics(summary, step=ctx.run.attempt)  # this task's work
    if complete:
        manifest = _manifest(out_dir, names, vq_meta, top_meta, made_with, cfg)
        shards.write_manifest(out_dir, manifest)
        summary["samples"] = manifest["splits"][SPLIT]["count"]
        completed_the_stage(ctx)  # an array task completing the set logs to the stage's run
        ctx.run.log_metrics({"samples": summary["samples"]}, step=ctx.run.attempt)
        ctx.run.log_artifact(out_dir / shards.MANIFEST)
        ctx.run.log_image(grids.class_grid([str(shards.tar_path(out_dir, n)) for n in names],
                                           int(cfg.sample.grid_per_class)), "samples_per_class.png")
    ctx.log.info("sample: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return {**summary, "outputs": str(out_dir), "complete": complete}


@torch.no_grad()
def _draw(vqvae, top_prior, bottom_prior, classes: torch.Tensor, sizes, g: torch.Generator, how: dict,
          device: torch.device, method: str) -> list[bytes]:
    """classes -> PNG bytes of the decoded samples (bf16 autocast on GPU)."""
    filt = {k: how[k] for k in ("temperature", "top_k", "top_p")} | {"method": method}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        top = sample_top(top_prior, classes, sizes[0], generator=g, **filt)
        bottom = sample_bottom(bottom_prior, top, classes, sizes[1], generator=g, **filt)
        x = vqvae.decode_codes(top, bottom)
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [png_bytes(Image.fromarray(p)) for p in pixels]


# Where other settings' samples go: the drawn ones stay, the priors are not trained again.
_ELSEWHERE = ("draw these beside them with sample_set=<name> (then sample-<name>/ and evaluate-<name>/), or move "
              "{} away to draw again (finished shards are never overwritten)")


def _completed(out_dir: Path, name: str, made_with: dict) -> dict | None:
    sp, tp = shards.stats_path(out_dir, name), shards.tar_path(out_dir, name)
    if not sp.exists() or not tp.exists():
        return None
    stats = json.loads(sp.read_text())
    if stats["plan"] != _sha(made_with):
        if "made_with" not in stats:
            raise shards.OutputsMadeOtherwise(
                f"{sp}: written with other sampling settings, by an earlier version that did not record them "
                f"(nor sample.batch_size); {_ELSEWHERE.format(out_dir.parent)}")
        raise shards.OutputsMadeOtherwise(
            f"{sp}: written with other sampling settings or models: {_differences(stats['made_with'], made_with)}; "
            f"pass the same settings, or {_ELSEWHERE.format(out_dir.parent)}")
    return stats if tp.stat().st_size == stats["bytes"] else None


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _differences(then: dict, now: dict) -> str:
    out = [f"{'sample.seed (else seed)' if k == 'seed' else 'sample.' + k} {then['sampling'].get(k)} there, {v} now"
           for k, v in now["sampling"].items() if then["sampling"].get(k) != v]
    out += [f"{k} model.pt sha256 {then['models'].get(k)} there, {v} now"
            for k, v in now["models"].items() if then["models"].get(k) != v]
    if then["plan"] != now["plan"]:
        out.append("another plan of which samples go where (sample.per_class, sample.classes, sample.shard_size)")
    return "; ".join(out)


def _write_shard(out_dir: Path, name: str, rows: list[tuple[int, int, bytes]], made_with: dict) -> None:
    tar = shards.tar_path(out_dir, name)
    atomic.remove_stale_temps(tar)
    tmp = atomic.temp_name(tar)
    with open(tmp, "wb") as stream:
        sink = wds.TarWriter(stream)
        for c, k, png in rows:
            sink.write({"__key__": f"c{c:05d}_{k:06d}", "png": png, "cls": c,
                        "json": {"class": c, "index": k, **made_with["sampling"]}})
        sink.close()
    atomic.commit(tmp, tar)
    counts: dict[str, int] = {}
    for c, _, _ in rows:
        counts[str(c)] = counts.get(str(c), 0) + 1
    atomic.write_json(shards.stats_path(out_dir, name), {
        "name": name, "tar": tar.name, "split": SPLIT, "plan": _sha(made_with), "count": len(rows),
        "skipped": [], "class_counts": counts, "bytes": tar.stat().st_size, "made_with": made_with})


def _manifest(out_dir: Path, names: list[str], vq_meta: dict, top_meta: dict, made_with: dict,
              cfg: DictConfig) -> dict:
    stats = [json.loads(shards.stats_path(out_dir, n).read_text()) for n in names]
    counts: dict[str, int] = {}
    for s in stats:
        for c, n in s["class_counts"].items():
            counts[c] = counts.get(c, 0) + n
    entry = {"count": sum(s["count"] for s in stats), "skipped": 0,
             "shards": [{"name": s["tar"], "count": s["count"]} for s in stats],
             "class_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0])))}
    return {"format": shards.FORMAT, "dataset": f"samples of experiment {cfg.experiment}", "layout": "samples",
            "class_names": list(top_meta["class_names"]), "num_classes": int(top_meta["num_classes"]),
            "class_ids": list(top_meta["class_names"]), "resolution": int(vq_meta["resolution"]),
            "seed": made_with["sampling"]["seed"], "shard_size": int(cfg.sample.shard_size),
            "sampling": made_with["sampling"], "splits": {SPLIT: entry},
            # the models that drew them: evaluate's caches (CAS classifier, features) are keyed by
            # this manifest, and samples redrawn by retrained priors must not reuse them
            "models": made_with["models"]}
