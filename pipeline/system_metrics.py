"""System metrics (CPU, memory, disk, network and GPUs) of a stage's machines, in its MLflow run.

MLflow's own SystemMetricsMonitor asks the server for the run's status before every sample and
stops for good at the first failure, so one tracking server restart ended a multi-day training's
system metrics. Here a thread samples with MLflow's per-resource monitors and logs through the
stage's outbox (``pipeline.mlflow_outbox``): the samples of an outage are held and sent later, and
the thread never waits on the server. The step of a sample is the number of sampling intervals
since the run started, so restarted executions continue the same curves and every node's curves
line up.

In a multi-node job each node reports its own GPUs: rank 0 logs ``system/<node>/...`` for its node,
and local rank 0 of every other node does the same for its node (``NodeMetrics``) into the run rank 0
opened. One machine keeps MLflow's ``system/...`` names, which the UI shows as system metrics.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import mlflow_outbox

log = logging.getLogger(__name__)


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    for gpus in (GPUMonitor, ROCMMonitor):  # NVIDIA (nvidia-ml-py and a driver), else AMD
        try:
            monitors.append(gpus())
            break
        except Exception:  # noqa: BLE001 - no GPU, driver or binding: no metrics of that kind
            continue
    return monitors


class SystemMetrics:
    """Every ``interval`` seconds, one sample of each resource, logged as ``prefix + name`` at the
    step ``(now - start_time_ms) / interval`` through ``log_metrics(metrics, step)``."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], interval: float,
                 start_time_ms: int, prefix: str = "system/"):
        self.log_metrics, self.interval, self.prefix = log_metrics, interval, prefix
        self.start_time_ms = start_time_ms
        self.monitors = _monitors()
        self._last_step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="system-metrics")

    def start(self) -> "SystemMetrics":
        for monitor in self.monitors:  # psutil's first CPU reading covers nothing: prime it
            monitor.collect_metrics()
            monitor.clear_metrics()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, with one last sample: the end of the curve (a node that joined a short job
        late had a single point, or none)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.sample()
        except Exception as e:  # noqa: BLE001 - a failing sensor must not fail the stage's close
            log.warning("system metrics: last sample failed (%s)", e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a failing sensor must not end the stage
                log.warning("system metrics: sample failed (%s); trying again in %g s", e, self.interval)

    def sample(self) -> None:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        step = max(self._last_step + 1, round((time.time() - self.start_time_ms / 1000) / self.interval))
        self._last_step = step
        self.log_metrics({self.prefix + k: float(v) for k, v in metrics.items()}, step)


class NodeMetrics:
    """The system metrics of one node other than rank 0's, logged into the run rank 0 opened.

    Rank 0 writes the run's record (``mlflow_run.json``) with the execution it belongs to; this
    waits for that record in a thread (the training does not wait), then samples like rank 0 does,
    through an outbox of its own, kept in ``<stage dir>/mlflow_outbox-<node>`` when the server is
    away at the end."""

    def __init__(self, record_file: Path, execution: str, node_name: str, interval: float,
                 retry_s: float, wait_s: float):
        self.record_file, self.execution, self.node_name = Path(record_file), execution, node_name
        self.interval, self.retry_s, self.wait_s = interval, retry_s, wait_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outbox: mlflow_outbox.Outbox | None = None
        self._sampler: SystemMetrics | None = None
        self._record: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._start, daemon=True, name="node-metrics")

    def start(self) -> "NodeMetrics":
        self._thread.start()
        return self

    def _start(self) -> None:
        deadline = time.time() + self.wait_s
        while True:
            try:
                record = json.loads(self.record_file.read_text())
            except (OSError, ValueError):  # not written yet
                record = {}
            if record.get("execution") == self.execution:
                break
            if time.time() > deadline:
                log.warning("system metrics of node %s: rank 0 opened no MLflow run for this "
                            "execution within %g s; not logging them", self.node_name, self.wait_s)
                return
            if self._stop.wait(0.2):  # a small file; rank 0 writes it seconds into the job
                return
        from mlflow.tracking import MlflowClient

        uri = record["tracking_uri"]
        with self._lock:
            if self._stop.is_set():
                return
            self._record = record
            self._outbox = mlflow_outbox.Outbox(MlflowClient(uri), record["run_id"], uri, self.retry_s)
            self._sampler = SystemMetrics(self._log, self.interval, int(record["start_time"]),
                                          prefix=f"system/{self.node_name}/").start()
        log.info("system metrics of node %s go to MLflow run %s", self.node_name, record["run_id"])

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self._outbox.put(mlflow_outbox.metrics_record(metrics, step))

    def stop(self, flush_timeout: float) -> None:
        """Stop sampling and send what is queued; keep what the server does not take."""
        with self._lock:
            self._stop.set()
        self._thread.join(timeout=5)
        if self._sampler is not None:
            self._sampler.stop()
        if self._outbox is None:
            return
        left = self._outbox.close(flush_timeout)
        if left:
            box = mlflow_outbox.save(self.record_file.parent, self._record["run_id"],
                                     self._record["tracking_uri"], left,
                                     name=f"{mlflow_outbox.OUTBOX}-{self.node_name}")
            log.warning("system metrics of node %s: MLflow did not take %s; kept in %s",
                        self.node_name, mlflow_outbox.describe(left), box)
