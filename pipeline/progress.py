"""Progress bars for long work (training steps, images prepared, encoded, sampled, evaluated).

One place decides how often a bar redraws. On a terminal every 2 s: someone is watching it. Where
stderr is a file (a SLURM job's ``.err``, a redirected log) every redraw is appended to it (tqdm
writes ``\\r`` and the whole bar), so a days-long training at 2 s would add ~43,000 bar states a day
to a file nobody reads live; there a bar is drawn once a minute, and always at its start and end.
``TQDM_MININTERVAL`` (tqdm's own variable), when set, chooses the interval everywhere.

A file cannot move a cursor, but keeps the codes that would: a bar drawn under another one (tqdm
moves up and down to its line) or a ``leave=False`` bar (cleared with blanks when it ends) would
leave those codes in front of the next log line. In a file every bar draws on the current line and
stays, ending on its last state.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm

TERMINAL_INTERVAL_S = 2.0
FILE_INTERVAL_S = 60.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def redraw_interval(stream: TextIO) -> float:
    """Seconds between two redraws of a bar written to ``stream``."""
    if os.environ.get("TQDM_MININTERVAL"):
        return float(os.environ["TQDM_MININTERVAL"])
    return TERMINAL_INTERVAL_S if _is_terminal(stream) else FILE_INTERVAL_S


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar (same keywords) that redraws at ``redraw_interval`` of its stream (stderr unless
    ``file=`` is given). ``position`` and ``leave`` apply on a terminal only."""
    stream = kwargs.get("file") or sys.stderr
    if not _is_terminal(stream):
        kwargs.update(position=0, leave=True)
    interval = redraw_interval(stream)
    # tqdm's monitor thread redraws a bar not redrawn for maxinterval (10 s by default), which would
    # undo a longer interval; at most this long apart, a bar still redraws when its updates are slow
    return tqdm(mininterval=interval, maxinterval=max(interval, 10.0), **kwargs)
