"""Shared helpers: run the real `submit` console script as a subprocess, as users do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUBMIT = str(Path(sys.executable).parent / "submit")


def submit(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run([SUBMIT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> dict:
    """One `submit stage=prepare` on the embedded digits, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("digits")
    proc = submit("stage=prepare", f"run_root={root / 'runs'}", cwd=root)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return {"root": root, "run_root": root / "runs", "proc": proc,
            "stage_dir": root / "runs" / "digits" / "prepare"}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """Digits shards from one real `submit stage=prepare`, copied by ``run_root`` for each test."""
    root = tmp_path_factory.mktemp("prepared")
    proc = submit("stage=prepare", f"run_root={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "digits" / "prepare"


@pytest.fixture
def run_root(prepared: Path, tmp_path: Path) -> Path:
    """A fresh run_root whose experiment 'digits' already has its prepare stage done."""
    shutil.copytree(prepared, tmp_path / "runs" / "digits" / "prepare")
    return tmp_path / "runs"
