"""The installed package, not only the checkout: a wheel built from the project ships every config
file, builds without setuptools' warnings, and its `submit` composes the configs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from conftest import REPO, SUBMIT, run_group
from setuptools.config.pyprojecttoml import read_configuration

CONFIG_FILES = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))


def test_every_config_group_folder_is_a_listed_package():
    """setuptools warns ("Package would be ignored") about a config group folder left out of
    `packages`: a new group needs its line in pyproject.toml."""
    # read as setuptools reads it (tomllib is Python 3.11+; the project supports 3.10)
    listed = set(read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"])
    groups = sorted({"pipeline.configs." + Path(f).parent.as_posix().replace("/", ".") for f in CONFIG_FILES
                     if "/" in f})
    assert len(groups) >= 6
    missing = [g for g in groups if g not in listed]
    assert missing == [], f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_wheel_ships_every_config_and_its_submit_runs_from_anywhere(tmp_path):
    # a copy of what the package is built from, so the build leaves nothing (build/, egg-info) in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("pipeline", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # offline: the environment's own setuptools builds it (build isolation would fetch one)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr + build.stdout
    out = build.stdout + build.stderr
    assert "Warning" not in out and "would be ignored" not in out, out

    wheel, = (tmp_path / "dist").glob("vqvae2_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [f for f in CONFIG_FILES if f"pipeline/configs/{f}" not in names] == []

    target = tmp_path / "installed"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr + install.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "MLFLOW_DISABLE_TELEMETRY": "true"}

    def submit(*args: str) -> subprocess.CompletedProcess:  # the wheel's own console script
        return run_group([str(target / "bin" / "submit"), *args], cwd=elsewhere, env=env, timeout=300)

    # the same stages, groups and options as the checkout's `submit`, read from the installed configs
    helped, checkout = submit("--help"), run_group([SUBMIT, "--help"], cwd=elsewhere, timeout=300)
    assert helped.returncode == 0 and checkout.returncode == 0, helped.stderr + checkout.stderr
    assert helped.stdout == checkout.stdout.replace(str(REPO / "configs"), str(target / "pipeline" / "configs"))
    assert str(target / "pipeline" / "configs") in helped.stdout
    shown = submit("--cfg", "job", "stage=train_vqvae", "model=paper_imagenet256", "cluster=slurm")
    assert shown.returncode == 0, shown.stderr
    resolved = yaml.safe_load(shown.stdout)
    # values that only the shipped group files hold
    assert (resolved["model"]["name"], resolved["cluster"]["name"], resolved["data"]["name"]) == \
        ("paper_imagenet256", "slurm", "digits")
    assert resolved["model"]["vqvae"]["hidden_channels"] == 128 and "zero_stage" in resolved["deepspeed"]
    assert list(elsewhere.iterdir()) == []  # showing the config writes nothing
