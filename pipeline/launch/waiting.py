"""`wait=true` on SLURM: block until a stage's job (or a chain's jobs) ends and say how it ended:
each distinct error once, the failed stage's log, a run its killed rank 0 left RUNNING closed. A
job that will never start by itself is named with the fix, the running stage's progress is said
every ``wait_report_min``; Ctrl-C ends the wait, not the jobs."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config import stage_dir, stage_name
from pipeline.launch import accounting, failures, mlflow_runs, queue, records
from pipeline.launch.chain import key_metric


def wait_for_stage(cfg: DictConfig, stage: str, jobs: list[Any]) -> int:
    """Wait for a stage's submitit jobs (an array's tasks); 0 when every task completed, 1 when one
    failed (said), 130 on Ctrl-C."""
    job_id, sdir = jobs[0].job_id.split("_")[0], stage_dir(cfg, stage)
    failed: dict[str, list[str]] = {}  # error -> the array tasks that raised it
    progress = SayProgress(60 * float(cfg.wait_report_min))
    progress.watch(stage_name(cfg, stage), job_id, sdir)
    with queue.QueueWatch([job_id], _still_waiting) as watch, progress:
        for job in jobs:
            try:
                results(job, watch)  # every task of the job (one per rank)
            except KeyboardInterrupt:
                return _stopped_waiting(cfg, stage)
            except Exception as e:  # noqa: BLE001 - report every task's failure, then the status
                failed.setdefault(_error_line(e), []).append(job.job_id)
    for error, ids in failed.items():  # 32 tasks failing alike: one line
        which = ids[0] if len(ids) == 1 else f"{', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''} ({len(ids)} tasks)"
        print(f"submit: job {which} failed: {error}", file=sys.stderr)
    if failed:  # the stage's own log, with the traceback
        print(f"submit: stage {stage} failed{failures.failure_log([sdir], job_id)}{_close_left_run(sdir, job_id)}",
              file=sys.stderr)
        return 1
    return 0


def wait_for_chain(cfg: DictConfig, cfgs: dict[str, DictConfig], rows: list[dict]) -> int:
    """Wait for a queued chain's jobs, in stage order, saying each stage done as the wait reaches it
    (a chain can take days: the command is not silent until its end); 0 when all completed, 1 at the
    first that did not (said: the jobs depending on it are cancelled by SLURM), 130 on Ctrl-C."""
    start, queued = time.time(), [r for r in rows if r["job"]]
    progress = SayProgress(60 * float(cfg.wait_report_min))
    with queue.QueueWatch([r["job"] for r in queued], _still_waiting) as watch, progress:
        for i, r in enumerate(queued, 1):
            progress.watch(stage_name(cfg, r["stage"]), r["job"], stage_dir(cfgs[r["stage"]], r["stage"]))
            try:
                error, state = _chain_job_error(r, watch)
            except KeyboardInterrupt:
                return _stopped_waiting(cfg, None)
            progress.forget()
            if error:
                sdir = stage_dir(cfgs[r["stage"]], r["stage"])
                log = failures.failure_log([sdir], r["job"]) + _close_left_run(sdir, r["job"], state)
                print(f"submit: stage {r['stage']} {error}{log}", file=sys.stderr)
                return 1
            metric = key_metric(cfgs[r["stage"]], r["stage"])
            print(f"  done:    {stage_name(cfg, r['stage'])} (job {r['job']}), {i} of {len(queued)}, "
                  f"{records.duration(time.time() - start)} into the wait{': ' + metric if metric else ''}",
                  flush=True)
    return 0


def results(job: Any, watch: queue.QueueWatch) -> list[Any]:
    """A submitit job's ``results()``, as soon as SLURM has ended the job. submitit learns that a task
    ended without a result file (out of memory, a node lost, scancel, kill_on_bad_exit) only from
    sacct, which its shared watcher asks at most every 10 minutes once its newest job has run 20:
    such a failure would be said up to 10 minutes late. Here sacct is asked as soon as ``watch`` (which
    watches the job's array id) has seen the job leave the queue, and again every ``watch.every_s``
    while accounting lags."""
    array_job, next_check = job.job_id.split("_")[0], 0.0
    while not job.done():
        if watch.left(array_job) and time.time() >= next_check:
            if job.done(force_check=True):
                break
            next_check = time.time() + watch.every_s
        time.sleep(1)
    return job.results()


class SayProgress:
    """While `wait=true` blocks: every ``every_s`` seconds, the watched stage's progress from its
    stage dir (``  running: train_vqvae (job 18): step 1200 of 5000 (24%), 3.1 steps/s, ETA ...``),
    said only when its position (step, shards complete) moved since the last look: a wait of hours
    on one training is not silent, and a stage not started yet (or one whose progress file is left
    from before a requeue) says nothing. ``every_s`` 0: never."""

    def __init__(self, every_s: float, say: Callable[[str], None] | None = None) -> None:
        self.every_s, self.say = every_s, say or (lambda line: print(line, flush=True))
        self._watched: tuple[str, str, Path] | None = None
        self._last = ""
        self._lock = threading.Lock()  # a look in flight ends before the watched stage changes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="say-progress", daemon=True)

    def watch(self, name: str, job: str, sdir: Path) -> None:
        """Say this stage's progress from now on; what its dir shows now is the start, not news."""
        with self._lock:
            self._last, self._watched = _position(records.progress_line(sdir)), (name, job, sdir)

    def forget(self) -> None:
        """The watched stage ended: nothing more is said of it (its "done" line comes after)."""
        with self._lock:
            self._watched = None

    def look(self) -> None:
        """Say the watched stage's progress if its position moved since the last look."""
        with self._lock:
            if self._watched is None:
                return
            name, job, sdir = self._watched
            line = records.progress_line(sdir)
            if line and _position(line) != self._last:
                self._last = _position(line)
                self.say(f"  running: {name} (job {job}): {line}")

    def __enter__(self) -> SayProgress:
        if self.every_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.look()


def _position(progress_line: str) -> str:
    """How far a stage is, without its rate or age: ``step 1200 of 5000 (24%)``, ``shards 12 of 40 (30%)``."""
    return re.split(r"[,;]", progress_line, maxsplit=1)[0]


def _still_waiting(line: str) -> None:
    print(f"submit: still waiting: {line} (Ctrl-C stops the wait; the job stays queued)", file=sys.stderr, flush=True)


def _stopped_waiting(cfg: DictConfig, stage: str | None) -> int:
    """Ctrl-C while `wait=true` waits on SLURM: the jobs are the cluster's, they go on."""
    where = records.experiment_args(cfg)
    print(f"\nsubmit: stopped waiting (Ctrl-C); the SLURM jobs go on\n  watch:   submit status {where}\n"
          f"  stop:    submit cancel {f'stage={stage} ' if stage else ''}{where}   # a training saves a "
          "checkpoint first", file=sys.stderr)
    return 130


def _close_left_run(sdir: Path, job: str, state: str | None = None) -> str:
    """A failed job whose rank 0 was killed left its MLflow run RUNNING: close it (a line saying so).
    ``state``: the job's final state where the caller has it from accounting already."""
    if state is None:  # submitit said it failed: the job may not have left the queue yet
        state = queue.wait_for_job(job, poll_s=2.0, timeout_s=60) or ""
    closed = mlflow_runs.close_after_job(sdir, job, state, "submit wait=true")
    return f"\n  MLflow:  the run was left RUNNING by job {job} ({state}): closed as {closed}" if closed else ""


def _error_line(e: Exception) -> str:
    """The error a failed job raised, from submitit's report: its traceback's last line (the report
    ends with a list of the job's output files)."""
    lines = [line.strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("- ", "---", "You can check"))]
    return lines[-1] if lines else type(e).__name__


def _chain_job_error(row: dict, watch: queue.QueueWatch) -> tuple[str | None, str | None]:
    """Wait for a queued chain row's job(s) to end: (None if they completed, else what went wrong;
    the job's final state where accounting was asked)."""
    if row.get("live"):  # queued by an earlier command: no submitit handle, only its state
        watch.wait_left(row["job"])
        state = accounting.ended_state(row["job"])
        return (None if state == "COMPLETED" else f"(job {row['job']}) ended {state}"), state
    for job in row.get("jobs", []):
        try:
            results(job, watch)  # every task of the job (one per rank)
        except Exception as e:  # noqa: BLE001
            return f"(job {job.job_id}) failed: {_error_line(e)}", None
    return None, None
