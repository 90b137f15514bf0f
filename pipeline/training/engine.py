"""The one training engine (DeepSpeed) shared by the VQ-VAE and both priors.

A ``Task`` says what is trained (model, batches, loss, evaluation, export); the engine does the
rest the same way for all three: distributed set-up, AdamW + warm-up/cosine schedule, DeepSpeed
(ZeRO 0/1/2, bf16, accumulation, clipping), MLflow metrics, progress bar, checkpoints, resume,
stop requests and NaN guards, and the final DeepSpeed-free ``model.pt``.

Data stream and exact resume: the training stream is cut into segments of ``train.ckpt_every``
steps, each seeded from (seed, rank, worker, segment start). An uninterrupted run and a run resumed
from any checkpoint therefore read the same batches; a checkpoint taken between boundaries (a stop
request) is resumed by fast-forwarding through its segment (``train.exact_resume``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline import atomic
from pipeline.progress import progress_bar
from pipeline.stages import PROGRESS, StageContext
from pipeline.tracking import StageStopped
from pipeline.training import distributed
from pipeline.training.checkpoint import CheckpointManager, CheckpointMismatch
from pipeline.training.fingerprint import RESUME_FIX, resume_refusal, trained_with

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the last good checkpoint was left untouched."""


class Task(Protocol):
    """What a stage trains. Batches are whatever ``loss`` takes."""

    kind: str  # "vqvae", "top_prior" or "bottom_prior": recorded in model.pt

    def build_model(self) -> nn.Module: ...

    def batches(self, start_step: int, steps: int, micro_batches_per_step: int) -> Iterator[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, model: nn.Module, step: int, ctx: StageContext) -> dict[str, float]: ...

    def export_meta(self) -> dict[str, Any]: ...


class _StopFlag:
    """SIGUSR2/SIGTERM only set a flag; the ranks agree at the next step boundary. So does the first
    Ctrl-C of an interactive run (a second one aborts at once, without a checkpoint)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_ctrl_c)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal, self.signum = signal.Signals(signum).name, signum

    def _handle_ctrl_c(self, signum: int, frame: Any) -> None:
        self._handle(signum, frame)
        signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
        log.warning("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again aborts without one)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    bf16 = torch.cuda.is_available() if ds.bf16 == "auto" else bool(ds.bf16)  # auto: on with a GPU
    return {
        "train_micro_batch_size_per_gpu": int(ds.micro_batch),
        "gradient_accumulation_steps": int(ds.grad_accum),
        "gradient_clipping": float(ds.grad_clip),
        "zero_optimization": {"stage": int(ds.zero_stage)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cpu_emulates_bf16() -> bool:
    """An x86 CPU without AVX-512 BF16 or AMX: no bf16 arithmetic, so torch's bf16 kernels emulate it."""
    try:  # torch's own private probes; without them no CPU is called slow
        return bool(torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_bf16_supported()
                    and not torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def train(cfg: DictConfig, ctx: StageContext, task: Task) -> dict[str, Any]:
    """Train ``task`` to ``train.max_steps`` (resuming if a checkpoint exists); collective."""
    # Every rank takes the stop and divergence decisions together, so all of them reach the barrier.
    with distributed.process_group(agreed=(StageStopped, Diverged)) as info:
        return _train(cfg, ctx, task, info)


def _train(cfg: DictConfig, ctx: StageContext, task: Task, info: distributed.DistEnv) -> dict[str, Any]:
    import deepspeed

    t = cfg.train
    torch.manual_seed(int(cfg.seed) + info.rank)
    model = task.build_model().to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(t.lr), betas=tuple(t.betas),
                                  weight_decay=float(t.weight_decay))
    max_steps, warmup = int(t.max_steps), int(t.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, max_steps, str(t.schedule), float(t.min_lr_ratio)))
    ds_config = deepspeed_config(cfg)
    ckpts = CheckpointManager(ctx.stage_dir / "checkpoints", info.rank, info.world_size, int(t.keep_ckpts))
    ckpts.configure(ds_config, bool(cfg.resume_weights_only))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if bool(t.channels_last) and ds_config["zero_optimization"]["stage"] == 0 and not ds_config["bf16"]["enabled"]:
        # Faster convolutions (tools/bench_train.py); the loaders emit NHWC memory. Only after
        # initialize (DeepSpeed's broadcast needs contiguous parameters) and only where DeepSpeed
        # does not keep flattened views of the parameters (ZeRO >= 1, bf16).
        engine.module.to(memory_format=torch.channels_last)
    client = _resume(cfg, ctx.stage, ckpts, engine)
    step, samples = int(client.get("step", 0)), int(client.get("samples", 0))
    ga = int(cfg.deepspeed.grad_accum)
    global_batch = int(cfg.deepspeed.micro_batch) * ga * info.world_size
    last_logged = ctx.run.last_step("loss")
    ctx.log.info("training %s: %s parameters, step %d of %d, global batch %d, %d rank(s) (%s), %s, %s, "
                 "%d CPU thread(s) per rank", task.kind, f"{sum(p.numel() for p in model.parameters()):,}", step,
                 max_steps, global_batch, info.world_size, info.source, info.device,
                 "bf16" if ds_config["bf16"]["enabled"] else "fp32", torch.get_num_threads())
    if ds_config["bf16"]["enabled"] and info.device.type == "cpu" and cpu_emulates_bf16():
        ctx.log.warning("deepspeed.bf16=true on a CPU without bf16 units (no AVX-512 BF16 or AMX): torch "
                        "emulates bf16 here, ~10x slower than fp32 (tools/bench_train.py) -- "
                        "deepspeed.bf16=auto trains in fp32 on CPU")
    ctx.run.set_tags({"world_size": info.world_size, "global_batch": global_batch})
    ctx.log.info("memory per rank: %.2f GB of fp32 weights, gradients and AdamW state (before ZeRO "
                 "sharding and activations)%s", 16 * sum(p.numel() for p in model.parameters()) / 2**30,
                 _peak_memory())

    if step > max_steps:  # a training does not go back: its checkpoint is what it is
        ctx.log.warning("%s: the checkpoint is at step %d, past train.max_steps=%d: nothing to train, used as it "
                        "is (experiment=<a new name> trains one of %d steps)", task.kind, step, max_steps, max_steps)
    elif step == max_steps:
        ctx.log.info("%s: already trained to train.max_steps=%d: nothing to train", task.kind, max_steps)
    every = max(1, int(t.ckpt_every))
    window: dict[str, float] = {}
    results: dict[str, float] = {}  # the latest validation: part of the stage's summary
    n_window, wait, t_window = 0, 0.0, time.perf_counter()
    with _StopFlag() as stop, progress_bar(total=max_steps, initial=step, desc=task.kind, unit="step",
                                           disable=info.rank != 0) as bar:
        stream = _segment(task, step, max_steps, every, ga, bool(t.exact_resume))
        while step < max_steps:
            if step % every == 0 and step > 0 and stream.start != step:
                stream = _segment(task, step, max_steps, every, ga, True)
            engine.train()
            for _ in range(ga):
                t0 = time.perf_counter()
                batch = next(stream.batches)
                wait += time.perf_counter() - t0
                loss, terms = task.loss(engine, batch)
                if t.inject_nan_at_step is not None and step + 1 == int(t.inject_nan_at_step):
                    loss = loss * float("nan")  # fault injection for tests and drills
                engine.backward(loss)
                engine.step()
                for k, v in terms.items():
                    window[k] = window.get(k, 0.0) + float(v.detach()) / ga
            _average_batch_norm_stats(engine.module, info.world_size)
            step += 1
            samples += global_batch
            n_window += 1
            bar.update(1)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            if not distributed.all_true(math.isfinite(float(loss.detach())) and math.isfinite(grad_norm)):
                kept = (f"the last checkpoint, {ckpts.latest()}, is intact and a rerun resumes from it"
                        if ckpts.latest() else "no checkpoint was saved yet")
                raise Diverged(f"non-finite loss or gradient norm at step {step} (loss {float(loss):.4g}, "
                               f"grad norm {grad_norm:.4g}); {kept}; lower train.lr or raise train.warmup_steps")
            if step % int(t.log_every) == 0 or step == max_steps:
                elapsed = time.perf_counter() - t_window
                metrics = {k: v / n_window for k, v in window.items()}
                metrics.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                               samples_per_s=n_window * global_batch / elapsed,
                               loader_wait_fraction=wait / elapsed, corrupt_samples=stream.corrupt(),
                               samples_seen=samples)
                if step > last_logged:  # after a resume, steps already logged are not logged again
                    ctx.run.log_metrics(metrics, step=step)
                if info.rank == 0:
                    atomic.write_json(ctx.stage_dir / PROGRESS, {"step": step, "max_steps": max_steps,
                                                                 "steps_per_s": n_window / elapsed, "time": time.time()})
                bar.set_postfix(loss=f"{metrics.get('loss', 0):.4f}", refresh=False)  # shown at the next redraw
                window, n_window, wait, t_window = {}, 0, 0.0, time.perf_counter()
            if step % int(t.eval_every) == 0 or step == max_steps:
                engine.eval()
                with torch.no_grad():
                    results = task.evaluate(engine.module, step, ctx)
                if step > last_logged:
                    ctx.run.log_metrics(results, step=step)
                ctx.log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
            stop_now = distributed.any_true(stop.signal is not None)
            if step % every == 0 or step == max_steps or stop_now:
                ckpts.save(engine, step, {"samples": samples, "segment_start": stream.start,
                                          "trained_with": trained_with(cfg), "mlflow_run_id": ctx.run.run_id})
            if stop_now and step < max_steps:
                raise StageStopped(f"stop requested ({stop.signal or 'another rank'}); checkpoint saved at "
                                   f"step {step}; rerun the same command to resume", stop.signum)
    if not results:  # nothing trained in this run: the stage's summary still carries the validation
        engine.eval()
        with torch.no_grad():
            results = task.evaluate(engine.module, step, ctx)
    digest = _check_replicas(engine)
    ctx.log.info("weights and buffers identical on all %d rank(s): sha256 %s", info.world_size, digest)
    out = _export(cfg, ctx, task, engine, info.rank, step)
    return {**results, "steps": step, "samples_seen": samples, "model": str(out), "outputs": str(ctx.stage_dir)}


def _peak_memory() -> str:
    if torch.cuda.is_available():
        return f"; peak CUDA memory so far {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"
    return ""


class _Stream:
    def __init__(self, start: int, batches: Iterator[Any], source: Any):
        self.start, self.batches, self._source = start, batches, source

    def corrupt(self) -> int:
        return int(getattr(self._source, "corrupt", 0))


def _segment(task: Task, step: int, max_steps: int, every: int, ga: int, exact: bool) -> _Stream:
    """The data for the segment holding ``step``; fast-forwarded to ``step`` when ``exact``."""
    start = (step // every) * every if exact else step
    end = min(max_steps, (step // every + 1) * every)
    source = task.batches(start, end - start, ga)
    batches = iter(source)
    for _ in range((step - start) * ga):  # exact resume mid-segment: replay the stream, not the model
        next(batches)
    return _Stream(start, batches, source)


def _resume(cfg: DictConfig, stage: str, ckpts: CheckpointManager, engine: Any) -> dict[str, Any]:
    if ckpts.latest() is None:
        return {}
    if not bool(cfg.resume):
        raise CheckpointMismatch(
            f"resume=false but {ckpts.dir} holds checkpoints ({ckpts.latest()}); nothing is deleted: pass "
            "experiment=<a new name> to start over elsewhere, or move that directory away")
    refusal = resume_refusal(ckpts.dir / ckpts.latest(), cfg, stage)
    if refusal:
        raise CheckpointMismatch(f"{refusal}: {RESUME_FIX}")
    return ckpts.load(engine, weights_only=bool(cfg.resume_weights_only)) or {}


def _average_batch_norm_stats(model: nn.Module, world_size: int) -> None:
    """Each rank's batch norm sees its own batches, so the ranks' running statistics would drift
    apart (DeepSpeed, unlike DDP, leaves buffers alone): averaging them after every step keeps the
    replicas identical, and a checkpoint (saved from rank 0) resumes what every rank held."""
    import torch.distributed as dist

    if world_size == 1:  # the common case: no walk over the modules on every step
        return
    stats = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in (m.running_mean, m.running_var) if b is not None]
    if not stats:
        return
    flat = torch.cat([b.reshape(-1) for b in stats])
    dist.all_reduce(flat)
    flat /= world_size
    for b, avg in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(avg.view_as(b))


def _check_replicas(engine: Any) -> str:
    """Digest of this rank's weights and buffers (codebooks included); raises if ranks differ."""
    import torch.distributed as dist

    h = hashlib.sha256()
    for name, t in sorted(engine.module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()[:16]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(every, digest)
        if len(set(every)) > 1:
            raise RuntimeError(f"ranks hold different weights at the end of training: {every}")
    return digest


def _export(cfg: DictConfig, ctx: StageContext, task: Task, engine: Any, rank: int, step: int) -> Path:
    """``model.pt``: fp32 weights, model config and data facts; loads with ``weights_only=True``.
    A file holding these weights already is kept: later stages know a model by its file's sha256."""
    path = ctx.stage_dir / "model.pt"
    if rank == 0:
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                 for k, v in engine.module.state_dict().items()}
        blob = {"kind": task.kind, "state_dict": state,
                "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                "resolution": int(cfg.data.resolution), "step": step, **task.export_meta()}
        if _holds(path, blob):
            ctx.log.info("%s holds these weights already: kept", path)
            return path
        tmp = atomic.temp_name(path)
        with open(tmp, "wb") as f:  # a file object: the archive's inner name is not the temp file's
            torch.save(blob, f)
        atomic.commit(tmp, path)
        ctx.run.log_artifact(path)
        ctx.log.info("exported %s", path)
    return path


def _holds(path: Path, blob: dict[str, Any]) -> bool:
    """Whether ``path`` is an export of the same weights and facts (the model config aside: a model.*
    section of another stage may differ, and the weights say the rest)."""
    if not path.exists():
        return False
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: written again
        return False
    ours, theirs = blob["state_dict"], old.get("state_dict", {})
    facts = (blob.keys() | old.keys()) - {"state_dict", "model_config"}
    return (all(old.get(k) == blob.get(k) for k in facts) and ours.keys() == theirs.keys()
            and all(torch.equal(ours[k], theirs[k]) for k in ours))
