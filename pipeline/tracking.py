"""MLflow tracking for stages: one run per stage, resumed (never duplicated) when a stage restarts.

The run id lives in ``<stage_dir>/mlflow_run.json``. A restarted stage re-opens that run, so its
metrics continue in one place. Params are immutable in MLflow: a value that changed between
executions is recorded as a ``changed.<key>`` tag instead of being re-logged. Only rank 0 talks to
MLflow (and, in a multi-node job, the first rank of every other node, for its node's system
metrics: ``pipeline.system_metrics``); every other rank gets a tracker whose methods do nothing.
The server must answer when a stage starts; after that the stage never waits on it
(``pipeline.mlflow_outbox``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from omegaconf import DictConfig  # noqa: E402

from pipeline import atomic, mlflow_outbox  # noqa: E402
from pipeline.system_metrics import NodeMetrics, SystemMetrics  # noqa: E402
from pipeline.mlflow_outbox import reachable  # noqa: E402
from pipeline.config import flatten, stage_name  # noqa: E402

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
_PARAM_BATCH = 100  # MLflow's per-request limit on params


class TrackingUnavailable(RuntimeError):
    """The MLflow server did not answer when the stage started; nothing of the stage has run."""


class ExperimentDeleted(RuntimeError):
    """The MLflow experiment was deleted (in the UI): MLflow takes no run into it, nor a new
    experiment of the same name until it is removed for good."""


def deleted_experiment(exp: Any, uri: str) -> tuple[str, str] | None:
    """(what is wrong, the fix) where the MLflow experiment ``exp`` (or None) at ``uri`` is deleted,
    else None."""
    if exp is None or exp.lifecycle_stage != "deleted":
        return None
    eid, store = exp.experiment_id, "<the server's store>" if uri.startswith(("http://", "https://")) else uri
    return (f"the MLflow experiment '{exp.name}' (id {eid}) at {uri} was deleted, and MLflow takes no run into it",
            f"restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {eid}; its runs "
            f"come back too) or remove it for good (mlflow gc --backend-store-uri {store} --experiment-ids {eid}), "
            "then submit again")


class StageKilled(BaseException):
    """Raised in the stage when the process is asked to stop (SIGTERM/SIGINT): the run is KILLED."""


class StageStopped(StageKilled):
    """A training stage stopped on request after saving a checkpoint: rerun (requeue) to resume.
    ``submit`` exits with ``EXIT_REQUEUE``; under SLURM the launcher requeues the job."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


EXIT_REQUEUE = 75  # EX_TEMPFAIL: a temporary stop; run the same command again to continue


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{Path(cfg.run_root) / 'mlflow.db'}"


def _default_artifact_location(cfg: DictConfig) -> str | None:
    # A server decides where artifacts go; a local sqlite store keeps them beside the database.
    return None if cfg.tracking.uri else (Path(cfg.run_root) / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def execution_tags(n: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where and when execution ``n`` of a stage ran, as run tags: the UI shows which SLURM job (and
    requeue) or which local process wrote the run, on which nodes, and ``execution.<n>`` keeps each
    execution's line (a preempted stage's history)."""
    import socket

    env = os.environ if environ is None else environ
    host = socket.gethostname()
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    if "SLURM_JOB_ID" not in env:
        return {"host": host, f"execution.{n}": f"{when} local process {os.getpid()} on {host}"}
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}" if env.get("SLURM_ARRAY_JOB_ID")
           else env["SLURM_JOB_ID"])
    nodes = env.get("SLURM_JOB_NODELIST", host)
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return {"host": host, "slurm.job_id": job, "slurm.nodelist": nodes, "slurm.restart_count": restarts,
            "slurm.partition": env.get("SLURM_JOB_PARTITION", ""),
            f"execution.{n}": f"{when} SLURM job {job}{'' if restarts == '0' else f' requeue {restarts}'} on {nodes}"}


class StageRun:
    """Context manager around one execution of a stage; sets the MLflow run status truthfully.

    FINISHED on success, KILLED on StageKilled/KeyboardInterrupt, FAILED (with an ``error`` tag)
    on any other exception. ``slurm_job``: the SLURM job running the stage ('' outside one).
    """

    def __init__(self, cfg: DictConfig, stage: str, stage_dir: Path, task: int = 0, slurm_job: str = ""):
        self.cfg, self.stage, self.stage_dir, self.slurm_job = cfg, stage, Path(stage_dir), slurm_job
        from pipeline.training.distributed import detect, node

        # rank 0 (SLURM or torchrun rank, known before the group exists) of array task 0 logs
        env, self.node = detect(), node()
        self.enabled = env.rank == 0 and task == 0
        self.task = task  # another array task logs only if it completes the stage: join_as_completer
        self._may_complete = env.rank == 0 and task != 0
        # ... and in a multi-node job local rank 0 of every other node logs its node's system metrics
        self._node_metrics: NodeMetrics | None = None
        self._node_leader = (not self.enabled and task == 0 and env.local_rank == 0
                             and self.node.count > 1 and bool(cfg.tracking.system_metrics))
        self.uri = tracking_uri(cfg)
        self.run_id: str | None = None
        self.attempt = 0  # how many executions of this stage came before this one
        self.start_time_ms: int | None = None  # when the run (its first execution) started; None: not logging
        self._client = None
        self._outbox: mlflow_outbox.Outbox | None = None
        self._monitor: SystemMetrics | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        if self._node_leader and _has_psutil():
            self._node_metrics = NodeMetrics(
                self.stage_dir / RUN_FILE, self.node.execution, self.node.name,
                float(self.cfg.tracking.system_metrics_interval), float(self.cfg.tracking.retry_s),
                wait_s=float(self.cfg.tracking.start_wait_s) + 300).start()
        if not self.enabled:
            return self
        from mlflow.tracking import MlflowClient

        self._wait_for_server()
        self._client = client = MlflowClient(self.uri)
        for line in mlflow_outbox.send_kept(self.stage_dir.parent, self.uri):
            log.info("MLflow records kept by an earlier execution: %s", line)
        experiment_id = self._experiment_id()
        record = self._read_record()
        run = self._find_run(record.get("run_id")) if record.get("tracking_uri") == self.uri else None
        if run is not None:
            self.attempt = int(record.get("attempts", 1))
            self.run_id, start_time = run.info.run_id, run.info.start_time
            if run.info.status == "RUNNING":  # its last execution was killed, and nobody closed the run since
                client.set_tag(self.run_id, f"execution.{self.attempt}.ended", "ended without closing this run "
                               f"(killed); found RUNNING when execution {self.attempt + 1} started")
            client.update_run(self.run_id, status="RUNNING")
            log.info("resuming MLflow run %s (execution %d of this stage)", self.run_id, self.attempt + 1)
        else:
            from mlflow.tracking.context import registry

            name = stage_name(self.cfg, self.stage)
            tags = {"stage": self.stage, "experiment": str(self.cfg.experiment)}
            if name != self.stage:
                tags["sample_set"] = str(self.cfg.sample_set)
            # the tags MLflow's fluent start_run adds (user, source, git commit) plus ours
            created = client.create_run(experiment_id, tags=registry.resolve_tags(tags), run_name=name)
            self.run_id, start_time = created.info.run_id, created.info.start_time
            self._log_params(flatten(self.cfg))
        self._outbox = mlflow_outbox.Outbox(client, self.run_id, self.uri, float(self.cfg.tracking.retry_s))
        self.start_time_ms = start_time
        if run is not None:
            self._reconcile_params(run.data.params)
        atomic.write_json(self.stage_dir / RUN_FILE, {
            "run_id": self.run_id, "tracking_uri": self.uri, "experiment_id": experiment_id,
            "attempts": self.attempt + 1, "execution": self.node.execution, "start_time": start_time,
            # the SLURM job that opened it: a later `submit status` closes the run if that job
            # ends while the run is still RUNNING (pipeline.launch.mlflow_runs)
            "slurm_job": self.slurm_job})
        self.set_tags({"executions": self.attempt + 1, **execution_tags(self.attempt + 1)})
        if self.cfg.tracking.system_metrics and _has_psutil():
            prefix = "system/" if self.node.count == 1 else f"system/{self.node.name}/"
            self._monitor = SystemMetrics(self.log_metrics, float(self.cfg.tracking.system_metrics_interval),
                                          start_time, prefix).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._node_metrics is not None:
            self._node_metrics.stop(float(self.cfg.tracking.flush_timeout_s))
        if self._outbox is None:
            return False
        if not self.enabled:  # an array task that completed the stage: the run's status is task 0's
            self._deliver_the_rest(f"{mlflow_outbox.OUTBOX}-task{self.task}")
            return False
        status = "FINISHED"
        if exc_type is not None and issubclass(exc_type, (StageKilled, KeyboardInterrupt, SystemExit)):
            self.set_tags({"stopped": f"{exc_type.__name__}: {exc}"})
            status = "KILLED"
        elif exc_type is not None:
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
            status = "FAILED"
        if self._monitor is not None:
            self._monitor.stop()
        self._outbox.put({"kind": "terminate", "status": status, "end_time": mlflow_outbox.now_ms()})
        self._deliver_the_rest(mlflow_outbox.OUTBOX)
        return False

    def join_as_completer(self) -> None:
        """This array task (not task 0) found the stage's outputs complete, the other tasks having
        ended before it: the stage's totals, manifest and grids are logged from here on, to the
        stage's run that task 0 opened (and may have closed), where task 0 would have logged them.
        The run's status stays task 0's to set. Task 0 itself, and ranks other than 0, log as before."""
        if self._outbox is not None or not self._may_complete:
            return
        record = self._read_record()
        if record.get("tracking_uri") != self.uri or not record.get("run_id"):
            log.warning("stage %s is complete but no MLflow run of it at %s is recorded in %s: its totals "
                        "are in done.json and this log only", self.stage, self.uri, self.stage_dir / RUN_FILE)
            return
        from mlflow.tracking import MlflowClient

        self.run_id, self.attempt = record["run_id"], int(record.get("attempts", 1)) - 1
        self.start_time_ms = record.get("start_time")
        self._client = MlflowClient(self.uri)
        self._outbox = mlflow_outbox.Outbox(self._client, self.run_id, self.uri, float(self.cfg.tracking.retry_s))
        log.info("array task %d completed the stage: its totals, manifest and grids go to MLflow run %s",
                 self.task, self.run_id)

    def _deliver_the_rest(self, outbox_name: str) -> None:
        """Wait up to tracking.flush_timeout_s for the queued records to go; keep what did not."""
        timeout = float(self.cfg.tracking.flush_timeout_s)
        left: list[dict[str, Any]] = []
        try:
            left = self._outbox.close(timeout)
        except KeyboardInterrupt:  # a Ctrl-C while waiting for the server: keep the records, then stop
            left = self._outbox.abandon()
            raise
        finally:
            self._keep(left, timeout, outbox_name)

    def _keep(self, left: list[dict[str, Any]], timeout: float, outbox_name: str) -> None:
        if left:
            box = mlflow_outbox.save(self.stage_dir, self.run_id, self.uri, left, outbox_name)
            log.warning("MLflow at %s did not take %s within tracking.flush_timeout_s=%g: kept in "
                        "%s; the next submit of experiment '%s' (any stage, or submit status) "
                        "sends them", self.uri, mlflow_outbox.describe(left), timeout, box,
                        self.cfg.experiment)

    # -- logging API used by stages: queued, never waits on the server --------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._outbox is not None:
            self._outbox.put(mlflow_outbox.metrics_record(dict(metrics), step))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._outbox is not None:
            self._outbox.put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._outbox is not None:
            self._outbox.put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def last_step(self, key: str) -> int:
        """The highest step at which ``key`` was logged in this run (-1 if never): a resumed stage
        skips steps it already logged. A server that went away since the stage started is not
        waited for: then every step of this execution is logged (some perhaps twice)."""
        if self._client is None:
            return -1
        away = reachable(self.uri)
        if away is None:
            try:
                history = self._client.get_metric_history(self.run_id, key)
                return max((m.step for m in history), default=-1)
            except Exception as e:  # noqa: BLE001 - tracking must not stop the stage
                away = str(e)[:300]
        log.warning("MLflow at %s does not answer (%s): logging %s from this execution's first "
                    "step", self.uri, away, key)
        return -1

    def log_image(self, image: Any, artifact_file: str, step: int | None = None) -> None:
        """Log a PIL image; with a step it shows up in the run's image history."""
        if self._outbox is not None:
            self._outbox.put({"kind": "image", "image": image, "key": artifact_file, "step": step,
                              "timestamp": mlflow_outbox.now_ms()})

    # -- helpers ------------------------------------------------------------------------------
    def _wait_for_server(self) -> None:
        """A job that starts while the server restarts waits for it (asking /health, not MLflow,
        whose retries give up after ~4 minutes with a traceback) rather than failing its chain."""
        away = reachable(self.uri)
        if not away:
            return
        wait = float(self.cfg.tracking.start_wait_s)
        log.warning("MLflow at %s does not answer (%s): waiting up to %g s for it "
                    "(tracking.start_wait_s)", self.uri, away, wait)
        deadline = time.time() + wait
        while away and time.time() < deadline:
            time.sleep(max(0.0, min(5.0, deadline - time.time())))
            away = reachable(self.uri)
        if away:
            raise TrackingUnavailable(
                f"tracking.uri={self.uri}: no MLflow server answered within tracking.start_wait_s="
                f"{wait:g} s ({away}) -- start it (or fix tracking.uri), then run the same command again")
        log.info("MLflow at %s answers: going on", self.uri)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = str(self.cfg.experiment)
        exp = self._client.get_experiment_by_name(name)
        deleted = deleted_experiment(exp, self.uri)
        if deleted:  # MLflow's own words ("must be in the 'active' state") name neither cause nor fix
            raise ExperimentDeleted(" -- ".join(deleted))
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(
                name, artifact_location=_default_artifact_location(self.cfg))
        except MlflowException:  # another stage created it at the same moment
            return self._client.get_experiment_by_name(name).experiment_id

    def _read_record(self) -> dict[str, Any]:
        import json

        path = self.stage_dir / RUN_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _find_run(self, run_id: str | None):
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s from %s is not in %s; starting a new run", run_id,
                        RUN_FILE, self.uri)
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s was deleted; starting a new run", run_id)
            return None
        return run

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + _PARAM_BATCH])

    def _reconcile_params(self, logged: dict[str, str]) -> None:
        current = flatten(self.cfg)
        self._log_params({k: v for k, v in current.items() if k not in logged})
        changed = {k: v for k, v in current.items() if k in logged and logged[k] != v}
        for key, value in changed.items():
            log.warning("config %s changed since this run started: %s -> %s (recorded as tag "
                        "changed.%s; params are immutable)", key, logged[key], value, key)
        if changed:
            self.set_tags({f"changed.{k}": f"{logged[k]} -> {v}" for k, v in changed.items()})


class PrefixedRun:
    """A view of a StageRun whose metric, image, tag and artifact names get ``prefix/``: one stage
    that trains two models (evaluate's classifiers) keeps their curves apart in one MLflow run."""

    def __init__(self, run: StageRun, prefix: str):
        self._run, self.prefix = run, prefix
        self.run_id, self.attempt = run.run_id, run.attempt

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._run.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._run.set_tags({f"{self.prefix}.{k}": v for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._run.log_artifact(path, artifact_path=self.prefix if artifact_path is None
                               else f"{self.prefix}/{artifact_path}")

    def last_step(self, key: str) -> int:
        return self._run.last_step(f"{self.prefix}/{key}")

    def log_image(self, image: Any, artifact_file: str, step: int | None = None) -> None:
        self._run.log_image(image, f"{self.prefix}_{artifact_file}", step=step)


def _has_psutil() -> bool:
    return importlib.util.find_spec("psutil") is not None
