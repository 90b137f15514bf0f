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

from pipeline.config import ConfigError


class StageBusy(ConfigError):
    """The stage is running in another process: refused before anything is written."""


_held: set[Path] = set()  # locks this process holds: taking one again is a no-op, not a conflict


@contextmanager
def exclusive(sdir: Path, rank: int, name: str) -> Iterator[None]:
    """Hold the stage's lock for ``rank`` around the block; StageBusy if another process holds it."""
    sdir.mkdir(parents=True, exist_ok=True)
    path = (sdir / f".running-rank{rank}.lock").resolve()
    if path in _held:
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StageBusy(f"stage={name}", f"already running in {holder} (lock {path})",
                            "wait for it to finish, or stop that process first (a training checkpoints on "
                            "SIGTERM and resumes when you submit again)") from None
        except OSError:  # a filesystem without locks: run unguarded rather than not at all
            pass
        else:
            f.truncate(0)
            f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)


def holder(sdir: Path, rank: int = 0) -> str | None:
    """Who runs the stage here: the holder's description if a process holds its lock, None if none
    does, "?" if this cannot tell (never locked by this version, a filesystem without locks)."""
    path = sdir / f".running-rank{rank}.lock"
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
