"""What `submit` refuses before any job starts or is queued (exit 2, nothing written): a stage
without an implementation or with missing inputs, an executor that is not here, a stage whose
SLURM job is still queued or that runs in another local `submit`, an MLflow server that does
not answer, resume=false over checkpoints, and a done stage's shards asked for with other
settings. Each refusal names the key or path and the fix."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import ConfigError, stage_dir, stage_name
from pipeline.launch import executors, local_store, queue, records, stage_lock
from pipeline.mlflow_outbox import reachable
from pipeline.stages import PREPARE_ONLY
from pipeline.tracking import tracking_uri
from pipeline.training.distributed import detect, gpu_build
from pipeline.training.fingerprint import RESUME_FIX, resume_refusal


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_stage(cfg: DictConfig, stage: str) -> None:
    """A single stage, about to run here or be queued."""
    from pipeline.stages import BUILT, missing_inputs

    if stage not in BUILT:
        raise ConfigError(f"stage={stage}", "has a config file but no implementation", f"stages: {', '.join(BUILT)}")
    for producer, path in missing_inputs(cfg, stage):
        same = f" sample_set={cfg.sample_set}" if stage_name(cfg, producer) != producer else ""
        raise ConfigError(f"stage={stage}", f"needs {path}, which is missing",
                          f"run `submit stage={producer}{same}` first (same experiment and run_root), "
                          f"or `submit stage=all{same}`")
    executors.check_available(cfg)
    _torch_can_use_gpus(cfg, stage)
    _tracking_answers(cfg)
    _experiment_not_deleted(cfg)
    _not_queued(cfg, stage)
    _checkpoints_resumable(cfg, stage)
    _done_outputs_kept(cfg, stage)


def check_chain(cfgs: dict[str, DictConfig], todo: list[str]) -> None:
    """`stage=all`, for the stages it will run. A SLURM chain queues a stage's live job's dependents
    after it instead of refusing; a local one runs each stage itself, so none may run elsewhere."""
    cfg = next(iter(cfgs.values()))
    executors.check_available(cfg)
    for stage in todo:
        _torch_can_use_gpus(cfgs[stage], stage)
    if todo:
        _tracking_answers(cfg)
        _experiment_not_deleted(cfg)
    for stage in todo:
        _checkpoints_resumable(cfgs[stage], stage)
        if cfg.cluster.name != "slurm":
            _not_queued(cfg, stage)
            stage_lock.check_free(stage_dir(cfg, stage), detect().rank, stage_name(cfg, stage))


_NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "fuse.")


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding ``path`` (or its nearest existing parent), from the
    longest mount point above it in /proc/self/mounts (``mounts`` replaces that file's text)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return "unknown"
    path = Path(os.path.abspath(path))
    best, fstype = -1, "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) > best:
            best, fstype = len(point), fields[2]
    return fstype


def _tracking_answers(cfg: DictConfig) -> None:
    """A stage needs its MLflow server when it starts (later it holds records through an outage).
    A job is queued anyway: the cluster's nodes may reach a server this machine does not."""
    uri = tracking_uri(cfg)
    fstype = filesystem_type(Path(cfg.run_root))
    if cfg.cluster.name == "slurm" and not cfg.tracking.uri and fstype.startswith(_NETWORK_FS):
        _warn(f"tracking.uri is unset: jobs on several nodes will write one sqlite file, {uri}, on "
              f"{fstype}, where sqlite's locks are not reliable; on a cluster run `mlflow server` on "
              "a host the nodes reach and pass tracking.uri=http://<host>:5000")
    away = reachable(uri)
    if not away:
        return
    if cfg.cluster.name == "slurm":
        _warn(f"tracking.uri={uri} does not answer here ({away}); queueing anyway: the jobs need "
              "it from the compute nodes when they start")
        return
    raise ConfigError(f"tracking.uri={uri}", f"no MLflow server answers ({away})",
                      "start it (`mlflow server --host 0.0.0.0 --port 5000 ...`), fix the address, "
                      "or leave tracking.uri unset for the local store in run_root")


def _experiment_not_deleted(cfg: DictConfig) -> None:
    """An experiment deleted in the MLflow UI fails every stage as it starts; said before anything
    runs or is queued (where the store answers here: a job checks again as it starts)."""
    from pipeline.tracking import deleted_experiment

    uri = tracking_uri(cfg)
    file = local_store.path(uri)
    if (file and not file.exists()) or reachable(uri):
        return  # no store yet, so nothing deleted; or a server that does not answer here
    exp = local_store.experiment(uri, str(cfg.experiment))
    if exp is False:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(str(cfg.experiment))
    deleted = deleted_experiment(exp, uri)
    if deleted:
        raise ConfigError(f"experiment={cfg.experiment}", *deleted)


def prepared_otherwise(cfg: DictConfig, stage: str) -> str:
    """What to say where ``stage`` reads shards prepare wrote with other data settings than ``cfg``'s
    (data.source, data.shard_size, ...): it reads them as they are, which the user may not expect
    (a new data.source without a new experiment=); '' where not."""
    if stage == "prepare" or cfg.verify:
        return ""
    changed = records.settings_changed(cfg, "prepare", only=PREPARE_ONLY)
    return (f"prepare ran with other data settings ({changed}), and {stage_name(cfg, stage)} builds on its shards "
            "as they are -- pass experiment=<a new name> to prepare the data with these settings") if changed else ""


def _not_queued(cfg: DictConfig, stage: str) -> None:
    """A second job (or a local run) on a stage whose SLURM job is still queued or running would
    write the same checkpoints and outputs."""
    try:
        live = records.live_job(stage_dir(cfg, stage))
    except queue.SlurmUnavailable as e:
        raise ConfigError(f"stage={stage_name(cfg, stage)}", str(e), "submit again once `squeue` answers: "
                          "nothing was submitted (a second job beside a live one would write the same outputs)")
    if live:
        job, state = live
        raise ConfigError(f"stage={stage_name(cfg, stage)}", f"its SLURM job {job} is still {state}",
                          f"wait for it (submit status {records.experiment_args(cfg)}) "
                          f"or cancel it first: scancel {job}")


# Stages whose done outputs a rerun with other settings refuses (after un-marking them done, in the
# job): their shards are bound to the settings that wrote them. A training continues its checkpoint
# (more steps, another lr), and evaluate recomputes its metrics.
_SHARD_STAGES = ("prepare", "encode", "sample")


def _done_outputs_kept(cfg: DictConfig, stage: str) -> None:
    """A done prepare, encode or sample run again with other settings would be un-marked done and
    fail on its own shards: refused before anything is touched."""
    from pipeline.stages import DONE

    if stage not in _SHARD_STAGES or cfg.verify or not (stage_dir(cfg, stage) / DONE).exists():
        return
    changed = records.settings_changed(cfg, stage)
    if changed:
        new_set = "sample_set=<name> to draw another set beside it" if stage == "sample" else \
            "experiment=<a new name> to make them anew"
        raise ConfigError(f"stage={stage_name(cfg, stage)}", f"is done, with other settings ({changed}), and "
                          "finished outputs are never overwritten", f"pass the values it ran with, or {new_set}")


def _torch_can_use_gpus(cfg: DictConfig, stage: str) -> None:
    """A SLURM job runs this very Python (submitit starts ``sys.executable``): with a CPU-only torch
    here, the GPUs a job asks for are of no use to it, and it would fail only after its wait in the
    queue (NoUsableGPU)."""
    import torch

    gpus = int(cfg.cluster.get("gpus_per_node") or 0) if cfg.cluster.name == "slurm" else 0
    if gpus and gpu_build() is None:
        raise ConfigError(f"cluster.gpus_per_node={gpus} (stage {stage_name(cfg, stage)})",
                          f"the jobs run {sys.executable}, whose torch {torch.__version__} is a CPU-only build",
                          "install a CUDA build of torch there, or set cluster.gpus_per_node=0 "
                          f"({stage}:cluster.gpus_per_node=0 for that stage alone)")


def _checkpoints_resumable(cfg: DictConfig, stage: str) -> None:
    """A training resumes its checkpoints: refused, before its config, command and MLflow run are
    touched, where it cannot (the training refuses it too, for a job queued before they existed).
    resume=false asks for a fresh start: refused where checkpoints exist (nothing is deleted)."""
    latest = stage_dir(cfg, stage) / "checkpoints" / "latest"
    if not latest.exists():
        return
    tag = latest.read_text().strip()
    if not cfg.resume:
        raise ConfigError("resume=false", f"{latest.parent} holds checkpoints (latest {tag}) "
                          "and nothing is deleted", "pass experiment=<a new name> to start over elsewhere, or "
                          "move that directory away (or drop resume=false to continue it)")
    refusal = resume_refusal(latest.parent / tag, cfg, stage)
    if refusal:
        raise ConfigError(f"stage={stage_name(cfg, stage)}", refusal, RESUME_FIX)
