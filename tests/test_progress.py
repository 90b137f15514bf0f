"""Progress bars redraw every 2 s on a terminal, once a minute where stderr is a file (a SLURM
job's .err), or as TQDM_MININTERVAL says. In a file no bar moves the cursor or clears itself."""

import io
import os

import tqdm.std

from pipeline.progress import FILE_INTERVAL_S, TERMINAL_INTERVAL_S, progress_bar


def _states(text: str, total: int) -> list[str]:
    """The bar states drawn into a stream (tqdm separates them with carriage returns)."""
    return [s for s in text.split("\r") if f"/{total} " in s]


def test_a_bar_written_to_a_file_is_drawn_once_a_minute(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the bars' clock: ten minutes pass here
    out = io.StringIO()
    with progress_bar(total=600, file=out, desc="vqvae", unit="step") as bar:
        assert bar.mininterval == FILE_INTERVAL_S
        for _ in range(600):  # a step a second
            now[0] += 1.0
            bar.update(1)
            bar.set_postfix(loss="0.5", refresh=False)
    states = _states(out.getvalue(), 600)
    # the start, one a minute (not one every 2 s: 300), the end (drawn twice: last update, close)
    assert 10 <= len(states) <= 13, states
    assert "| 0/600 " in states[0] and "600/600" in states[-1] and "loss=0.5" in states[-1], states


def test_a_bar_on_a_terminal_redraws_every_two_seconds(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    leader, follower = os.openpty()
    with open(follower, "w") as terminal, progress_bar(total=5, file=terminal) as bar:
        assert terminal.isatty() and bar.mininterval == TERMINAL_INTERVAL_S
        # nested under it, a leave=False bar keeps its own line and goes away, as on any terminal
        with progress_bar(total=2, file=terminal, leave=False) as inner:
            assert inner.pos != 0 and inner.leave is False
    os.close(leader)


def test_bars_in_a_file_leave_no_cursor_codes_before_log_lines(monkeypatch):
    """An evaluation classifier's accuracy bar (leave=False) runs under the training's bar, and a log
    line follows it: in a file (stdout and stderr redirected to one log) the log line starts clean."""
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    out = io.StringIO()
    with progress_bar(total=2, file=out, desc="classifier") as outer:
        for step in range(2):
            with progress_bar(total=4, file=out, desc="accuracy", leave=False) as inner:
                inner.update(4)
            tqdm.std.tqdm.write(f"step {step}: top-1 0.9", file=out)  # how the console log handler writes
            outer.update(1)
    text = out.getvalue()
    assert "\x1b" not in text, repr(text)  # no cursor movement (tqdm's nested bars write ESC[A)
    lines = text.split("\n")
    for step in range(2):
        line = next(ln for ln in lines if f"step {step}:" in ln)
        # the line holds the log line alone, after the bars' carriage returns at most
        assert line.lstrip("\r ") == f"step {step}: top-1 0.9", repr(line)
    # the accuracy bar stayed in the file on its last state, one line per evaluation
    assert sum(ln.rsplit("\r", 1)[-1].startswith("accuracy: 100%") for ln in lines) == 2, repr(text)


def test_tqdm_mininterval_chooses_the_interval(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    out = io.StringIO()
    with progress_bar(total=50, file=out) as bar:
        for _ in range(50):
            bar.update(1)
    assert len(_states(out.getvalue(), 50)) >= 51  # every state from 0/50 to 50/50
