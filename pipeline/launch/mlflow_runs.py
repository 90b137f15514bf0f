"""A stage's MLflow run seen from the launcher: its status for `submit status`, and closing a run
that a killed stage left RUNNING.

A stage's rank 0 closes its MLflow run as it ends (FINISHED, FAILED, KILLED), unless it is killed
first: out of memory, a node failure, `kill -9`, a cancel past ``cancel_grace_s``, or SLURM ending
the job when another rank failed (``cluster.kill_on_bad_exit``; a rank 0 blocked in a collective
or a rendezvous never runs its signal handler). The MLflow UI would show that run as running for
ever. Whoever next learns that the stage's process is gone (`submit status`, `submit cancel`,
``wait=true``) closes the run: the status the end deserves, the time it ended, an
``execution.<n>.ended`` tag saying how, and the error another rank recorded (the cause) as
``error`` and ``execution.<n>.error``. A resumed stage reopens the same run, as after any other
end; where nobody closed it, the resume records the killed execution's end (``tracking.StageRun``).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from pipeline.launch import accounting, failures, local_store
from pipeline.tracking import RUN_FILE

log = logging.getLogger("pipeline")

# SLURM's states of a job that ended unfinished -> the MLflow status its run is closed with: KILLED
# where it was stopped from outside (a resubmit resumes it), FAILED where it broke
_CLOSED_AS = {"CANCELLED": "KILLED", "PREEMPTED": "KILLED", "TIMEOUT": "KILLED", "DEADLINE": "KILLED",
              "FAILED": "FAILED", "OUT_OF_MEMORY": "FAILED", "NODE_FAIL": "FAILED", "BOOT_FAIL": "FAILED"}


@lru_cache(maxsize=None)
def away(uri: str) -> str | None:
    """Why the tracking server does not answer (None: it does), asked once per command."""
    from pipeline.mlflow_outbox import reachable

    return reachable(uri, timeout=3.0)


def status(sdir: Path) -> tuple[str, str]:
    """The stage's run id and MLflow status ('' and '' before its first run; UNKNOWN where the
    store does not answer)."""
    record = _record(sdir)
    if record is None:
        return "", ""
    if away(record["tracking_uri"]):  # MLflow would retry for minutes per stage
        return record["run_id"], "UNKNOWN"
    seen = local_store.run_status(record["tracking_uri"], record["run_id"])  # False: not a local store
    if seen is not False:
        return record["run_id"], seen or "UNKNOWN"
    try:
        from mlflow.tracking import MlflowClient

        return record["run_id"], MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).info.status
    except Exception:  # noqa: BLE001 - an unreachable server must not break the status table
        return record["run_id"], "UNKNOWN"


def _record(sdir: Path) -> dict | None:
    try:
        return json.loads((Path(sdir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _close(sdir: Path, record: dict, status: str, tags: dict[str, str], end_ms: int | None) -> bool:
    """Close the run with ``status`` if it is still RUNNING; True if this call closed it."""
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_outbox import OUTBOX

    if (Path(sdir) / OUTBOX).exists():  # the stage ended, its records (its end too) wait to be sent
        return False
    if away(record["tracking_uri"]):  # MLflow would retry for minutes
        return False
    client = MlflowClient(record["tracking_uri"])
    try:
        if client.get_run(record["run_id"]).info.status != "RUNNING":
            return False
        for key, value in tags.items():
            client.set_tag(record["run_id"], key, value[:5000])
        client.set_terminated(record["run_id"], status, end_time=end_ms)
    except Exception as e:  # noqa: BLE001 - a store that fails now must not break status or cancel
        log.warning("could not close MLflow run %s: %s", record["run_id"], e)
        return False
    return True


def close_after_job(sdir: Path, job: str, state: str, by: str) -> str:
    """The stage's SLURM ``job`` has ended in ``state`` (from accounting): where its run, opened by
    that job, is still RUNNING, close it. Returns the status it closed the run with, '' if none."""
    status, record = _CLOSED_AS.get(state), _record(sdir)
    if not status or not record or record.get("slurm_job") != job:  # not opened by this job
        return ""
    execution = f"execution.{record.get('attempts', 1)}"  # the one that opened it: a resume adds one
    tags = {f"{execution}.ended": f"SLURM job {job} ended {state} before the stage could close this run "
                                  f"(closed by {by})"}
    cause = failures.recorded(sdir, job)
    if cause:  # where a stage's own failure puts it (tracking.StageRun, launch.jobs)
        tags["error"] = tags[f"{execution}.error"] = (
            f"{cause['error']} ({', '.join(filter(None, [cause['where'], cause['time']]))})")
    return status if _close(sdir, record, status, tags, accounting.end_ms(job)) else ""


def close_after_crash(sdir: Path, by: str) -> str:
    """The stage ran here and no process holds its lock any more, yet its run is RUNNING: its
    process was killed (SIGKILL, out of memory). Closes the run FAILED, ending when the stage's
    last log was written; returns 'FAILED', or '' if it closed nothing."""
    record = _record(sdir)
    if not record or record.get("slurm_job"):
        return ""
    logs = [p.stat().st_mtime for p in Path(sdir).glob("logs/*.log")]
    end_ms = int(max(logs) * 1000) if logs else None
    tags = {f"execution.{record.get('attempts', 1)}.ended": "the process running the stage on this machine ended "
            f"without closing this run (killed: SIGKILL, out of memory?); closed by {by}"}
    return "FAILED" if _close(sdir, record, "FAILED", tags, end_ms) else ""
