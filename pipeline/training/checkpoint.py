"""One checkpoint manager: the DeepSpeed engine state plus the trainer's client state and every
rank's RNG states, saved together and loaded together.

Layout: ``<stage_dir>/checkpoints/step_00001234/`` (DeepSpeed's files, ``client.json``,
``rng_rank<r>.pt``) and ``latest`` naming the newest complete one. ``latest`` moves only after
every rank finished writing (barrier), atomically, so a crash mid-write leaves the previous
checkpoint loadable. Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import atomic

log = logging.getLogger(__name__)
LATEST = "latest"


class CheckpointMismatch(RuntimeError):
    """The checkpoint cannot be restored into this job; the message says why and what to do."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, directory: Path, rank: int, world_size: int, keep: int = 2):
        self.dir, self.rank, self.world_size, self.keep = Path(directory), rank, world_size, max(1, keep)

    def latest(self) -> str | None:
        pointer = self.dir / LATEST
        return pointer.read_text().strip() if pointer.exists() else None

    def save(self, engine: Any, step: int, client: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = f"step_{step:08d}"
        path = self.dir / tag
        if self.rank == 0 and path.exists():  # a leftover of a crash at this very step
            shutil.rmtree(path)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={}, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            atomic.write_json(path / "client.json", {**client, "world_size": self.world_size, "step": step})
        _barrier()  # everyone has written: only now does the checkpoint count
        if self.rank == 0:
            atomic.write_text(self.dir / LATEST, tag + "\n")
            self._prune(keep_tag=tag)
        _barrier()
        return path

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for old in [t for t in tags if t < keep_tag][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    def load(self, engine: Any, weights_only: bool = False) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint into ``engine`` (and this rank's RNG); returns its
        client state, or None when there is none."""
        tag = self.latest()
        if tag is None:
            return None
        path = self.dir / tag
        client = json.loads((path / "client.json").read_text())
        if client["world_size"] != self.world_size and not weights_only:
            raise CheckpointMismatch(
                f"{path} was written by {client['world_size']} data-parallel ranks, this job has "
                f"{self.world_size}: optimizer state is sharded per rank and cannot be restored. Rerun "
                f"with {client['world_size']} ranks, or pass resume_weights_only=true to load the "
                "weights only (fresh optimizer; the step count continues)")
        loaded, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_module_only=weights_only,
                                           load_optimizer_states=not weights_only,
                                           load_lr_scheduler_states=not weights_only)
        if loaded is None:
            raise CheckpointMismatch(f"{path}: DeepSpeed could not load it; move it away to start over")
        rng_file = path / f"rng_rank{self.rank}.pt"
        if not weights_only and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("resumed from %s (step %d%s)", path, client["step"], ", weights only" if weights_only else "")
        return client
