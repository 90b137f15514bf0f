"""Stages: library functions ``run(cfg, ctx) -> summary`` that know nothing about schedulers.

The launch layer wraps each in a job (local or SLURM). A stage named in configs/stage/ but not
in ``BUILT`` is refused by ``submit`` with exit code 2 instead of pretending to run.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from pipeline.tracking import StageRun

DONE = "done.json"  # written into the stage dir when a stage finished completely
# What `submit status` shows of a running stage, in its stage dir: a training writes (step,
# max_steps, steps_per_s, time) at every log step; a shard-parallel stage writes (shards_total, time)
# when a task starts, and status counts the shards' completion markers (shards/*_stats.json).
PROGRESS = "progress.json"


def record_shard_total(stage_dir: Path, total: int) -> None:
    from pipeline import atomic

    atomic.write_json(stage_dir / PROGRESS, {"shards_total": total, "time": time.time()})


def shard_progress(stage_dir: Path, now: float | None = None) -> dict[str, float] | None:
    """A shard-parallel stage's progress over all its array tasks, from its progress file (the
    total; when the last task started) and its shards' completion markers: shards_complete,
    shards_total, fraction, last_shard_age_s, and from the shards completed since that start,
    shards_per_min and eta_s. None when the stage recorded no total."""
    now = time.time() if now is None else now
    try:
        p = json.loads((Path(stage_dir) / PROGRESS).read_text())
        total, started = int(p["shards_total"]), float(p["time"])
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or a training's
        return None
    done = []
    for marker in (Path(stage_dir) / "shards").glob("*_stats.json"):
        try:
            done.append(marker.stat().st_mtime)
        except OSError:  # replaced while listed
            continue
    out: dict[str, float] = {"shards_complete": len(done), "shards_total": total,
                             "fraction": len(done) / max(1, total)}
    recent = [t for t in done if t >= started]
    if recent and now > started:
        per_s = len(recent) / (now - started)
        out.update(shards_per_min=60 * per_s, eta_s=max(0, total - len(done)) / per_s)
    if done:
        out["last_shard_age_s"] = max(0.0, now - max(done))
    return out


@contextmanager
def logging_progress(ctx: "StageContext", every_s: float) -> Iterator[None]:
    """While a shard-parallel stage writes, the task that logs to MLflow logs the progress of every
    task (``progress/shards_complete``, ``fraction``, ``shards_per_min``, ``eta_s``) every
    ``every_s`` seconds and once at the end, at the step "seconds since the run started" (or one
    past the last step, when faster): a long prepare, encode or sample advances in the MLflow UI,
    not only in its log."""
    start_ms = getattr(ctx.run, "start_time_ms", None)
    if start_ms is None:  # a rank or task that does not log
        yield
        return
    stop, last = threading.Event(), [-1]

    def log_once() -> None:
        last[0] = _log_progress(ctx, start_ms, last[0])

    def loop() -> None:
        while not stop.wait(every_s):
            log_once()

    thread = threading.Thread(target=loop, daemon=True, name="shard-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        log_once()


def _log_progress(ctx: "StageContext", start_ms: int, last_step: int) -> int:
    """Log the shard progress at the step "seconds since the run started" (at least one past
    ``last_step``); the step logged."""
    p = shard_progress(ctx.stage_dir)
    if p is None:
        return last_step
    step = max(last_step + 1, int(time.time() - start_ms / 1000))
    ctx.run.log_metrics({f"progress/{k}": v for k, v in p.items()}, step=step)
    return step


def completed_the_stage(ctx: "StageContext") -> None:
    """This task found every shard of the stage complete. An array task other than 0 then logs the
    stage's totals, manifest and grid to the stage's run (``StageRun.join_as_completer``), with the
    progress at its end: task 0's last progress point was from when it ended, before the others."""
    if ctx.task == 0:
        return  # task 0 logs to the run anyway; its progress ends as it leaves logging_progress
    ctx.run.join_as_completer()
    start_ms = getattr(ctx.run, "start_time_ms", None)
    if start_ms is not None:
        _log_progress(ctx, start_ms, ctx.run.last_step("progress/fraction"))


# The pipeline's order (what `submit --help` lists and `stage=all` runs).
ORDER = ("prepare", "train_vqvae", "encode", "train_top_prior", "train_bottom_prior", "sample",
         "evaluate", "all")
# stage name -> "module:function"; imported lazily so `submit --help` stays fast.
BUILT: dict[str, str] = {
    "prepare": "pipeline.stages.prepare:run",
    "train_vqvae": "pipeline.stages.train_vqvae:run",
    "encode": "pipeline.stages.encode:run",
    "train_top_prior": "pipeline.stages.train_priors:run_top",
    "train_bottom_prior": "pipeline.stages.train_priors:run_bottom",
    "sample": "pipeline.stages.sample:run",
    "evaluate": "pipeline.stages.evaluate:run",
}
# What each stage reads from earlier stages (stage, path in its dir). A stage submitted alone is
# refused before it starts when one is missing; `stage=all` queues the producers first instead.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "train_vqvae": (("prepare", "shards/dataset.json"),),
    "encode": (("prepare", "shards/dataset.json"), ("train_vqvae", "model.pt")),
    "train_top_prior": (("encode", "shards/codes.json"),),
    "train_bottom_prior": (("encode", "shards/codes.json"),),
    "sample": (("train_vqvae", "model.pt"), ("train_top_prior", "model.pt"), ("train_bottom_prior", "model.pt")),
    "evaluate": (("prepare", "shards/dataset.json"), ("train_vqvae", "model.pt"), ("sample", "shards/dataset.json")),
}
# The model.* settings (sections or keys) a stage's own outputs depend on, what it builds or trains;
# a later stage depends on an earlier one's settings through that stage's outputs
MODEL_SETTINGS: dict[str, tuple[str, ...]] = {
    "train_vqvae": ("vqvae",), "encode": ("vqvae",),
    "train_top_prior": ("top_prior", "vqvae.codebook_size_top"),  # its vocabulary: the VQ-VAE's codebook
    "train_bottom_prior": ("bottom_prior", "vqvae.codebook_size_top", "vqvae.codebook_size_bottom"),
    "evaluate": ("classifier",),
}


# Keys only the trainings read (the training stream, DeepSpeed): prepare's shards, encode's codes and
# the samples do not depend on them
TRAINING_ONLY = ("deepspeed.", "data.num_workers", "data.shuffle_buffer", "data.hflip")
TRAINING = ("train_vqvae", "train_top_prior", "train_bottom_prior", "evaluate")  # evaluate: its classifiers
# Keys only prepare reads (which images, split and shard how): later stages depend on them through
# its shards, as on a model's settings through its model.pt
PREPARE_ONLY = ("data.source", "data.layout", "data.val_fraction", "data.shard_size", "data.max_side",
                "data.jpeg_quality")


def depends_on(stage: str, key: str, settings: Mapping[str, str] | None = None) -> bool:
    """Whether ``stage``'s outputs depend on the flat config key ``key``: of model.* those of
    ``MODEL_SETTINGS``, of ``TRAINING_ONLY`` the trainings', of ``PREPARE_ONLY`` prepare's, any
    other key. Given the flat ``settings`` they are made with: samples drawn with their own
    sample.seed never see the global seed."""
    if key == "seed" and stage == "sample" and settings is not None and settings.get("sample.seed", "None") != "None":
        return False
    if key in PREPARE_ONLY:
        return stage == "prepare"
    if key.startswith(TRAINING_ONLY):
        return stage in TRAINING
    if not key.startswith("model."):
        return True
    return any(key == f"model.{s}" or key.startswith(f"model.{s}.") for s in MODEL_SETTINGS.get(stage, ()))


def missing_inputs(cfg: DictConfig, stage: str) -> list[tuple[str, Path]]:
    """(producing stage, path) for each input of ``stage`` that is not on disk."""
    from pipeline.config import stage_dir

    needs = [(s, vqvae_model(cfg) if (s, rel) == ("train_vqvae", "model.pt") else stage_dir(cfg, s) / rel)
             for s, rel in NEEDS.get(stage, ())]  # a VQ-VAE named with encode.vqvae replaces train_vqvae's
    return [(s, p) for s, p in needs if not p.exists()]


def vqvae_model(cfg: DictConfig) -> Path:
    """The VQ-VAE whose codes this experiment's priors learn and whose decoder draws their samples:
    ``encode.vqvae`` when it is set, else the one `encode` recorded in codes.json as named
    explicitly, else this experiment's train_vqvae/model.pt (not recorded as a path, so a moved
    run_root keeps working)."""
    import json

    from pipeline.config import stage_dir
    from pipeline.data import codes

    if cfg.get("encode") is not None and cfg.encode.get("vqvae"):
        return Path(str(cfg.encode.vqvae)).expanduser().resolve()
    manifest = stage_dir(cfg, "encode") / "shards" / codes.MANIFEST
    external = json.loads(manifest.read_text()).get("vqvae_external") if manifest.exists() else None
    return Path(external) if external else stage_dir(cfg, "train_vqvae") / "model.pt"


@dataclass
class StageContext:
    stage: str
    stage_dir: Path       # ${run_root}/${experiment}/<stage>/
    run: StageRun         # MLflow run (no-op on ranks > 0)
    log: logging.Logger
    task: int = 0         # this array task's index (SLURM array jobs split work i, i+n, ...)
    tasks: int = 1        # number of array tasks


def stage_function(name: str) -> Callable[[DictConfig, StageContext], dict[str, Any]]:
    module, func = BUILT[name].split(":")
    return getattr(importlib.import_module(module), func)


# Stages whose outputs `verify=true` re-reads against their manifest instead of producing them.
VERIFIABLE = ("prepare", "encode", "sample")


def verify_outputs(ctx: StageContext, out_dir: Path,
                   check: Callable[..., tuple[int, list[str]]]) -> dict[str, Any]:
    """``verify=true``: run ``check(out_dir, task=, tasks=)`` on this array task's share of the
    shards, log every problem with its fix, fail if there is one. Produces nothing."""
    start = time.time()
    if not (out_dir / _manifest_name(ctx.stage)).exists():
        raise FileNotFoundError(f"{out_dir / _manifest_name(ctx.stage)}: stage={ctx.stage} has not finished "
                                f"(no manifest to verify against) -- run `submit stage={ctx.stage}` first")
    total, problems = check(out_dir, task=ctx.task, tasks=ctx.tasks)
    for p in problems:
        ctx.log.error("verify: %s", p)
    ctx.run.log_metrics({"verify_samples": total, "verify_problems": len(problems)}, step=ctx.run.attempt)
    if problems:
        raise RuntimeError(f"verify found {len(problems)} problem(s); first: {problems[0]}")
    ctx.log.info("verify: %d samples in %s match the manifest (%.1f s)", total, out_dir, time.time() - start)
    return {"verify_samples": total, "outputs": str(out_dir)}


def _manifest_name(stage: str) -> str:
    from pipeline.data import codes, shards

    return codes.MANIFEST if stage == "encode" else shards.MANIFEST
