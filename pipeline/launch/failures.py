"""Why a stage failed, kept where `submit status` finds it: when a stage raises, its process writes
``failed.json`` into the stage directory (the error, its log, the SLURM job, which task and rank)
and the traceback into the stage's log; status prints them for every failed stage, with the job's
SLURM output folder, so nobody digs through job folders to learn what went wrong. Where several
ranks or tasks fail, the first error is the one shown, the later ones below it."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from pipeline import atomic

FAILED = "failed.json"


def slurm_job() -> str:
    """The SLURM job this stage runs as (an array's own id, as ``jobs.json`` holds it)."""
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""


def restart() -> str:
    """Which execution of its SLURM job this is (a requeue runs again under the same id); '0' here."""
    return os.environ.get("SLURM_RESTART_COUNT", "0")


def log_traceback(handler: logging.Handler, stage: str) -> None:
    """The exception being handled, with its traceback, into the stage's log file alone (the
    terminal gets submit's one-line error; the log is what status points to)."""
    handler.handle(logging.getLogger("pipeline").makeRecord(
        "pipeline", logging.ERROR, __file__, 0, "stage %s failed", (stage,), sys.exc_info()))
    handler.flush()


def message(error: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters: a longer one loses its middle, as
    errors tend to say what went wrong first and the fix last (the whole is in the stage's log)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else f"{text[:196]} [...] {text[-97:]}"


ALSO_KEPT = 8  # later failures of the same execution listed beside the first


def record(sdir: Path, error: BaseException, log_file: Path, where: str, job: str) -> None:
    """``job``: the SLURM job the stage runs as, '' for a run in `submit`'s own process.

    The cause of an execution's failure is kept first: when one rank fails, the others stop after
    it (on a failed collective, or told by an agreement: ``OtherRankFailed``), and those errors only
    echo it. So the first error is kept unless it is such an echo and this one is not; the others
    (other ranks, other array tasks) are listed under ``also``. Two writers at the same instant may
    lose one of those lines. A SLURM requeue is a new execution."""
    import torch.distributed as dist

    from pipeline.training.distributed import OtherRankFailed

    now = time.strftime("%Y-%m-%d %H:%M:%S")
    this = {"error": message(error), "log": str(log_file), "job": job, "restart": restart(), "where": where,
            "time": now, "echo": isinstance(error, (OtherRankFailed, dist.DistError))}
    first = recorded(sdir, job)
    if first is not None and first.get("restart", "0") == this["restart"]:
        if first.get("echo") and not this["echo"]:  # the cause came second
            first, this = this, first
        also = first.pop("also", []) + this.pop("also", [])
        also.append({k: this[k] for k in ("error", "where", "log", "time", "echo")})
        first["also"] = sorted(also, key=lambda a: a["time"])[:ALSO_KEPT]
        this = first
    atomic.write_json(Path(sdir) / FAILED, this)


def other_rank_failed(sdir: Path, job: str, stop: BaseException, world_size: int) -> str | None:
    """Why a rank was told to stop, where that was another rank's failure: SLURM (with
    cluster.kill_on_bad_exit) and torchrun end a job's other ranks with SIGTERM once one fails,
    which that rank recorded first. '<where> failed: <error>', or None for a stop asked for (submit
    cancel, scancel, a preemption's SIGUSR2, Ctrl-C)."""
    if world_size == 1 or getattr(stop, "signum", signal.SIGTERM) != signal.SIGTERM:
        return None
    cause = recorded(sdir, job)
    if cause is None or cause.get("echo") or cause.get("restart", "0") != restart():
        return None
    return f"{cause['where']} failed: {cause['error']}"


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
        def said(r: dict) -> str:
            return f"{r['error']} ({', '.join(filter(None, [r['where'], r['time']]))})"
        return [said(rec)] + out + [f"then: {said(a)}" for a in rec.get("also", [])]
    # ended from outside (out of memory, time limit, a signal) or never started (nothing to show)
    return ["the stage recorded no error: it was ended from outside (see the state, the log's end)"] + out if out else []


def failure_log(sdirs: list[Path], job: str = "") -> str:
    """A line naming the log (with the traceback) of the stage that just failed: in this process
    (``job`` ''), or as that SLURM job. Where other ranks stopped because one failed, a line before
    it names that rank's error, the cause: the error shown beside may only echo it (rank 0's)."""
    recs = [r for r in (recorded(d, job) for d in sdirs) if r]
    if not recs:
        return ""
    rec = max(recs, key=lambda r: r["time"])
    echoed = not rec.get("echo") and any(a.get("echo") for a in rec.get("also", []))
    cause = f"\n  cause:   {rec['error']} ({rec['where']})" if echoed else ""
    return f"{cause}\n  log:     {rec['log']}"
