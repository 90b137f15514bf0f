"""System metrics sampled by the pipeline's own thread into a stage's MLflow run (a real sqlite
store, or an address where no server answers), and another node's metrics into rank 0's run."""

from __future__ import annotations

import json
import socket
import time

from mlflow.tracking import MlflowClient

from pipeline.config import compose
from pipeline.mlflow_outbox import send_kept
from pipeline.system_metrics import NodeMetrics, SystemMetrics
from pipeline.tracking import RUN_FILE, StageRun


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_stage_logs_its_machine_every_interval_and_a_resumed_run_continues_the_steps(tmp_path):
    run_root = tmp_path / "runs"
    cfg = compose(["stage=prepare", f"run_root={run_root}", "tracking.system_metrics_interval=0.25"])
    sdir = run_root / "digits" / "prepare"
    sdir.mkdir(parents=True)
    with StageRun(cfg, "prepare", sdir) as run:
        time.sleep(2.0)
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    first = _steps(client, run.run_id, "system/cpu_utilization_percentage")
    # a sample every 0.25 s, its step the intervals since the run's start
    assert len(first) >= 4 and first == sorted(set(first)), first
    metrics = client.get_run(run.run_id).data.metrics
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage",
            "system/network_receive_megabytes"} <= set(metrics), metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0

    time.sleep(1.0)  # a restart some time later continues the same curve, after a gap
    with StageRun(cfg, "prepare", sdir) as again:
        time.sleep(1.0)
    assert again.run_id == run.run_id
    steps = _steps(client, run.run_id, "system/cpu_utilization_percentage")
    later = steps[len(first):]
    assert later and min(later) >= max(first) + 4, (first, later)


def test_stopping_takes_one_last_sample_the_end_of_the_curve():
    logged: list[tuple[dict[str, float], int]] = []
    monitor = SystemMetrics(lambda metrics, step: logged.append((metrics, step)), interval=60.0,
                            start_time_ms=int(time.time() * 1000)).start()
    monitor.stop()  # well within the first interval: a short job's node had no point at all
    assert len(logged) == 1 and "system/cpu_utilization_percentage" in logged[0][0], logged


def test_another_node_logs_into_rank_0s_run_once_rank_0_opened_it_for_this_execution(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    sdir = tmp_path / "train_vqvae"
    sdir.mkdir()
    record = {"run_id": run.info.run_id, "tracking_uri": uri, "start_time": run.info.start_time}
    # the record of an earlier execution (a requeued job) is not this one's: the node waits
    (sdir / RUN_FILE).write_text(json.dumps({**record, "execution": "slurm:7:0"}))
    node = NodeMetrics(sdir / RUN_FILE, "slurm:7:1", "gpu002", interval=0.25, retry_s=1, wait_s=60).start()
    time.sleep(1.5)
    assert "system/gpu002/cpu_utilization_percentage" not in client.get_run(run.info.run_id).data.metrics
    (sdir / RUN_FILE).write_text(json.dumps({**record, "execution": "slurm:7:1"}))
    time.sleep(2.5)
    node.stop(flush_timeout=30)
    steps = _steps(client, run.info.run_id, "system/gpu002/cpu_utilization_percentage")
    # sampled from the start of rank 0's run: steps begin past the 1.5 s it waited
    assert len(steps) >= 3 and min(steps) >= 6, steps
    assert not [k for k in client.get_run(run.info.run_id).data.metrics if k.startswith("system/cpu")]


def test_a_node_keeps_its_metrics_when_the_server_is_away_and_the_next_submit_sends_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after ~4 min
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    sdir = tmp_path / "exp" / "train_vqvae"
    sdir.mkdir(parents=True)
    (sdir / RUN_FILE).write_text(json.dumps({"run_id": "r", "tracking_uri": dead, "start_time": 0,
                                             "execution": "e"}))
    node = NodeMetrics(sdir / RUN_FILE, "e", "n2", interval=0.2, retry_s=0.2, wait_s=60).start()
    time.sleep(1.5)
    node.stop(flush_timeout=0.5)
    kept = json.loads((sdir / "mlflow_outbox-n2" / "records.json").read_text())
    assert kept["run_id"] == "r" and len(kept["records"]) >= 3
    assert all("system/n2/cpu_utilization_percentage" in r["metrics"] for r in kept["records"])

    # the server is back (here: the records go to a store that answers) -> sent once, box gone
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    kept.update(run_id=run_id, tracking_uri=uri)
    (sdir / "mlflow_outbox-n2" / "records.json").write_text(json.dumps(kept))
    lines = send_kept(tmp_path / "exp", uri)
    assert lines == [f"train_vqvae (node n2): sent {len(kept['records'])} records "
                     f"(metrics up to step {kept['records'][-1]['step']}) kept since MLflow was unreachable"]
    assert not (sdir / "mlflow_outbox-n2").exists()
    assert len(_steps(client, run_id, "system/n2/cpu_utilization_percentage")) == len(kept["records"])
