"""Shared helpers: run the real `submit` console script as a subprocess, as users do."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SUBMIT = str(Path(sys.executable).parent / "submit")
REPO = Path(__file__).resolve().parents[1]

# A runner that starts the tests in the background of a shell without job control (`(pytest &)` in a
# script) hands them SIGINT ignored, and every command they start inherits that: `submit` then keeps
# the user's choice and ignores Ctrl-C, and the Ctrl-C tests fail. The tests stand in for a terminal,
# so they catch it here: a command started from a process that catches SIGINT gets the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_group(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a process group of its own, killed
    whole when it times out (or the test is interrupted): torchrun's and the local executor's
    workers trap SIGTERM to checkpoint, and would otherwise go on running after the test."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a process that left the group still holds the pipes
                out, err = "", ""
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        except BaseException:  # an interrupted test run stops its commands too
            _kill_group(proc.pid)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def submit(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return run_group([SUBMIT, *args], cwd=cwd, timeout=timeout, env=full_env)


@pytest.fixture(scope="session", autouse=True)
def temp_dir_under_basetemp(tmp_path_factory) -> Path:
    """TMPDIR for this process and all it starts: pytest's base temp, removed when every test passed.
    torchrun (a torchelastic_* log dir per launch) and MLflow (a db_init_lock-* file per new store)
    write to the temp dir and never clean up; under /tmp every test run would add to them."""
    tmp = tmp_path_factory.mktemp("tmp", numbered=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
        yield tmp


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


@pytest.fixture
def stage_jobs_in_this_process():
    """A test that runs the launch layer's StageJob here, as a SLURM task would in its own process:
    the root logger it sets up (INFO, a console and a log file handler) is put back afterwards, or
    later tests' captured logs would hold INFO records they did not ask for."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def save_changed_model(src: Path, dst: Path) -> Path:
    """``src`` (a model.pt) with one weight changed, saved as ``dst``: another model of the same shape."""
    import torch

    blob = torch.load(src, weights_only=True)
    first = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][first] += 0.01
    torch.save(blob, dst)
    return dst


def val_images(root: Path, limit: int | None = None):
    """The prepared digits' validation images (32x32, no augmentation), read from their shards."""
    from pipeline.data import shards
    from pipeline.data.shard_images import ShardImages

    return ShardImages(shards.shard_urls(root / "digits" / "prepare" / "shards", "val"), 32, "none", limit=limit)


def spoil_last_sample(run_root: Path) -> tuple[str, str]:
    """Zero the bytes of the last image of experiment 'digits' samples, in place (the tar stays
    valid, the PNG does not): the second half of the samples, which rank 1 of two reads, holds it.
    Returns the shard and the member's name."""
    import tarfile

    from pipeline.data import shards

    last = shards.shard_urls(run_root / "digits" / "sample" / "shards", "samples")[-1]
    with tarfile.open(last) as tar:
        png = [m for m in tar if m.name.endswith(".png")][-1]
    with open(last, "r+b") as f:
        f.seek(png.offset_data)
        f.write(b"\0" * png.size)
    return last, png.name


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


PRIOR_ARGS = ["deepspeed.micro_batch=32", "data.num_workers=0", "train.warmup_steps=20", "train.log_every=10",
              "train.eval_samples=128", "train.max_steps=150", "train.eval_every=50", "train.ckpt_every=150"]


@pytest.fixture(scope="session")
def priors(encoded: Path, tmp_path_factory) -> Path:
    """``encoded`` plus both priors trained 150 steps each (top first, so its grid uses the nearest
    real bottom codes): read-only, copy with ``copy_stages`` before writing."""
    root = copy_stages(encoded, tmp_path_factory.mktemp("priors") / "runs", "prepare", "train_vqvae", "encode")
    for stage in ("train_top_prior", "train_bottom_prior"):
        proc = submit(f"stage={stage}", f"run_root={root}", *PRIOR_ARGS, cwd=root.parent, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


PRIOR_STAGES = ("prepare", "train_vqvae", "encode", "train_top_prior", "train_bottom_prior")
EVAL_ARGS = ["train.max_steps=150", "train.warmup_steps=15", "train.eval_every=150", "train.ckpt_every=150",
             "train.log_every=25", "deepspeed.micro_batch=64"]


@pytest.fixture(scope="session")
def evaluated(priors: Path, tmp_path_factory) -> dict:
    """``priors`` plus 10 samples per class and one `submit stage=evaluate` (classifiers 150 steps):
    read-only. Holds the run_root and the evaluate command's output."""
    root = copy_stages(priors, tmp_path_factory.mktemp("evaluated") / "runs", *PRIOR_STAGES)
    proc = submit("stage=sample", f"run_root={root}", "sample.per_class=10", "sample.batch_size=50",
                  cwd=root.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = submit("stage=evaluate", f"run_root={root}", *EVAL_ARGS, cwd=root.parent, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "stdout": proc.stdout, "stderr": proc.stderr}


# -- SLURM: one local cluster (slurm/local-cluster.sh) for the session's SLURM tests ----------------
SLURM_FAST = ["deepspeed.micro_batch=16", "data.num_workers=0", "train.warmup_steps=5", "train.log_every=10",
              "train.eval_samples=32", "cluster.mem_gb=2", "cluster.cpus_per_task=1"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state), "LOCAL_SLURM_PORT_BASE": "26800"}
    proc = subprocess.run([str(REPO / "slurm" / "local-cluster.sh"), "start"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    yield {"SLURM_CONF": conf}
    subprocess.run([str(REPO / "slurm" / "local-cluster.sh"), "stop"], env=env, timeout=120)


def slurm_sh(cmd: list[str], slurm: dict) -> str:
    return subprocess.run(cmd, env={**os.environ, **slurm}, capture_output=True, text=True, timeout=60).stdout


def slurm_job_id(out: str) -> str:
    return re.search(r"job:\s+(\d+)", out).group(1)


def train_vqvae_run(run_root: Path):
    """The MLflow client and run of the experiment's train_vqvae stage."""
    from mlflow.tracking import MlflowClient

    record = json.loads((run_root / "digits" / "train_vqvae" / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    return client, client.get_run(record["run_id"])


def unsplittable_tree(tmp_path: Path) -> Path:
    """A class-folder tree too small to split into train and val (two files): prepare fails in the job."""
    src = tmp_path / "tiny"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        shutil.copy(REPO / "tests" / "fake_imagenet.py", src / cls / "not_an_image.png")
    return src


def exif_turned_jpeg(stored: np.ndarray, orientation: int) -> bytes:
    """A JPEG as a phone writes it: pixels as the sensor read them, the turn in an EXIF tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()
