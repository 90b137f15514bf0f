"""Stages: library functions ``run(cfg, ctx) -> summary`` that know nothing about schedulers.

The launch layer wraps each in a job (local or SLURM). A stage named in configs/stage/ but not
in ``BUILT`` is refused by ``submit`` with exit code 2 instead of pretending to run.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from pipeline.tracking import StageRun

# The pipeline's order (what `submit --help` lists and `stage=all` runs).
ORDER = ("prepare", "train_vqvae", "encode", "train_top_prior", "train_bottom_prior", "sample",
         "evaluate", "all")
# stage name -> "module:function"; imported lazily so `submit --help` stays fast.
BUILT: dict[str, str] = {
    "prepare": "pipeline.stages.prepare:run",
    "train_vqvae": "pipeline.stages.train_vqvae:run",
    "encode": "pipeline.stages.encode:run",
}
# Stages that exist as config entries and are delivered by later work (issue numbers).
PLANNED: dict[str, str] = {
    "train_top_prior": "#7", "train_bottom_prior": "#7",
    "sample": "#8", "evaluate": "#8",
}


@dataclass
class StageContext:
    stage: str
    stage_dir: Path       # ${run_root}/${experiment}/<stage>/
    run: StageRun         # MLflow run (no-op on ranks > 0)
    log: logging.Logger
    task: int = 0         # this array task's index (SLURM array jobs split work i, i+n, ...)
    tasks: int = 1        # number of array tasks


def stage_function(name: str) -> Callable[[DictConfig, StageContext], dict[str, Any]]:
    module, func = BUILT[name].split(":")
    return getattr(importlib.import_module(module), func)
