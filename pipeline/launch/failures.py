"""Why a stage failed, kept where `submit status` finds it: when a stage raises, its process writes
``failed.json`` into the stage directory (the error, its log, the SLURM job, which task and rank)
and the traceback into the stage's log; status prints them for every failed stage, with the job's
SLURM output folder, so nobody digs through job folders to learn what went wrong."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import atomic

FAILED = "failed.json"


def slurm_job() -> str:
    """The SLURM job this stage runs as (an array's own id, as ``jobs.json`` holds it)."""
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""


def log_traceback(handler: logging.Handler, stage: str) -> None:
    """The exception being handled, with its traceback, into the stage's log file alone (the
    terminal gets submit's one-line error; the log is what status points to)."""
    handler.handle(logging.getLogger("pipeline").makeRecord(
        "pipeline", logging.ERROR, __file__, 0, "stage %s failed", (stage,), sys.exc_info()))
    handler.flush()


def message(error: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def record(sdir: Path, error: BaseException, log_file: Path, where: str, job: str) -> None:
    """``job``: the SLURM job the stage runs as, '' for a run in `submit`'s own process."""
    atomic.write_json(Path(sdir) / FAILED, {"error": message(error), "log": str(log_file), "job": job,
                                            "where": where, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def forget_earlier(sdir: Path, job: str) -> None:
    """At a run's start: an earlier run's failure is not this one's. A record of this same SLURM job
    stays (an array task that failed before task 0 started, or the attempt before a requeue)."""
    rec = recorded(sdir, job)
    if rec is None or not job:
        (Path(sdir) / FAILED).unlink(missing_ok=True)


def recorded(sdir: Path, job: str) -> dict | None:
    """The failure this job (``''``: a run on this machine) recorded, if it recorded one."""
    try:
        rec = json.loads((Path(sdir) / FAILED).read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("job", "") == job else None


def lines(sdir: Path, job: str, since: float = 0.0) -> list[str]:
    """What status prints under a failed stage: the error this job recorded (none where SLURM ended
    it: out of memory, time limit, node failure), the stage's log (when the job recorded none, the
    latest written after ``since``, the job's submission: a job cancelled before it started wrote
    none) and the job's SLURM output folder (the tasks' stdout and stderr)."""
    sdir = Path(sdir)
    rec = recorded(sdir, job)
    if rec:
        log = rec["log"]
    else:
        written = {p: p.stat().st_mtime for p in sdir.glob("logs/*.log")}
        log = str(max((p for p, t in written.items() if t >= since), key=written.get, default=""))
    out = [f"log:  {log}"] if log else []
    folder = sdir / "slurm" / job if job else None  # submitit makes it at submission, logs at the start
    out += [f"SLURM output of job {job}: {folder}/"] if folder and any(folder.glob("*_log.*")) else []
    if rec:
        return [f"{rec['error']} ({', '.join(filter(None, [rec['where'], rec['time']]))})"] + out
    # ended from outside (out of memory, time limit, a signal) or never started (nothing to show)
    return ["the stage recorded no error: it was ended from outside (see the state, the log's end)"] + out if out else []
