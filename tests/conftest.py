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


def copy_stages(src_root: Path, dst_root: Path, *stages: str) -> Path:
    """A new run_root holding copies of these finished stages of experiment 'digits'."""
    for stage in stages:
        shutil.copytree(src_root / "digits" / stage, dst_root / "digits" / stage)
    return dst_root


@pytest.fixture(scope="session")
def trained(prepared: Path, tmp_path_factory) -> Path:
    """A run_root whose experiment has prepare and a briefly trained VQ-VAE (real `submit`s)."""
    root = tmp_path_factory.mktemp("trained") / "runs"
    shutil.copytree(prepared, root / "digits" / "prepare")
    proc = submit("stage=train_vqvae", f"run_root={root}", "train.max_steps=100", "deepspeed.micro_batch=16",
                  "train.eval_every=100", "train.ckpt_every=100", "data.num_workers=0", cwd=root.parent,
                  timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.fixture(scope="session")
def encoded(trained: Path, tmp_path_factory) -> Path:
    """``trained`` plus a real `submit stage=encode`: the code shards the priors train on."""
    root = copy_stages(trained, tmp_path_factory.mktemp("encoded") / "runs", "prepare", "train_vqvae")
    proc = submit("stage=encode", f"run_root={root}", cwd=root.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root
