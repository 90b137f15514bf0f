"""`submit cancel`: cancel the SLURM jobs of an experiment that are still queued or running.

A chain queued by `submit stage=all` is one job per stage; this finds them in the stage
directories (``jobs.json``) and cancels the queued ones with one ``scancel``, with those (and an
array's tasks) still in their sbatch script's setup lines. The running ones get SIGTERM alone
(``scancel --signal=TERM``: no SIGKILL after SLURM's KillWait), so a training saves a checkpoint at
its next step however long the save takes; one still running after ``cancel_grace_s`` is cancelled
outright. Submitted again, every stage resumes from its outputs (nothing is deleted). A stage
running in a local ``submit`` is named with how to stop it (this cannot reach that terminal).
"""

from __future__ import annotations

import subprocess
import time

from omegaconf import DictConfig

from pipeline.config import stage_dir, stage_name
from pipeline.launch import mlflow_runs, queue, records, stage_lock
from pipeline.stages import ORDER


# scancel's words for a job that ended between squeue and scancel
_GONE = ("Invalid job id", "already completing or completed")


def stages_of(cfg: DictConfig, stage: str | None) -> list[str]:
    """The stages ``submit cancel`` looks at: the one named, else those of the sample set named,
    else every stage of the experiment."""
    if stage:
        return [stage]
    if cfg.get("sample_set"):
        return ["sample", "evaluate"]
    return [s for s in ORDER if s != "all"]


def _tasks_in_setup_lines(job: str) -> tuple[list[str], list[str]] | None:
    """The job's running tasks (an array's ``JOB_TASK``, else ``JOB``) and those of them that run no
    ``srun`` step (``.0``) beside their batch script yet: still in the sbatch script's setup lines.
    None where squeue does not say (every task is then taken to run a step: SIGTERM, no hard cancel)."""
    try:
        tasks, steps = (subprocess.run(["squeue", "-h", *how, "-j", job, "-o", "%i"], capture_output=True,
                                       text=True, timeout=60) for how in (["-t", "RUNNING"], ["-s"]))
    except (OSError, subprocess.TimeoutExpired):
        return None
    if tasks.returncode or steps.returncode:
        return None
    stepped = {task for task, _, step in (line.rpartition(".") for line in steps.stdout.split()) if step.isdigit()}
    return tasks.stdout.split(), [task for task in tasks.stdout.split() if task not in stepped]


def cancel(cfg: DictConfig, stages: list[str]) -> tuple[list[str], int]:
    """Cancel the live jobs of ``stages``; (lines to print, jobs cancelled, -1 if scancel failed)."""
    live, lines = [], []
    sdirs = [stage_dir(cfg, stage) for stage in stages]
    for stage, sdir, job in zip(stages, sdirs, records.live_jobs(sdirs)):
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
    # a job (or an array's task) still in its sbatch script's setup lines has no step for SIGTERM to
    # reach (scancel signals steps only) and nothing to checkpoint: it goes at once with those not
    # running
    running, setup_tasks = [], {}
    for _, job, state in live:
        tasks = _tasks_in_setup_lines(job) if state == "RUNNING" else ([], [])
        if tasks is None or set(tasks[1]) != set(tasks[0]):
            running.append(job)
            setup_tasks[job] = tasks[1] if tasks else []
    others = [job for _, job, _ in live if job not in running]  # pending, configuring, suspended, ...
    # a running array's queued tasks go first (cancelling a task could start a throttled one), then
    # jobs not running and tasks in setup lines; running ones get SIGTERM alone, no SIGKILL after
    # KillWait: a training saves a checkpoint at its next step however long that takes
    calls = ((["--state=PENDING"], running), ([], others + sum(setup_tasks.values(), [])),
             (["--state=RUNNING", "--signal=TERM"], running))
    for how, jobs in calls:
        proc = subprocess.run(["scancel", *how, *jobs], capture_output=True, text=True, timeout=60) if jobs else None
        errors = [e for e in (proc.stderr.splitlines() if proc and proc.returncode else [])
                  if e.strip() and not any(gone in e for gone in _GONE)]  # ended meanwhile: nothing to do
        if errors:
            return lines + [f"  scancel {' '.join(how + jobs)} failed: {' '.join(errors)}"], -1
    deadline = time.time() + float(cfg.cancel_grace_s)
    for stage, job, before in live:
        now = queue.wait_for_job(job, poll_s=1.0, timeout_s=max(0.0, deadline - time.time()))
        if now is None:  # not stopped within cancel_grace_s: cancelled outright (SIGKILL after KillWait)
            subprocess.run(["scancel", job], capture_output=True, text=True, timeout=60)
            now = queue.wait_for_job(job, poll_s=1.0) or "UNKNOWN"
            how = f"{now.lower()} after cancel_grace_s={cfg.cancel_grace_s}"
        elif job in running:  # it ended on the SIGTERM (a stopped stage exits non-zero: FAILED)
            latest = stage_dir(cfg, stage) / "checkpoints" / "latest"
            saved = f", checkpoint at step {int(latest.read_text().strip()[5:])}" if latest.exists() else ""
            how = f"stopped{saved} (SLURM state {now})"
            if setup_tasks[job]:
                many = len(setup_tasks[job]) > 1
                how += (f"; task{'s' * many} {', '.join(setup_tasks[job])} cancelled in "
                        f"{'their' if many else 'its'} setup lines")
        elif before == "RUNNING":
            how = f"{now.lower()} (in its setup lines: no step had started)"
        else:
            how = now.lower()
        closed = mlflow_runs.close_after_job(stage_dir(cfg, stage), job, now, "submit cancel")
        how += f"; its MLflow run, left RUNNING, closed as {closed}" if closed else ""
        lines.append(f"  {stage_name(cfg, stage):<20}{job:<10}{before.lower()} -> {how}")
    return lines, len(live)
