"""The local sqlite MLflow store read directly, for what `submit` asks of it (was the experiment
deleted, the status of a stage's run): importing MLflow and opening its store took ~1.5-3 s of
every command. A read returns False where the URI names another store (a server) or the file does not
read as MLflow's tables (another schema version, a damaged file): the caller asks MLflow instead."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

_PREFIX = "sqlite:///"


def path(uri: str) -> Path | None:
    """The sqlite file a ``sqlite:///`` tracking URI names (which may not exist yet); None for another store."""
    return Path(uri[len(_PREFIX):]) if uri.startswith(_PREFIX) else None


def _rows(uri: str, sql: str, args: tuple) -> list[tuple] | Literal[False]:
    file = path(uri)
    if file is None:
        return False
    try:  # read-only: a reader never takes the write lock a running stage needs
        with closing(sqlite3.connect(file.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)) as db:
            return db.execute(sql, args).fetchall()
    except sqlite3.Error:
        return False


def experiment(uri: str, name: str) -> SimpleNamespace | None | Literal[False]:
    """The experiment ``name`` (experiment_id, name, lifecycle_stage), None where there is none."""
    rows = _rows(uri, "SELECT experiment_id, name, lifecycle_stage FROM experiments WHERE name = ?", (name,))
    if rows is False:
        return False
    return SimpleNamespace(experiment_id=str(rows[0][0]), name=rows[0][1], lifecycle_stage=rows[0][2]) if rows else None


def run_status(uri: str, run_id: str) -> str | None | Literal[False]:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED, ...), None where there is no such run."""
    rows = _rows(uri, "SELECT status FROM runs WHERE run_uuid = ?", (run_id,))
    if rows is False:
        return False
    return str(rows[0][0]) if rows else None
