"""`submit stage=all`: every built stage in pipeline order, skipping those already done.

Locally the stages run one after the other in this process. On SLURM the whole chain is queued at
once, each job depending (``afterok``) on the jobs that produce its inputs, with ``--kill-on-invalid-dep=yes`` so a
failed stage cancels everything after it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.config import (GROUPS, OPEN_DICTS, ConfigError, compose, split_stage_scoped, stage_dir, stage_name,
                             unknown_key_fix)
from pipeline.config_checks import validate
from pipeline.launch import accounting, executors, records
from pipeline.stages import BUILT, DONE, NEEDS, ORDER


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether ``cfg`` has the key, or a mapping of the user's keys (OPEN_DICTS) it would go into."""
    dotted = dotted.lstrip("+~")
    if any(dotted.startswith(d + ".") and _has_key(cfg, d) for d in OPEN_DICTS):
        return True
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    return isinstance(node, DictConfig) and leaf in list(node.keys())  # `in` is False for ??? values


def compose_all(overrides: list[str]) -> dict[str, DictConfig]:
    """One validated config per built stage. An override applies to the stages that have its key
    (``train.max_steps=...`` to the training stages only); one that no stage has is an error."""
    rest, scoped = split_stage_scoped([o for o in overrides if o.partition("=")[0] != "stage"])
    groups = [o for o in rest if o.partition("=")[0] in GROUPS]
    cfgs: dict[str, DictConfig] = {}
    used: set[str] = set()
    for stage in [s for s in ORDER if s in BUILT]:
        probe = compose([f"stage={stage}", *groups])
        mine = [o for o in rest if o in groups or _has_key(probe, o.partition("=")[0])]
        used.update(mine)
        own = scoped.pop(stage, [])  # after the others: `train_top_prior:train.lr=` wins over `train.lr=`
        for o in own:
            key = o.partition("=")[0].lstrip("+~")
            if not _has_key(probe, key):
                raise ConfigError(f"{stage}:{key}", f"stage={stage} has no such key",
                                  unknown_key_fix(key, [*groups, f"stage={stage}"]))
        cfgs[stage] = compose([f"stage={stage}", *mine, *own])
        validate(cfgs[stage])
    for stage, own in scoped.items():  # a stage with a config file but no implementation
        raise ConfigError(f"{stage}:{own[0].partition('=')[0]}", f"stage={stage} is not run by stage=all",
                          f"stages: {', '.join(cfgs)}")
    for o in rest:
        if o not in used:
            key = o.partition("=")[0].lstrip("+~")
            raise ConfigError(key, "no such config key in any stage", unknown_key_fix(key, overrides))
    return cfgs


def stages_to_run(cfgs: dict[str, DictConfig]) -> tuple[list[str], list[str], list[str]]:
    """(to run, already done, not needed) in pipeline order. A VQ-VAE named with ``encode.vqvae``
    replaces this experiment's: train_vqvae is then not needed (every later stage uses that one)."""
    cfg = next(iter(cfgs.values()))
    chain = [s for s in ORDER if s in BUILT]
    done = [s for s in chain if (stage_dir(cfg, s) / DONE).exists()]
    skip = ["train_vqvae"] if "encode" in cfgs and cfgs["encode"].encode.vqvae and "train_vqvae" not in done else []
    return [s for s in chain if s not in done and s not in skip], done, skip


def done_with_other_settings(cfgs: dict[str, DictConfig], done: list[str]) -> list[str]:
    """The done stages whose recorded config differs from what this command asks of them, one line
    each (``train_top_prior: model.top_prior.layers=6 there, 8 now``): a chain does not run a done
    stage again, so those settings would go unused without a word."""
    lines = []
    for stage in done:
        changed = records.settings_changed(cfgs[stage], stage)
        if changed:
            lines.append(f"{stage_name(cfgs[stage], stage)}: {changed}")
    return lines


# The number that says whether each stage worked, from its summary (done.json).
KEY_METRICS: dict[str, Callable[[dict[str, Any]], str]] = {
    "prepare": lambda s: f"{s['images']} images, {s['images_skipped']} skipped",
    "train_vqvae": lambda s: f"val PSNR {s['val_psnr']:.1f} dB",
    "encode": lambda s: f"{s['codes']} code maps",
    "train_top_prior": lambda s: f"val {s['val_bits_per_code']:.3f} bits/code",
    "train_bottom_prior": lambda s: f"val {s['val_bits_per_code']:.3f} bits/code",
    "sample": lambda s: f"{s['samples']} samples",
    "evaluate": lambda s: (f"FID {s['fid']:.3g} ({s['fid'] / max(s['fid_real_train'], 1e-12):.2f}x real), "
                           f"CAS {s['cas_top1']:.3f} ({s['cas_top1'] / max(s['real_top1'], 1e-12):.2f}x real)"),
}


def key_metric(cfg: DictConfig, stage: str) -> str:
    """The stage's key metric from its done.json; '' where the summary lacks it (an older run)."""
    try:
        summary = json.loads((stage_dir(cfg, stage) / DONE).read_text())["summary"]
        return KEY_METRICS[stage](summary)
    except (OSError, KeyError, ValueError, TypeError):
        return ""


def run_local(cfgs: dict[str, DictConfig]) -> list[dict[str, Any]]:
    cfg = next(iter(cfgs.values()))
    todo, done, skip = stages_to_run(cfgs)
    rows = [{"stage": s, "status": "already done", "seconds": None, "outputs": str(stage_dir(cfg, s))}
            for s in done]
    rows += [{"stage": s, "status": "not needed", "seconds": None, "outputs": f"encode.vqvae={cfgs['encode'].encode.vqvae}"}
             for s in skip]
    for stage in todo:
        start = time.time()
        result = executors.run(cfgs[stage], stage)
        rows.append({"stage": stage, "status": "done", "seconds": time.time() - start,
                     "outputs": result["stage_dir"], "run_id": result["run_id"]})
    return _with_metrics(cfg, rows)


def _with_metrics(cfg: DictConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r["metric"], r["name"] = key_metric(cfg, r["stage"]), stage_name(cfg, r["stage"])
    return sorted(rows, key=lambda r: ORDER.index(r["stage"]))


def slurm_summary_rows(cfgs: dict[str, DictConfig], queued: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `summary_table` for a chain whose SLURM jobs have all finished: wall time from
    accounting (a job array: its longest task; a requeued job: all its runs)."""
    cfg = next(iter(cfgs.values()))
    rows = []
    for r in queued:
        if r["status"].startswith("not needed"):
            row = {"status": "not needed", "seconds": None, "outputs": f"encode.vqvae={cfgs['encode'].encode.vqvae}"}
        else:
            row = {"status": "already done" if r["status"] == "already done" else "done",
                   "seconds": accounting.elapsed_s(r["job"]) if r["job"] else None,
                   "outputs": str(stage_dir(cfg, r["stage"]))}
        rows.append({"stage": r["stage"], **row})
    return _with_metrics(cfg, rows)


def summary_table(rows: list[dict[str, Any]], total_seconds: float) -> str:
    """The lines `stage=all` ends with: stage, wall time, key metric, outputs."""
    words = {"already done": "done before", "not needed": "not needed"}
    walls = [words.get(r["status"]) or ("?" if r["seconds"] is None else records.duration(r["seconds"])) for r in rows]
    total = records.duration(total_seconds)
    # Right-aligned, so the column is as wide as its longest entry ("done before" is 11).
    wall_width = max(len(w) for w in walls + [total, "wall time"])
    width = max([len(r["metric"]) for r in rows] + [10])
    lines = [f"  {'stage':<20}{'wall time':>{wall_width}}  {'key metric':<{width}}  outputs"]
    for r, wall in zip(rows, walls):
        lines.append(f"  {r['name']:<20}{wall:>{wall_width}}  {r['metric']:<{width}}  {r['outputs']}")
    lines.append(f"  {'total':<20}{total:>{wall_width}}")
    return "\n".join(lines)


class ChainRefused(Exception):
    """sbatch refused one stage's job (``refused``); ``queued``: the rows of the jobs this command
    queued before it (left in the queue: the chain submitted again queues the rest after them)."""

    def __init__(self, refused: executors.JobRefused, queued: list[dict[str, Any]]) -> None:
        super().__init__(str(refused))
        self.refused, self.queued = refused, queued


def submit_slurm(cfgs: dict[str, DictConfig], args: list[str]) -> list[dict[str, Any]]:
    """Queue every stage to run at once, each depending on the jobs that produce its inputs (so the
    two priors run side by side after encode), recording ``args`` as the command of each stage it
    queues. Raises ChainRefused where sbatch refuses a job."""
    cfg = next(iter(cfgs.values()))
    todo, done, skip = stages_to_run(cfgs)
    rows = [{"stage": s, "status": "already done", "job": ""} for s in done]
    rows += [{"stage": s, "status": "not needed (encode.vqvae)", "job": ""} for s in skip]
    queued: dict[str, str] = {}
    # every stage's queue state before anything is queued: a squeue that fails (SlurmUnavailable)
    # stops the chain with nothing of it submitted
    lives = dict(zip(todo, records.live_jobs([stage_dir(cfg, stage) for stage in todo])))
    for stage in todo:
        after = sorted({queued[p] for p, _ in NEEDS.get(stage, ()) if p in queued}, key=int)
        live = lives[stage]
        if live:  # queued by an earlier command: depend on it rather than run the stage twice at once
            queued[stage] = live[0]
            rows.append({"stage": stage, "status": f"already {live[1].lower()}", "job": live[0], "live": True})
            continue
        try:
            jobs = executors.submit_slurm(cfgs[stage], stage, dependency=after, kill_on_invalid_dep=True)
        except executors.JobRefused as e:
            raise ChainRefused(e, [r for r in rows if "jobs" in r]) from None
        queued[stage] = jobs[0].job_id.split("_")[0]
        records.add_job(stage_dir(cfg, stage), queued[stage])
        records.record_command(stage_dir(cfg, stage), args)
        rows.append({"stage": stage, "status": "queued" + (f" after {','.join(after)}" if after else ""),
                     "job": queued[stage], "jobs": jobs})
    return rows
