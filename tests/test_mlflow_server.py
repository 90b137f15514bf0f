"""`tracking.uri` pointing at a real `mlflow server`: the run is read back through the REST API."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_group, SUBMIT, submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` on a fixed port and sqlite store, stopped and started again at will."""

    def __init__(self, store: Path):
        self.store, self.port = store, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        store.mkdir(exist_ok=True)

    def start(self) -> None:
        log = open(self.store / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
             "--artifacts-destination", str(self.store / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={"MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": os.environ["TMPDIR"],
                 "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    pytest.fail("mlflow server did not start:\n" + (self.store / "server.log").read_text())
                time.sleep(0.5)

    def stop(self) -> None:
        """The whole server (uvicorn and its workers) goes away, as in a crash or a restart."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def mlflow_server(server):
    return server.url, server.store


def test_prepare_logs_to_a_real_mlflow_server(mlflow_server, tmp_path):
    url, store = mlflow_server
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", f"run_root={run_root}", f"tracking.uri={url}",
                  "experiment=served", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert url in proc.stdout
    assert not (run_root / "mlflow.db").exists()  # nothing went to the local default store

    run_id = json.loads((run_root / "served" / "prepare" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "prepare"
    assert run.data.params["tracking.uri"] == url
    assert run.data.params["experiment"] == "served"
    assert run.data.metrics["images"] == 1797
    assert client.get_experiment(run.info.experiment_id).name == "served"
    assert "dataset.json" in {a.path for a in client.list_artifacts(run_id)}
    # the artifact went through the server to its artifact store
    local = Path(client.download_artifacts(run_id, "dataset.json", str(tmp_path)))
    assert json.loads(local.read_text())["num_classes"] == 10
    assert list((store / "artifacts").rglob("dataset.json"))


def test_a_stage_goes_on_through_a_tracking_outage_and_its_records_arrive_later(server, prepared, tmp_path):
    """The server dies while train_vqvae trains: the training neither waits nor fails, the records it
    could not send are kept in the stage dir, and `submit status` sends them once the server is back:
    every loss point once, the image history, model.pt, the FINISHED status and the system metrics
    sampled during the outage."""
    run_root = tmp_path / "runs"
    shutil.copytree(prepared, run_root / "digits" / "prepare")
    sdir = run_root / "digits" / "train_vqvae"
    args = ["stage=train_vqvae", f"run_root={run_root}", f"tracking.uri={server.url}",
            "deepspeed.micro_batch=16", "data.num_workers=0", "train.warmup_steps=10",
            "train.max_steps=150", "train.log_every=5", "train.eval_every=50", "train.ckpt_every=50",
            "train.eval_samples=64", "tracking.flush_timeout_s=5", "tracking.retry_s=1",
            "tracking.system_metrics_interval=0.5"]
    killed_at = []

    def kill_once_training_logs():  # after the stage's start, which needs the server
        deadline = time.time() + 300
        while not (sdir / "progress.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        server.stop()
        killed_at.append(json.loads((sdir / "progress.json").read_text())["step"])
        killed_at.append(time.time())

    killer = threading.Thread(target=kill_once_training_logs)
    killer.start()
    proc = run_group([SUBMIT, *args], cwd=tmp_path, timeout=600,
                     env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    killer.join()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert len(killed_at) == 2 and killed_at[0] < 150, killed_at
    assert (sdir / "done.json").exists() and (sdir / "model.pt").exists()
    kept = json.loads((sdir / "mlflow_outbox" / "records.json").read_text())
    assert "did not take" in out and str(sdir / "mlflow_outbox") in out
    steps_kept = {r["step"] for r in kept["records"] if r["kind"] == "metrics" and "loss" in r["metrics"]}
    assert 150 in steps_kept
    assert kept["records"][-1] == {**kept["records"][-1], "kind": "terminate", "status": "FINISHED"}
    assert any(r["kind"] == "image" for r in kept["records"])
    assert list((sdir / "mlflow_outbox" / "images").glob("*.png"))

    # status while the server is still down answers at once, says so, and keeps the records
    status = submit("status", f"run_root={run_root}", f"tracking.uri={server.url}", cwd=tmp_path, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "does not answer" in status.stdout and (sdir / "mlflow_outbox" / "records.json").exists()
    assert re.search(r"train_vqvae\s+done", status.stdout), status.stdout

    server.start()
    status = submit("status", f"run_root={run_root}", f"tracking.uri={server.url}", cwd=tmp_path, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "train_vqvae: sent" in status.stdout, status.stdout
    assert not (sdir / "mlflow_outbox").exists()
    client = MlflowClient(tracking_uri=server.url)
    run_id = json.loads((sdir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(loss_steps) == list(range(5, 151, 5)), loss_steps  # each once, none lost
    assert [m.step for m in client.get_metric_history(run_id, "val_psnr")] == [50, 100, 150]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "logs", "images"} <= artifacts, artifacts
    images = {a.path for a in client.list_artifacts(run_id, "images")}
    assert len([p for p in images if "val_reconstructions" in p and p.endswith(".png")]) >= 3, images
    # system metrics went on through the outage (MLflow's own monitor stopped at its first failure):
    # samples taken after the server was down, about one per 0.5 s interval until the last step
    # (on a fast VM the 145 steps left took ~2.5 s; half the intervals allow for a busy CPU's delays)
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    during = [m for m in cpu if m.timestamp > killed_at[1] * 1000]
    last_step_ms = max(r["timestamp"] for r in kept["records"] if r["kind"] == "metrics" and "loss" in r["metrics"])
    outage_s = last_step_ms / 1000 - killed_at[1]
    assert len(during) >= max(1.0, outage_s / 0.5 / 2), ([(m.step, m.timestamp) for m in cpu], killed_at, outage_s)


def test_an_outage_is_reported_while_mlflows_own_retries_still_hold_the_request(server, caplog):
    """MLflow retries a request to a dead server for ~4 minutes before it raises; the stage's log
    says the server is away within seconds, and the held record arrives once it is back."""
    from pipeline.mlflow_outbox import Outbox

    client = MlflowClient(tracking_uri=server.url)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    box = Outbox(client, run_id, server.url, retry_s=1)
    box.put({"kind": "metrics", "metrics": {"loss": 1.0}, "step": 1, "timestamp": 1})
    assert box.flush(timeout=60)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="pipeline.mlflow_outbox"):
        box.put({"kind": "metrics", "metrics": {"loss": 0.5}, "step": 2, "timestamp": 2})
        deadline = time.time() + 60
        while box.failing_since is None and time.time() < deadline:
            time.sleep(0.2)
        assert box.failing_since is not None, "no outage noticed within 60 s"
        assert box._sending_since is not None  # reported while MLflow still retries the request
    assert "does not take records" in caplog.text and "a request has waited" in caplog.text, caplog.text
    server.start()
    assert box.flush(timeout=300)
    assert box.close(timeout=1) == [] and box.failing_since is None
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]


def test_a_local_submit_refuses_a_tracking_server_that_does_not_answer(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    proc = submit("stage=prepare", f"run_root={tmp_path / 'runs'}", f"tracking.uri={url}", cwd=tmp_path,
                  timeout=120)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert f"tracking.uri={url}: no MLflow server answers" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_finishing_stage_waits_for_a_slow_upload_while_the_server_answers(server, tmp_path):
    """tracking.flush_timeout_s bounds the wait for a server that is away, not for one that is
    busy taking a large artifact (a model.pt of the paper's priors is over 1 GB)."""
    from pipeline.mlflow_outbox import Outbox

    client = MlflowClient(tracking_uri=server.url)
    run_id = client.create_run(client.create_experiment("big")).info.run_id
    big = tmp_path / "model.pt"
    with open(big, "wb") as f:
        for _ in range(40):
            f.write(os.urandom(5 << 20))  # 200 MB: seconds through the server, far over the timeout
    box = Outbox(client, run_id, server.url, retry_s=1)
    started = time.time()
    box.put({"kind": "artifact", "path": str(big), "artifact_path": None})
    box.put({"kind": "terminate", "status": "FINISHED", "end_time": 1})
    assert box.close(timeout=0.2) == []
    assert time.time() - started > 0.2  # it did wait past the timeout
    assert [(a.path, a.file_size) for a in client.list_artifacts(run_id)] == [("model.pt", 200 << 20)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_stage_starting_while_the_server_restarts_waits_for_it(tmp_path):
    """A queued job may start while the server is down: it waits (tracking.start_wait_s) instead
    of failing after MLflow's own retries, and fails with what to do once the wait is over."""
    from pipeline.config import compose
    from pipeline.tracking import StageRun, TrackingUnavailable

    server = Server(tmp_path / "server")  # not started yet
    cfg = compose(["stage=prepare", f"run_root={tmp_path / 'runs'}", f"tracking.uri={server.url}",
                   "tracking.system_metrics=false"])
    sdir = tmp_path / "runs" / "digits" / "prepare"
    sdir.mkdir(parents=True)
    started = time.time()
    starter = threading.Timer(3.0, server.start)
    starter.start()
    try:
        with StageRun(cfg, "prepare", sdir) as run:
            assert time.time() - started >= 3.0  # it waited for the server
            run.log_metrics({"images": 7}, step=0)
        starter.join()
        got = MlflowClient(tracking_uri=server.url).get_run(run.run_id)
        assert got.info.status == "FINISHED" and got.data.metrics["images"] == 7
    finally:
        starter.cancel()
        server.stop()

    cfg.tracking.start_wait_s = 1
    with pytest.raises(TrackingUnavailable, match=r"no MLflow server answered within tracking.start_wait_s=1 s"):
        with StageRun(cfg, "prepare", sdir):
            pytest.fail("the stage ran without its server")
