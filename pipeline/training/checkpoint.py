"""One checkpoint manager: the DeepSpeed engine state plus the trainer's client state and every
rank's RNG states, saved together and loaded together.

Layout: ``<stage_dir>/checkpoints/step_00001234/`` (DeepSpeed's files, ``client.json``,
``rng_rank<r>.pt``) and ``latest`` naming the newest complete one. ``latest`` moves only after
every rank finished writing (barrier), atomically, so a crash mid-write leaves the previous
checkpoint loadable. Only the last ``keep`` checkpoints are kept.

DeepSpeed keeps the optimizer state in a layout set by the ZeRO stage and bf16. A checkpoint resumes
with its whole optimizer state on any number of ranks and in any layout: a ZeRO-0 one holds it whole
and resumes as it is into its own layout; one whose state ZeRO sharded (stage 1/2) over another
number of ranks, or one of another layout, is converted first through DeepSpeed's universal format
(``checkpoints/universal/``, deleted once loaded), which re-shards it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import atomic
from pipeline.training import optimizer_state

log = logging.getLogger(__name__)
LATEST = "latest"
# the way out of every refusal of an optimizer state
WEIGHTS_ONLY_FIX = "pass resume_weights_only=true to load the weights only (fresh optimizer; the step count continues)"


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

    def configure(self, ds_config: dict[str, Any], weights_only: bool = False) -> None:
        """Add to the DeepSpeed config of the engine to come what resuming the latest checkpoint
        needs: ``{"checkpoint": {"load_universal": True}}`` where it goes through the universal format."""
        tag = self.latest()
        if tag is None or weights_only:
            return
        client = json.loads((self.dir / tag / "client.json").read_text())
        layout = _config_layout(ds_config)
        if layout["zero_stage"] >= 1 and self._needs_conversion(self.dir / tag, client, layout):
            ds_config["checkpoint"] = {"load_universal": True}

    def _needs_conversion(self, path: Path, client: dict[str, Any], layout: dict[str, Any]) -> bool:
        """Whether checkpoint ``path`` (``client`` its client.json) resumes into an engine of
        optimizer ``layout`` only once its optimizer state is converted: it was written in another
        layout, or ZeRO sharded it over another number of ranks."""
        return bool(_changed(client, layout)) or (_sharded(path) and client["world_size"] != self.world_size)

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
            atomic.write_json(path / "client.json", {**client, "world_size": self.world_size, "step": step,
                                                     **optimizer_layout(engine)})
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
        layout = optimizer_layout(engine)
        convert = not weights_only and self._needs_conversion(path, client, layout)
        universal = convert and layout["zero_stage"] >= 1  # the engine loads the universal format itself
        if not weights_only:
            if client["world_size"] != self.world_size:
                log.warning("%s was written by %d data-parallel rank(s), this job has %d: resumed with its whole "
                            "optimizer state%s; the global batch is that of %d rank(s) from here on", path,
                            client["world_size"], self.world_size, ", re-sharded" if universal else "",
                            self.world_size)
            then = _changed(client, layout)
            if then:
                log.warning("%s was written with %s, this job has %s: its optimizer state is converted", path,
                            _layout_text(then), _layout_text({k: layout[k] for k in then}))
        if universal and not engine.load_universal_checkpoint():
            raise RuntimeError("the engine was not initialised for a universal checkpoint (see configure())")
        load_dir = self._convert(path, client, engine) if convert else self.dir
        loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_only=weights_only,
                                           load_optimizer_states=not weights_only,
                                           load_lr_scheduler_states=not weights_only)
        if loaded is None:
            raise CheckpointMismatch(f"{path}: DeepSpeed could not load it; move it away to start over")
        if universal:  # a universal checkpoint restores the parameters only: the buffers (EMA codebooks)
            module = torch.load(load_dir / tag / optimizer_state.MODEL_STATES, map_location="cpu",
                                weights_only=False)["module"]
            buffers = {name for name, _ in engine.module.named_buffers()}
            engine.module.load_state_dict({k: v for k, v in module.items() if k in buffers}, strict=False)
        if convert:
            _barrier()  # every rank has loaded: the conversion has served
            if self.rank == 0:
                shutil.rmtree(self.dir / "universal", ignore_errors=True)
        rng_file = path / f"rng_rank{self.rank}.pt"
        if not weights_only and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("resumed from %s (step %d%s)", path, client["step"], ", weights only" if weights_only else "")
        return client

    def _convert(self, path: Path, client: dict[str, Any], engine: Any) -> Path:
        """Collective: checkpoint ``path`` (``client`` its client.json) converted by rank 0 for
        ``engine``: into DeepSpeed's universal format (one file per parameter and optimizer state,
        for any number of ranks) for a ZeRO-1/2 engine, from there into a ZeRO-0 checkpoint of the
        engine's layout for a ZeRO-0 one; the directory to load it from. Every rank raises
        CheckpointMismatch if rank 0 could not convert it."""
        out = self.dir / "universal"
        layout = optimizer_layout(engine)
        names = [name for name, _ in engine.module.named_parameters()]  # the optimizer's order
        converted, failed = out / f"{path.name}.converted", out / f"{path.name}.failed"

        def refusal(error: str) -> CheckpointMismatch:
            settings = _layout_text({k: client[k] for k in ("zero_stage", "bf16") if k in client}, as_keys=True)
            return CheckpointMismatch(
                f"{path}: converting its optimizer state for this job in DeepSpeed's universal format failed "
                f"({error}): resume it as it was written, on {client['world_size']} rank(s)"
                f"{' with ' + settings if settings else ''}, or {WEIGHTS_ONLY_FIX}")
        if self.rank == 0:
            shutil.rmtree(out, ignore_errors=True)  # what a conversion cut short left
        _barrier()  # from here on no rank can see an earlier conversion's marker
        if self.rank == 0:
            log.info("converting the optimizer state of %s for this job, through DeepSpeed's universal format "
                     "(in %s)", path, out)
            from deepspeed.checkpoint import ds_to_universal

            # one worker: forking this process (threads of its own, a process group) could hang
            args = argparse.Namespace(input_folder=str(path), output_folder=str(out / path.name),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            printed, t0 = io.StringIO(), time.perf_counter()
            try:
                with contextlib.redirect_stdout(printed):
                    if _sharded(path):
                        ds_to_universal.main(args)
                    else:  # a torch optimizer's state, which DeepSpeed converts to nothing
                        optimizer_state.zero0_to_universal(path, out / path.name, names)
                if layout["zero_stage"] == 0:
                    optimizer_state.universal_to_zero0(out / path.name, out / "zero0" / path.name, names,
                                                       bf16=layout["bf16"])
            except BaseException as e:
                # the others must not wait for ever where the launcher does not end them
                # (cluster.kill_on_bad_exit=false); the checkpoint itself is left as it was
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True, exist_ok=True)
                atomic.write_text(failed, f"{type(e).__name__}: {e}")
                if isinstance(e, Exception):
                    raise refusal(f"{type(e).__name__}: {e}") from e
                raise
            finally:
                log.debug("%s", printed.getvalue())
            atomic.write_text(converted, "")
            log.info("converted in %.0f s", time.perf_counter() - t0)
        # the others wait on a marker, not at a barrier: converting a large checkpoint can outlast
        # a collective's timeout (10 min)
        while not converted.exists():
            if failed.exists():
                raise refusal(f"rank 0: {failed.read_text()}")
            time.sleep(2)
        _barrier()
        return out / "zero0" if layout["zero_stage"] == 0 else out


def _changed(client: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The layout keys whose value in a checkpoint's ``client`` differs from ``now``, with the
    checkpoint's values; none where written before checkpoints kept their layout."""
    return {k: client[k] for k in now if k in client and client[k] != now[k]}


def _sharded(path: Path) -> bool:
    """Whether ZeRO (stage >= 1) sharded the optimizer state of checkpoint ``path`` over its ranks."""
    return any(path.glob("*zero_pp_rank_*_optim_states.pt"))


def optimizer_layout(engine: Any) -> dict[str, Any]:
    """What DeepSpeed's optimizer state layout depends on: kept in every checkpoint's client.json."""
    return {"zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled())}


def _config_layout(ds_config: dict[str, Any]) -> dict[str, Any]:
    return {"zero_stage": int(ds_config["zero_optimization"]["stage"]), "bf16": bool(ds_config["bf16"]["enabled"])}


def _layout_text(layout: dict[str, Any], as_keys: bool = False) -> str:
    if as_keys:
        return " ".join(f"deepspeed.{k}={str(v).lower()}" for k, v in layout.items())
    return ", ".join(f"ZeRO stage {v}" if k == "zero_stage" else f"bf16 {'on' if v else 'off'}"
                     for k, v in layout.items())
