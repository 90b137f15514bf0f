"""`tracking.uri` pointing at a real `mlflow server`: the run is read back through the REST API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = open(store / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={"MLFLOW_DISABLE_TELEMETRY": "true",
                                                   "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start:\n" + (store / "server.log").read_text())
            time.sleep(0.5)
    yield url, store
    proc.terminate()
    proc.wait(timeout=30)


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
