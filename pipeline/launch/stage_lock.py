"""One local run per stage and rank at a time: a second `submit` of a stage that is still running
here (another terminal, a torchrun beside it) would write the same checkpoints and outputs.

An exclusive ``flock`` on a file in the stage directory, held while the stage runs. The kernel
drops it when the holder exits, however it exits (SIGKILL, OOM), so it never goes stale. SLURM jobs
are kept apart by their queue instead (`submit` looks for the stage's queued job).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.config import ConfigError


class StageBusy(ConfigError):
    """The stage is running in another process: refused before anything is written."""


def _path(sdir: Path, rank: int) -> Path:
    return sdir / f".running-rank{rank}.lock"


_held: set[Path] = set()  # locks this process holds: taking one again is a no-op, not a conflict


@contextmanager
def exclusive(sdir: Path, rank: int, name: str) -> Iterator[None]:
    """Hold the stage's lock for ``rank`` around the block; StageBusy if another process holds it."""
    sdir.mkdir(parents=True, exist_ok=True)
    path = _path(sdir, rank).resolve()
    if path in _held:
        yield
        return
    with open(path, "a+") as f:
        if _lock(f, path, name):  # False on a filesystem without locks: run unguarded rather than not at all
            f.truncate(0)
            f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)


def _lock(f: IO[str], path: Path, name: str) -> bool:
    """Take the exclusive lock without waiting: True if taken, False if this filesystem has no locks;
    StageBusy naming the holder if another process has it."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise _busy(f.read().strip() or "another process", path, name) from None
    except OSError:
        return False
    return True


def _busy(holder: str, path: Path, name: str) -> StageBusy:
    return StageBusy(f"stage={name}", f"already running in {holder} (lock {path})",
                     "wait for it to finish, or stop that process first (a training checkpoints on "
                     "SIGTERM and Ctrl-C and resumes when you submit again)")


def check_free(sdir: Path, rank: int, name: str) -> None:
    """StageBusy if another process runs the stage here now (what `exclusive` would refuse)."""
    who = holder(sdir, rank)
    if who not in (None, "?"):
        raise _busy(who, _path(sdir, rank), name)


def holder(sdir: Path, rank: int = 0) -> str | None:
    """Who runs the stage here: the holder's description if a process holds its lock, None if none
    does, "?" if this cannot tell (never locked by this version, a filesystem without locks)."""
    path = _path(sdir, rank)
    if not path.exists():
        return "?"
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held only for this look
        except BlockingIOError:
            return f.read().strip() or "another process"
        except OSError:
            return "?"
    return None


def last_held_here(sdir: Path, rank: int = 0) -> bool:
    """Whether the last process to take the stage's lock ran on this machine: only here does a free
    lock mean that process is gone (a filesystem may keep flocks per node)."""
    try:
        words = _path(sdir, rank).read_text().split()
    except OSError:
        return False
    return len(words) >= 4 and words[0] == "process" and words[2] == "on" and words[3] == socket.gethostname()
