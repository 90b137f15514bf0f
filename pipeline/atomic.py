"""Atomic file writes: write to a temporary name in the same directory, fsync, rename.

A reader (or a restarted job) therefore sees either the old complete file or the new complete
file, never a half-written one. ``file_digest`` names a written file by its content.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this host and process."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and atomically rename it to ``path``."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(path: Path) -> int:
    """Delete leftovers of interrupted atomic writes of ``path``; returns how many."""
    path = Path(path)
    stale = list(path.parent.glob(f"{path.name}.tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def file_digest(path: Path) -> str:
    """sha256 of a file's content: the same wherever the file is copied or moved."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
