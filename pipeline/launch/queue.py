"""SLURM's queue (squeue): whether a job is still in it, waiting for it to leave, and why a pending
job waits. A queue that cannot answer is never taken for an empty one (SlurmUnavailable)."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable

from pipeline.launch import accounting

log = logging.getLogger(__name__)


class SlurmUnavailable(RuntimeError):
    """squeue did not answer whether a job is queued (the controller unreachable or timing out):
    a caller must not take it for "gone", or it would run the stage a second time beside the job."""


# squeue's words for "no SLURM configured here": nothing can be in its queue
_NO_SLURM = ("Could not establish a configuration source", "Unable to process configuration file")


def queue_state(job_id: str, tries: int = 2, pause_s: float = 5.0) -> str | None:
    """The job's state while it is in the queue (an array: RUNNING if a task runs); None once it has
    left (the controller says "Invalid job id" for a job it no longer holds) or where no SLURM is
    set up. Raises SlurmUnavailable when squeue fails otherwise ``tries`` times."""
    return queue_states([job_id], tries, pause_s)[job_id]


def queue_states(job_ids: list[str], tries: int = 2, pause_s: float = 5.0) -> dict[str, str | None]:
    """``queue_state`` of each job, all in one squeue call."""
    return {job: _job_state(tasks) for job, tasks in _queued_tasks(job_ids, tries, pause_s).items()}


def _job_state(tasks: list[tuple[str, str]]) -> str | None:
    states = [state for state, _ in tasks]
    return ("RUNNING" if "RUNNING" in states else states[0]) if states else None


def _pending_reason(tasks: list[tuple[str, str]]) -> str:
    return next((reason for state, reason in tasks if state == "PENDING" and reason != "None"), "")


def _queued_tasks(job_ids: list[str], tries: int, pause_s: float) -> dict[str, list[tuple[str, str]]]:
    """(state, SLURM's reason) of each task in the queue of each job (an array's own id), all in one
    squeue call; [] for a job that has left or where no SLURM is set up."""
    error, jobs = "", ",".join(job_ids)
    tasks: dict[str, list[tuple[str, str]]] = {job: [] for job in job_ids}
    if not job_ids:
        return tasks
    for attempt in range(tries):
        if attempt:
            time.sleep(pause_s)
        try:
            proc = subprocess.run(["squeue", "-h", "-j", jobs, "-o", "%F %T %r"], capture_output=True, text=True,
                                  timeout=60)
        except OSError:
            return tasks  # no SLURM client here: nothing can be in its queue
        except subprocess.TimeoutExpired:
            error = "no answer in 60 s"
            continue
        if proc.returncode == 0:  # one line per task (%F: its array's id); a job that has left has none
            for row in (line.split(None, 2) for line in proc.stdout.splitlines() if line.strip()):
                tasks.setdefault(row[0], []).append((row[1], row[2].strip() if len(row) > 2 else ""))
            return tasks  # a reason may have spaces
        if "Invalid job id" in proc.stderr or any(words in proc.stderr for words in _NO_SLURM):
            return tasks  # one job asked for, gone
        error = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
    times = f" {tries} times" if tries > 1 else ""
    which = f"job {jobs} is" if len(job_ids) == 1 else f"jobs {jobs} are"
    raise SlurmUnavailable(f"squeue -j {jobs} failed{times} ({error}): whether {which} still queued is unknown")


def wait_for_job(job_id: str, poll_s: float = 5.0, timeout_s: float | None = None) -> str | None:
    """Block until the job has left the queue; its final state from accounting (None if it is still
    queued after ``timeout_s``). A squeue that fails for a while (a busy or restarting controller) is
    waited out, not read as the job's end."""
    warned, deadline = False, None if timeout_s is None else time.time() + timeout_s
    while True:
        if deadline is not None and time.time() >= deadline:
            return None
        try:
            if not queue_state(job_id):
                break
        except SlurmUnavailable as e:
            if not warned:
                log.warning("%s; still waiting", e)
                warned = True
        time.sleep(poll_s)
    return accounting.ended_state(job_id, pause_s=poll_s)


class SlurmOnce:
    """squeue and sacct for one status table: squeue is asked about every stage's job in one call
    (each call costs the controller, ~18 s where it does not answer); once sacct fails, it is not
    asked about the other stages' jobs, since each try waits out slurmdbd's connection timeout and
    the answer would be the same."""

    def __init__(self, jobs: list[str]) -> None:
        self.error: SlurmUnavailable | None = None
        self.accounting_error = ""
        self._jobs = [job for job in dict.fromkeys(jobs) if job]
        self._tasks: dict[str, list[tuple[str, str]]] = {}

    def queue(self, job_id: str) -> str | None:
        """``queue_state``: the first call asks about all the jobs given (and this one); raises
        SlurmUnavailable, without asking again, once squeue has failed."""
        if self.error is None and job_id not in self._tasks:
            ask = [job for job in dict.fromkeys([*self._jobs, job_id]) if job not in self._tasks]
            try:
                self._tasks.update(_queued_tasks(ask, tries=1, pause_s=0))
            except SlurmUnavailable as e:
                self.error = e
        if self.error is not None:
            raise self.error
        return _job_state(self._tasks[job_id])

    def reason(self, job_id: str) -> str:
        """SLURM's reason a pending job waits (Dependency, Priority, PartitionTimeLimit, ...), from
        the squeue call ``queue`` made; '' where it gives none yet (until its next scheduling pass)."""
        return _pending_reason(self._tasks.get(job_id, []))

    def accounting(self, job_id: str, left_queue: bool = False) -> str:
        """``accounting.state``: UNKNOWN without asking once sacct has failed. ``left_queue``: squeue
        has said the job is gone, so a live state is accounting lagging: asked again for up to 6 s."""
        if self.accounting_error:
            return "UNKNOWN"
        job_states = accounting.ended_states(job_id, 4, 2.0) if left_queue else accounting.states(job_id)
        if isinstance(job_states, str):
            self.accounting_error = f"sacct -j {job_id} failed ({job_states})"
            return "UNKNOWN"
        return accounting.worst(job_states)


# SLURM's reasons for a pending job that it does not get over by itself: (what is wrong, what to do).
# The others (Dependency, Priority, Resources, BeginTime, ...) pass with time.
STUCK = {
    "PartitionTimeLimit": ("its time limit is over the partition's",
                           "scancel {job}, then submit it with a lower cluster.time_min or another cluster.partition"),
    "PartitionNodeLimit": ("it asks for more nodes than the partition allows",
                           "scancel {job}, then submit it with fewer cluster.nodes or another cluster.partition"),
    "BadConstraints": ("no node has what it asks (cluster.constraint, GPUs, CPUs or memory per node)",
                       "scancel {job}, then submit it asking for what the nodes have"),
    "DependencyNeverSatisfied": ("a job it waits for failed", "scancel {job}; submit status names the failure"),
    "JobHeldUser": ("it is held", "`scontrol release {job}` lets it start"),
    "JobHeldAdmin": ("an administrator holds it", "ask them, or scancel {job}"),
}
_PER_JOB = ("it is over a per-job limit of its QOS or account (time, nodes, CPUs or GPUs)",
            "scancel {job}, then submit it within the limit (`sacctmgr show qos`), or with another cluster.qos")


def _stuck(reason: str) -> tuple[str, str] | None:
    return STUCK.get(reason) or (_PER_JOB if reason.startswith(("QOSMax", "AssocMax")) and "PerJob" in reason
                                 else None)


def waiting_line(job: str, reason: str) -> str:
    """``job 12 (PartitionTimeLimit): will not start, its time limit is ... -- scancel 12, then ...``;
    for a reason that passes with time, ``job 12 (Priority)``."""
    stuck = _stuck(reason)
    if stuck is None:
        return f"job {job} ({reason or 'no reason given yet'})"
    return f"job {job} ({reason}): will not start, {stuck[0]} -- {stuck[1].format(job=job)}"


class QueueWatch:
    """While `wait=true` blocks on jobs: the one thing that asks squeue, all the jobs still queued in
    one call (after ``first_s``, then doubling up to every ``every_s``), so a wait on a chain of days
    costs the controller one call a poll however many jobs it has. It keeps which jobs have left the
    queue (``left``, ``wait_left``), and says through ``say``, once per job and reason, when one waits
    for a reason SLURM does not get over by itself: the wait goes on, since the fix (``scontrol
    release``, ``scontrol update``) can come from another shell; without this it would wait silently
    forever. A squeue that fails is said once and waited out, never read as the jobs' end."""

    def __init__(self, jobs: list[str], say: Callable[[str], None], first_s: float = 2.0, every_s: float = 30.0):
        self.say, self.first_s, self.every_s = say, first_s, every_s
        self._queued = list(dict.fromkeys(jobs))  # as the last look found them (before one: all)
        self._looked = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="queue-watch", daemon=True)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def left(self, job: str) -> bool:
        """Whether a look has found the job (a watched one, by its array's own id) gone from the queue."""
        with self._looked:
            return job not in self._queued

    def wait_left(self, job: str) -> None:
        """Block until a look finds the job gone from the queue (Ctrl-C ends it)."""
        with self._looked:
            while job in self._queued:
                self._looked.wait(1.0)  # a timeout, so that Ctrl-C is taken while waiting

    def _watch(self) -> None:
        said: dict[str, str] = {}
        queued, unanswered = list(self._queued), False
        pause = self.first_s  # the reason comes with the scheduler's next pass: look soon, then less often
        while queued and not self._stop.wait(pause):
            pause = min(self.every_s, pause * 2)
            try:
                tasks_of = _queued_tasks(queued, tries=1, pause_s=0)
            except SlurmUnavailable as e:
                if not unanswered and not self._stop.is_set():
                    self.say(f"{e} -- asking again every {self.every_s:g} s")
                unanswered = True
                continue
            for job, tasks in tasks_of.items():
                if not tasks:  # left the queue: nothing more to say of it
                    queued.remove(job)
                reason = _pending_reason(tasks)
                if _stuck(reason) and said.get(job) != reason and not self._stop.is_set():
                    self.say(waiting_line(job, reason))
                said[job] = reason
            with self._looked:
                self._queued = list(queued)
                self._looked.notify_all()
