"""Executors: where a StageJob runs.

``cluster=local`` runs the job inside the ``submit`` process: no pickling, no extra process,
the stage's output and exit status are the command's own, and Ctrl-C/SIGTERM mark the MLflow
run KILLED. ``cluster=slurm`` (submitit) is delivered by the SLURM issue.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from pipeline.config import ConfigError
from pipeline.launch.jobs import StageJob

AVAILABLE = ("local",)


def check_available(cfg: DictConfig) -> None:
    name = str(cfg.cluster.name)
    if name not in AVAILABLE:
        raise ConfigError(f"cluster={name}", "this executor is not built yet (SLURM issue #6)",
                          "use cluster=local for now")


def run(cfg: DictConfig, stage: str) -> dict[str, Any]:
    check_available(cfg)
    return StageJob(cfg, stage)()
