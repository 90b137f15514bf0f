"""SLURM accounting (``sacct``): a finished job's state, run time and end, which ``squeue`` forgets
once the job leaves the queue. One place asks sacct and parses its answer; where accounting is
disabled or slurmdbd does not answer, callers get why (states) or None (times) and carry on."""
from __future__ import annotations

import subprocess
import time

LIVE = ("RUNNING", "REQUEUED", "PENDING", "COMPLETING")
_FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


def rows(job_id: str, fields: str, every_run: bool = False) -> list[list[str]] | str:
    """sacct's rows (one per job, or per array task) with the comma-separated ``fields``, or why it
    did not answer. ``every_run``: also the earlier runs of a requeued job (``-D``), else its last."""
    cmd = ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", fields] + (["-D"] if every_run else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except OSError as e:
        return str(e)
    except subprocess.TimeoutExpired:
        return "no answer in 30 s"
    if proc.returncode:  # its last line says why (slurmdbd unreachable, accounting disabled, ...)
        return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return [line.split("|") for line in proc.stdout.splitlines() if line.strip()]


def states(job_id: str) -> list[str] | str:
    """The job's (an array's tasks') states, or why sacct did not answer. A state is its first word:
    sacct writes ``CANCELLED by <uid>``."""
    answer = rows(job_id, "State")
    if isinstance(answer, str):
        return answer
    return [row[0].split()[0] for row in answer if row[0].strip()]


def ended_states(job_id: str, tries: int, pause_s: float) -> list[str] | str:
    """``states`` of a job squeue no longer holds: slurmdbd learns of a job's end after squeue
    forgets it, so while sacct still calls the job live it is asked again, up to ``tries`` times
    ``pause_s`` apart (still live after that: its last answer)."""
    for attempt in range(tries):
        if attempt:
            time.sleep(pause_s)
        job_states = states(job_id)
        if worst(job_states) not in LIVE:
            break
    return job_states


def ended_state(job_id: str, pause_s: float = 5.0) -> str:
    """``worst`` of ``ended_states``, asked up to 12 times: the final state of a job squeue has
    just said is gone."""
    return worst(ended_states(job_id, tries=12, pause_s=pause_s))


def worst(job_states: list[str] | str) -> str:
    """One state for a job from its tasks' states (``states``): a failure if any task failed, else
    any live state; UNKNOWN where sacct did not answer."""
    if isinstance(job_states, str):
        return "UNKNOWN"
    for state in _FAILED + LIVE:
        if state in job_states:
            return state
    return job_states[0] if job_states else "UNKNOWN"


def state(job_id: str) -> str:
    """The job's state (an array's worst task state); UNKNOWN where sacct does not answer."""
    return worst(states(job_id))


def elapsed_s(job_id: str) -> float | None:
    """A finished job's run time, summed over its runs (a preempted or timed-out job requeued runs
    again under the same id); an array: its longest task. None if unknown."""
    answer = rows(job_id, "JobID,ElapsedRaw", every_run=True)
    per_task: dict[str, int] = {}
    for task, seconds in ([] if isinstance(answer, str) else answer):
        if seconds.isdigit():
            per_task[task] = per_task.get(task, 0) + int(seconds)
    return float(max(per_task.values())) if per_task else None


def end_ms(job_id: str) -> int | None:
    """When the job ended (an array: its last task), in ms since the epoch; None if unknown.
    sacct writes the cluster's local time, as ``time.mktime`` reads it."""
    answer = rows(job_id, "End")
    ends = []
    for (word,) in ([] if isinstance(answer, str) else answer):
        try:
            ends.append(time.mktime(time.strptime(word, "%Y-%m-%dT%H:%M:%S")))
        except ValueError:  # "Unknown": a task not ended
            continue
    return int(max(ends) * 1000) if ends else None
