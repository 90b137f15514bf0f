#!/usr/bin/env python
"""Checkpoint save and load time of the trained models, through the training's own path
(DeepSpeed engine + CheckpointManager), with the optimizer state allocated as after a step.

    python tools/bench_checkpoint.py                                     # paper_imagenet256, all three
    python tools/bench_checkpoint.py --models top_prior --dir /shared/scratch/ckpt-bench
    python tools/bench_checkpoint.py --preset tiny_digits
    torchrun --nproc-per-node 8 tools/bench_checkpoint.py --zero-stage 2 --dir /shared/scratch   # 8 ranks
    python tools/bench_checkpoint.py --models top_prior --zero-stage 1 --reshard
    python tools/bench_checkpoint.py --models top_prior --reshard --into 1      # ZeRO-0 into ZeRO-1

What it answers: does a stop request leave the time to save? A preempted or timed-out job gets USR2
``cluster.signal_delay_s`` (120 s) before SLURM kills it, a ``scancel``/``submit cancel`` SIGTERM
and then ``KillWait`` (SLURM's default 30 s) before SIGKILL: the current step plus the save must
fit. Run it with ``--dir`` on the filesystem that holds ``run_root`` on the cluster: a checkpoint
goes where the stage directory is. ``save`` is until the manager returns (the data is in the page
cache: a process killed after it loses nothing); ``+ sync`` adds writing it to the disk (what a
node crash would need); the times are rank 0's. fp32 weights + AdamW state; under torchrun with
``--zero-stage 1`` or ``2`` each rank writes its shard of the optimizer state. The gradients are
zero: the sizes, not the values, set the cost.

``--reshard`` adds what a resume on another number of ranks or in another layout costs: an engine
of ZeRO stage ``--into`` (which implies ``--reshard``; default: 2 after 1, else 1) resumes the
checkpoint, which takes the same way as another number of ranks (rank 0 converts it through
DeepSpeed's universal format, every rank loads its new shard from there); ``re-shard`` is that
resume, conversion included, and ``convert`` the conversion alone (rank 0, one worker).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.config import config_dir
from pipeline.models import build, parameter_count
from pipeline.training import distributed
from pipeline.training.checkpoint import CheckpointManager
from pipeline.training.engine import deepspeed_config


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _engine(which: str, model_cfg, num_classes: int, zero_stage: int, ckpts: CheckpointManager | None = None):
    import deepspeed

    model = build(which, model_cfg, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = OmegaConf.load(config_dir() / "deepspeed" / "default.yaml")
    cfg.zero_stage, cfg.bf16 = zero_stage, False
    ds_config = deepspeed_config(OmegaConf.create({"deepspeed": cfg}))
    if ckpts is not None:
        ckpts.configure(ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def measure(which: str, model_cfg, num_classes: int, out: Path, zero_stage: int, reshard: int | None,
            info: distributed.DistEnv) -> dict[str, float]:
    engine = _engine(which, model_cfg, num_classes, zero_stage)
    # one step with zero gradients: AdamW allocates its two moments per parameter, as in training
    engine.backward(sum(p.sum() * 0.0 for p in engine.module.parameters()))
    engine.step()
    ckpts = CheckpointManager(out / which, rank=info.rank, world_size=info.world_size, keep=1)
    t0 = time.perf_counter()
    path = ckpts.save(engine, 1, {"samples": 0})
    saved = time.perf_counter() - t0
    os.sync()
    synced = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpts.load(engine)
    loaded = time.perf_counter() - t0
    result = {"params": parameter_count(engine.module), "bytes": _size(path), "save_s": saved, "sync_s": synced,
              "load_s": loaded}
    del engine
    gc.collect()  # one engine at a time: paper-size models fill a small machine's memory
    if reshard is not None:
        engine = _engine(which, model_cfg, num_classes, reshard, ckpts)
        convert = _Timed(ckpts, "_convert")
        t0 = time.perf_counter()
        ckpts.load(engine)
        result.update(reshard_s=time.perf_counter() - t0, convert_s=convert.seconds)
        del engine
        gc.collect()
    distributed.all_true(True)  # every rank has loaded before rank 0 removes the files
    if info.rank == 0:
        shutil.rmtree(out / which)
    return result


class _Timed:
    """Times the calls of ``obj.name`` (an instance attribute wraps the method)."""

    def __init__(self, obj, name: str):
        self.seconds, method = 0.0, getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="paper_imagenet256")
    ap.add_argument("--models", default="vqvae,top_prior,bottom_prior")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    ap.add_argument("--reshard", action="store_true", help="also time a resume through the universal format")
    ap.add_argument("--into", type=int, choices=(0, 1, 2), default=None,
                    help="the ZeRO stage that resumes the checkpoint (implies --reshard; default: 2 after 1, else 1)")
    args = ap.parse_args()
    args.reshard = args.reshard or args.into is not None  # --into alone asks for the resume it names
    into = (args.into if args.into is not None else 2 if args.zero_stage == 1 else 1) if args.reshard else None
    if into == args.zero_stage == 0:
        ap.error("--into 0 after --zero-stage 0: a ZeRO-0 checkpoint resumes into ZeRO-0 as it is, unconverted")
    model_cfg = OmegaConf.load(config_dir() / "model" / f"{args.preset}.yaml")
    with distributed.process_group() as info:
        # one directory for all ranks (under torchrun: --dir on a filesystem they share)
        base = (args.dir or Path(tempfile.gettempdir())) / f"ckpt-bench-{info.master_port}"
        say = print if info.rank == 0 else (lambda *a, **k: None)
        say(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"preset {args.preset}, ZeRO {args.zero_stage}{'' if into is None else f' resumed by ZeRO {into}'}, "
            f"{info.world_size} rank(s), writing under {base}")
        say(f"{'model':<14}{'params':>14}{'checkpoint':>12}{'save':>9}{'+ sync':>9}{'load':>9}"
            + (f"{'re-shard':>10}{'convert':>9}" if args.reshard else ""))
        for which in args.models.split(","):
            r = measure(which, model_cfg, args.num_classes, base, args.zero_stage, into, info)
            say(f"{which:<14}{r['params']:>14,}{r['bytes'] / 2**30:>9.2f}GiB{r['save_s']:>8.1f}s"
                f"{r['sync_s']:>8.1f}s{r['load_s']:>8.1f}s"
                + (f"{r['reshard_s']:>9.1f}s{r['convert_s']:>8.1f}s" if args.reshard else ""), flush=True)
        if info.rank == 0:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
