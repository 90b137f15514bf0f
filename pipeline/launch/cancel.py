"""`submit cancel`: cancel the SLURM jobs of an experiment that are still queued or running.

A chain queued by `submit stage=all` is one job per stage; this finds them in the stage
directories (``jobs.json``) and cancels the live ones with one ``scancel``. A cancelled training
gets SIGTERM and checkpoints at its next step if SLURM's KillWait leaves it the time; submitted
again, every stage resumes from its outputs (nothing is deleted). A stage running in a local
``submit`` is named with how to stop it (this cannot reach that terminal).
"""

from __future__ import annotations

import subprocess

from omegaconf import DictConfig

from pipeline.config import stage_dir, stage_name
from pipeline.launch import records, stage_lock
from pipeline.stages import ORDER


def stages_of(cfg: DictConfig, stage: str | None) -> list[str]:
    """The stages ``submit cancel`` looks at: the one named, else those of the sample set named,
    else every stage of the experiment."""
    if stage:
        return [stage]
    if cfg.get("sample_set"):
        return ["sample", "evaluate"]
    return [s for s in ORDER if s != "all"]


def cancel(cfg: DictConfig, stages: list[str]) -> tuple[list[str], int]:
    """Cancel the live jobs of ``stages``; (lines to print, jobs cancelled, -1 if scancel failed)."""
    live, lines = [], []
    for stage in stages:
        sdir = stage_dir(cfg, stage)
        job = records.live_job(sdir)
        if job is not None:
            live.append((stage, *job))
        who = stage_lock.holder(sdir)
        if who not in (None, "?"):
            lines.append(f"  {stage_name(cfg, stage):<20}running here in {who}: not a SLURM job -- Ctrl-C "
                         "it in its terminal, or kill -INT the process (a training checkpoints first)")
    if not live:
        return lines + [f"  no SLURM job of experiment '{cfg.experiment}' is queued or running"
                        + (f" ({', '.join(stage_name(cfg, s) for s in stages)})"
                           if len(stages) < len(ORDER) - 1 else "")], 0
    ids = [job for _, job, _ in live]
    proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return lines + [f"  scancel {' '.join(ids)} failed: {(proc.stderr or proc.stdout).strip()}"], -1
    for stage, job, before in live:  # a training may still be saving its checkpoint (KillWait bounds it)
        now = records.wait_for_job(job, poll_s=1.0)
        lines.append(f"  {stage_name(cfg, stage):<20}{job:<10}{before.lower()} -> {now.lower()}")
    return lines, len(live)
