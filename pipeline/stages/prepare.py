"""`prepare`: a dataset -> WebDataset tar shards + manifest, restartable shard by shard.

Shards are written by ``prepare.workers`` processes; array task i of n writes shards i, i+n, ...
and the manifest is written by whichever task finds every shard complete.
``verify=true`` re-reads every shard against the manifest instead of writing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from pipeline import atomic
from pipeline.data import grids, shards
from pipeline.data.sources import Source, open_source, write_options
from pipeline.progress import progress_bar
from pipeline.stages import (StageContext, completed_the_stage, logging_progress, record_shard_total,
                             verify_outputs)

_worker: dict[str, Any] = {}  # per worker process: the source and the progress queue


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    out_dir = ctx.stage_dir / "shards"
    if cfg.verify:
        return verify_outputs(ctx, out_dir, shards.verify)
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.data, int(cfg.seed), index_dir=out_dir)
    samples = source.samples()
    ctx.log.info("source: %s, layout %s, %d classes, %s", source.name, source.layout,
                 len(source.class_names), ", ".join(f"{s}={len(v)}" for s, v in samples.items()))
    plans = shards.plan_shards(samples, int(cfg.data.shard_size), int(cfg.seed), write_options(cfg.data))
    mine = shards.assigned(plans, ctx.task, ctx.tasks)

    stats = {p.name: s for p in plans if (s := shards.completed_stats(out_dir, p)) is not None}
    todo = [p for p in mine if p.name not in stats]
    record_shard_total(ctx.stage_dir, len(plans))  # once the settings are known to match
    if not todo:
        ctx.log.info("all %d shards of this task in %s are already complete: nothing to write",
                     len(mine), out_dir)
    else:
        ctx.log.info("%d of %d shards to write (%d already complete), %d worker(s)", len(todo),
                     len(mine), len(mine) - len(todo), int(cfg.prepare.workers))
    with progress_bar(total=sum(len(p.refs) for p in todo), unit="img", desc="prepare",
                      disable=not todo) as bar, logging_progress(ctx, float(cfg.tracking.progress_every_s)):
        stats.update(_write(out_dir, todo, source, int(cfg.prepare.workers), bar))
    # the other tasks' shards completed while this one wrote count too: tasks that start together
    # would otherwise each find the others' pending, and none would write the manifest
    stats.update({p.name: s for p in plans if p.name not in stats and (s := shards.completed_stats(out_dir, p))})

    pending = [p.name for p in plans if p.name not in stats]
    manifest_path = out_dir / shards.MANIFEST
    if pending:
        ctx.log.info("%d shards are still being written by other tasks; the last task writes the "
                     "manifest", len(pending))
    else:
        manifest = shards.build_manifest(plans, stats, source, int(cfg.data.resolution),
                                         int(cfg.seed), int(cfg.data.shard_size))
        shards.write_manifest(out_dir, manifest)

    for s in (s for p in mine if p.name in stats for s in stats[p.name]["skipped"]):
        ctx.log.warning("skipped %s: %s", s["origin"], s["error"])
    # this task's work; once every shard is complete, the stage's totals (below)
    summary: dict[str, Any] = {
        "images_written": sum(stats[p.name]["count"] for p in todo),
        "shards": len(mine), "shards_written": len(todo), "shards_already_complete": len(mine) - len(todo),
        "shards_pending_other_tasks": len(pending),
        "seconds": round(time.time() - start, 2),
    }
    ctx.run.log_metrics(summary, step=ctx.run.attempt)
    ctx.run.set_tags({"data.layout_found": source.layout})
    if not pending:
        everything = [stats[p.name] for p in plans]
        totals = {"images": sum(st["count"] for st in everything),
                  "images_skipped": sum(len(st["skipped"]) for st in everything),
                  "images_converted": sum(st["converted"] for st in everything),
                  "bytes": sum(st["bytes"] for st in everything)}
        summary.update(totals)
        completed_the_stage(ctx)  # an array task completing the set logs to the stage's run
        ctx.run.log_metrics(totals, step=ctx.run.attempt)
        ctx.run.log_artifact(manifest_path)
        all_skipped = [s for p in plans for s in stats[p.name]["skipped"]]
        skipped_path = out_dir / "skipped.json"
        if all_skipped and (not skipped_path.exists() or json.loads(skipped_path.read_text()) != all_skipped):
            atomic.write_json(skipped_path, all_skipped)
        if all_skipped:
            ctx.run.log_artifact(skipped_path)
        if todo:
            ctx.run.log_image(grids.class_grid(shards.shard_urls(out_dir, "train"), 10,
                                               classes=int(shards.read_manifest(out_dir)["num_classes"]), size=64),
                              "samples/train_per_class.png")
    ctx.log.info("prepare: %d of this task's %d shards written now (%d images), %.1f s%s", len(todo), len(mine),
                 summary["images_written"], summary["seconds"],
                 f"; {len(pending)} shards left to other tasks" if pending else
                 "; the dataset: {images} images in {n} shards, {images_skipped} skipped, {bytes} bytes".format(
                     n=len(plans), **summary))
    return {**summary, "outputs": str(out_dir), "complete": not pending}


def _write(out_dir: Path, todo: list[shards.ShardPlan], source: Source, workers: int,
           bar: tqdm) -> dict[str, dict]:
    """Write the shards in ``todo``; on an error or a stop, workers are terminated (their temp
    files are removed when that shard is next written)."""
    if workers <= 1 or len(todo) <= 1:
        return {p.name: shards.write_shard(out_dir, p, source, on_sample=bar.update) for p in todo}
    ctx = mp.get_context("spawn")  # no fork: the parent holds MLflow threads and open handles
    ticks = ctx.Queue()
    results: dict[str, dict] = {}
    with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(source, ticks)) as pool:
        pending = [pool.apply_async(_write_one, (out_dir, p)) for p in todo]
        while pending:
            try:
                bar.update(ticks.get(timeout=0.5))
            except queue.Empty:
                pass
            for r in [r for r in pending if r.ready()]:
                st = r.get()  # re-raises a worker's exception here
                results[st["name"]] = st
                pending.remove(r)
        while not ticks.empty():
            bar.update(ticks.get())
    return results


def _init_worker(source: Source, ticks: mp.Queue) -> None:
    _worker.update(source=source, ticks=ticks)


def _write_one(out_dir: Path, plan: shards.ShardPlan) -> dict:
    seen = [0]

    def tick() -> None:  # batch progress messages: one per 16 images
        seen[0] += 1
        if seen[0] % 16 == 0:
            _worker["ticks"].put(16)

    stats = shards.write_shard(out_dir, plan, _worker["source"], on_sample=tick)
    _worker["ticks"].put(seen[0] % 16)
    return stats
