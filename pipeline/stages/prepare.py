"""`prepare`: a dataset -> WebDataset tar shards + manifest, restartable shard by shard."""

from __future__ import annotations

import io
import time
from typing import Any

import webdataset as wds
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from pipeline import atomic
from pipeline.data import shards
from pipeline.data.sources import open_source
from pipeline.stages import StageContext


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    start = time.time()
    out_dir = ctx.stage_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.data, int(cfg.seed))
    samples = source.samples()
    ctx.log.info("source: %s (%s), %d classes, %s", source.name, source.layout,
                 len(source.class_names), ", ".join(f"{s}={len(v)}" for s, v in samples.items()))
    plans = shards.plan_shards(samples, int(cfg.data.shard_size), int(cfg.seed))

    stats = {p.name: s for p in plans if (s := shards.completed_stats(out_dir, p)) is not None}
    todo = [p for p in plans if p.name not in stats]
    if not todo:
        ctx.log.info("all %d shards in %s are already complete: nothing to write", len(plans), out_dir)
    else:
        ctx.log.info("%d of %d shards to write (%d already complete)", len(todo), len(plans),
                     len(stats))
    with tqdm(total=sum(len(p.refs) for p in todo), unit="img", desc="prepare",
              disable=not todo, mininterval=1.0) as bar:
        for p in todo:
            stats[p.name] = shards.write_shard(out_dir, p, source, on_sample=lambda: bar.update())

    manifest = shards.build_manifest(plans, stats, source, int(cfg.data.resolution),
                                     int(cfg.seed), int(cfg.data.shard_size))
    manifest_path = out_dir / shards.MANIFEST
    if not manifest_path.exists() or shards.read_manifest(out_dir) != manifest:
        atomic.write_json(manifest_path, manifest)

    written = [stats[p.name] for p in todo]
    skipped = [s for st in stats.values() for s in st["skipped"]]
    for s in skipped:
        ctx.log.warning("skipped %s: %s", s["origin"], s["error"])
    seconds = time.time() - start
    summary = {
        "images": sum(st["count"] for st in stats.values()),
        "images_written": sum(st["count"] for st in written),
        "images_skipped": len(skipped),
        "shards": len(plans), "shards_written": len(todo), "shards_already_complete": len(plans) - len(todo),
        "bytes": sum(st["bytes"] for st in stats.values()),
        "seconds": round(seconds, 2),
    }
    ctx.run.log_metrics(summary, step=ctx.run.attempt)
    ctx.run.log_artifact(manifest_path)
    if todo:
        ctx.run.log_image(class_grid(out_dir, manifest), "samples/train_per_class.png")
    ctx.log.info("prepare: %(images)d images in %(shards)d shards (%(shards_written)d written now), "
                 "%(images_skipped)d skipped, %(bytes)d bytes, %(seconds).1f s", summary)
    return {**summary, "outputs": str(out_dir)}


def class_grid(shard_dir, manifest: dict, per_class: int = 10) -> Image.Image:
    """A grid with one row per class (up to 20 classes) of the first train images, for MLflow."""
    classes = list(range(min(manifest["num_classes"], 20)))
    rows: dict[int, list[Image.Image]] = {c: [] for c in classes}
    for sample in wds.WebDataset(shards.shard_urls(shard_dir, "train"), shardshuffle=False,
                                 empty_check=False):
        c = int(sample["cls"])
        if c in rows and len(rows[c]) < per_class:
            raw = sample.get("png") or sample.get("jpg")
            rows[c].append(Image.open(io.BytesIO(raw)).convert("RGB").resize((64, 64)))
        if all(len(v) == per_class for v in rows.values()):
            break
    grid = Image.new("RGB", (64 * per_class, 64 * len(classes)))
    for r, c in enumerate(classes):
        for i, im in enumerate(rows[c]):
            grid.paste(im, (64 * i, 64 * r))
    return grid
