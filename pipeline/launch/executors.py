"""Executors: where a StageJob runs.

``cluster=local`` runs the job inside the ``submit`` process: no pickling, no extra process, the
stage's output and exit status are the command's own, and Ctrl-C/SIGTERM mark the MLflow run
KILLED. ``cluster=slurm`` submits it through submitit (the executor is named explicitly: submitit's
AutoExecutor would pick SLURM whenever ``sbatch`` exists) and returns once the job is queued.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from contextlib import AbstractContextManager
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, stage_dir, stage_name
from pipeline.launch import stage_lock
from pipeline.launch.jobs import StageJob
from pipeline.training.distributed import detect

AVAILABLE = ("local", "slurm")
ARRAY_STAGES = ("prepare", "encode", "sample")  # stages whose work splits into independent shards


class JobRefused(Exception):
    """sbatch refused a stage's job (a partition that does not exist, more GPUs than a node has, an
    account or QOS not allowed); the message holds sbatch's own words."""

    FIX = ("check cluster.partition, cluster.account, cluster.qos, cluster.nodes, cluster.gpus_per_node, "
           "cluster.cpus_per_task, cluster.mem_gb, cluster.time_min, cluster.extra")

    def __init__(self, stage: str, words: str) -> None:
        super().__init__(f"SLURM refused the job of stage {stage}: {words}")
        self.stage = stage


def check_available(cfg: DictConfig) -> None:
    name = str(cfg.cluster.name)
    if name not in AVAILABLE:
        raise ConfigError(f"cluster={name}", "unknown executor", f"choose one of: {', '.join(AVAILABLE)}")
    if name == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("cluster=slurm", "sbatch is not on PATH (no SLURM client here)",
                          "run on a SLURM login node, start slurm/local-cluster.sh, or use cluster=local")


def run(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """Run ``stage`` in this process, holding its lock (see `exclusive`)."""
    check_available(cfg)
    with exclusive(cfg, stage):
        return StageJob(cfg, stage)()


def exclusive(cfg: DictConfig, stage: str) -> AbstractContextManager[None]:
    """This process's claim on the stage (per rank) while it runs here; raises StageBusy if another
    process holds it."""
    return stage_lock.exclusive(stage_dir(cfg, stage), detect().rank, stage_name(cfg, stage))


def slurm_executor(cfg: DictConfig, stage: str, array: int = 1) -> Any:
    import submitit

    c = cfg.cluster
    folder = stage_dir(cfg, stage) / "slurm" / ("%A" if array > 1 else "%j")  # one folder per job id
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(c.max_requeues))
    gpus = int(c.gpus_per_node)
    extra = {k: v for k, v in {"account": c.account, "qos": c.qos, "constraint": c.constraint,
                               "exclude": c.exclude}.items() if v}
    extra.update(OmegaConf.to_container(c.extra, resolve=True) or {})
    params: dict[str, Any] = dict(
        job_name=f"{cfg.experiment}:{stage_name(cfg, stage)}", nodes=1 if array > 1 else int(c.nodes),
        ntasks_per_node=1 if array > 1 else (gpus or int(c.tasks_per_node)),
        cpus_per_task=int(c.cpus_per_task), mem=f"{int(c.mem_gb)}G", time=int(c.time_min),
        signal_delay_s=int(c.signal_delay_s), setup=list(c.setup), additional_parameters=extra,
        stderr_to_stdout=False)
    if gpus:
        params["gpus_per_node"] = gpus
    if bool(c.kill_on_bad_exit) and params["nodes"] * params["ntasks_per_node"] > 1:
        # a rank that failed leaves the others blocked in a collective: end the step with it (a
        # stopped training's other ranks wait for rank 0's requeue rather than exit first)
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    if c.partition:
        params["partition"] = str(c.partition)
    if array > 1:
        params["array_parallelism"] = array
    executor.update_parameters(**params)
    return executor


def submit_slurm(cfg: DictConfig, stage: str, dependency: list[str] | None = None,
                 kill_on_invalid_dep: bool = False) -> list[Any]:
    """Queue ``stage`` (a job array for shard-parallel stages); returns the submitit jobs. Raises
    JobRefused where sbatch refuses it."""
    from submitit.core.utils import FailedJobError

    array = int(cfg.cluster.array_tasks) if stage in ARRAY_STAGES else 1
    executor = slurm_executor(cfg, stage, array)
    if dependency:
        executor.update_parameters(dependency="afterok:" + ":".join(dependency))
    if kill_on_invalid_dep:  # a failed dependency cancels this job instead of leaving it pending
        extra = dict(executor.parameters.get("additional_parameters", {}))
        executor.update_parameters(additional_parameters={**extra, "kill_on_invalid_dep": "yes"})
    stage_dir(cfg, stage).mkdir(parents=True, exist_ok=True)
    pickles = stage_dir(cfg, stage) / "slurm"  # submitit's files of a job not queued yet
    before = set(pickles.iterdir()) if pickles.is_dir() else set()
    printed = io.StringIO()  # submitit prints sbatch's refusal before raising it: said once, below
    try:
        with contextlib.redirect_stderr(printed):
            jobs = (executor.submit_array([StageJob(cfg, stage, i, array) for i in range(array)]) if array > 1
                    else [executor.submit(StageJob(cfg, stage))])
    except FailedJobError as e:  # sbatch's words are the useful part, not submitit's traceback
        for left in (set(pickles.iterdir()) - before) if pickles.is_dir() else ():
            if left.is_file():  # the refused job's pickles and sbatch script: nothing will read them
                left.unlink()
        words = [line.strip().removeprefix("sbatch: error: ") for line in str(e).splitlines() if line.strip()]
        raise JobRefused(stage, "; ".join(words)) from None
    except BaseException:
        sys.stderr.write(printed.getvalue())
        raise
    sys.stderr.write(printed.getvalue())
    return jobs


def job_summary(jobs: list[Any]) -> str:
    first = jobs[0]
    ids = first.job_id.split("_")[0] if len(jobs) > 1 else first.job_id
    lines = [f"  job:     {ids}" + (f" (array of {len(jobs)} tasks)" if len(jobs) > 1 else ""),
             f"  stdout:  {first.paths.stdout}", f"  stderr:  {first.paths.stderr}"]
    return "\n".join(lines)

