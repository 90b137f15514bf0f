"""Who am I in the job: rank, world size, local rank, master address/port, device.

Sources, in order: SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of
``SLURM_JOB_NODELIST``, a port derived from ``SLURM_JOB_ID`` so every rank agrees), a torchrun
environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``), or a single
process. All five variables DeepSpeed reads are exported. The device is chosen by local rank with
``torch.cuda.set_device`` (cuda:0 where a task sees one GPU only, its own; see ``cuda_index``);
``CUDA_VISIBLE_DEVICES`` is never narrowed.
"""

from __future__ import annotations

import os
import sys
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that stop because another rank failed: that rank's error is the cause
    (``submit status`` shows it first)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "slurm", "torchrun" or "single"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", cuda_index(self.local_rank, torch.cuda.device_count())) \
            if torch.cuda.is_available() else torch.device("cpu")

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU a task uses among the ``visible`` ones: its local rank where every task of the node
    sees all the node's GPUs (SLURM's default, torchrun), 0 where each sees only its own (sites
    that bind a GPU per task: --gpu-bind, --gpus-per-task, cgroups); cuda:<local rank> there was
    an invalid device ordinal on every rank but the first."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise NoUsableGPU(f"local rank {local_rank} sees {visible} GPUs, neither one of its own nor all of the node's "
                      "-- each task needs one GPU or all: check the site's --gpu-bind / --gpus-per-task defaults "
                      "and cluster.extra")


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def resolve_host(host: str) -> str:
    """``host`` if it resolves, else its ``NodeAddr`` from ``scontrol show node`` (emulated or
    renamed SLURM nodes have names that DNS does not know)."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source(env: dict[str, str] | os._Environ) -> str:
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "RANK" not in env:
        return "slurm"
    return "torchrun" if "RANK" in env and "WORLD_SIZE" in env else "single"


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    if environ is None and _group_info is not None:
        # inside setup(), whose exported RANK/WORLD_SIZE would read as a torchrun launch (evaluate's
        # classifier trainings said "(torchrun)" in a single process, "slurm" ranks likewise)
        return _group_info
    env = os.environ if environ is None else environ
    if _source(env) == "slurm":
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                       resolve_host(first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))),
                       20000 + job % 20000, "slurm")  # not MASTER_*: sbatch may export the submitter's
    if _source(env) == "torchrun":
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "torchrun")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


@dataclass(frozen=True)
class Node:
    index: int  # this process's node in the job
    count: int  # nodes in the job
    name: str  # SLURM's node name, else node<index>
    execution: str  # this execution of the job: a requeued SLURM job or a restarted torchrun is another


def node(environ: dict[str, str] | None = None) -> Node:
    """Which node of the job this process runs on (one process on one machine: node 0 of 1)."""
    env = os.environ if environ is None else environ
    source = _source(env)
    if source == "slurm":
        index = int(env.get("SLURM_NODEID", "0"))
        return Node(index, int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1),
                    env.get("SLURMD_NODENAME") or f"node{index}",
                    f"slurm:{env.get('SLURM_JOB_ID', '')}:{env.get('SLURM_RESTART_COUNT', '0')}")
    if source == "torchrun":
        world = int(env["WORLD_SIZE"])
        per_node = max(1, int(env.get("LOCAL_WORLD_SIZE", world)))
        index = int(env.get("GROUP_RANK", int(env["RANK"]) // per_node))
        return Node(index, max(1, world // per_node), f"node{index}",
                    f"torchrun:{env.get('TORCHELASTIC_RUN_ID', '')}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    return Node(0, 1, "node0", f"single:{os.getpid()}")


def use_allotted_cpus(environ: dict[str, str] | None = None) -> str | None:
    """Lower torch's CPU threads to the cores SLURM allotted this task (``SLURM_CPUS_PER_TASK``);
    returns what it did, for the log (None: nothing to do).

    torch starts a thread per core of the machine, or of the task's CPU mask where SLURM binds tasks
    to cores. On a node shared with other jobs and no binding, a task allotted fewer cores would run
    more threads than it has, and OpenMP threads that spin waiting for each other then slow every
    job there several-fold. ``OMP_NUM_THREADS``, when set, is the user's choice and is kept."""
    env = os.environ if environ is None else environ
    allotted = env.get("SLURM_CPUS_PER_TASK", "")
    if not allotted.isdigit() or int(allotted) < 1 or env.get("OMP_NUM_THREADS"):
        return None
    before = torch.get_num_threads()
    if int(allotted) >= before:
        return None
    torch.set_num_threads(int(allotted))
    return (f"{int(allotted)} CPU thread(s) per task, the cores SLURM allotted (cluster.cpus_per_task), "
            f"not torch's default of {before}; OMP_NUM_THREADS=<n> chooses otherwise")


def gpu_build() -> str | None:
    """The GPU platform this torch was built for ("CUDA 13.0", or "ROCm 6.4.1": a ROCm build drives
    AMD GPUs through torch.cuda too, with torch.version.cuda None), None for a CPU-only build."""
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    hip = getattr(torch.version, "hip", None)
    return f"ROCm {hip}" if hip else None


class NoUsableGPU(RuntimeError):
    """SLURM gave this task GPUs that torch cannot use."""


def require_allotted_gpus(environ: dict[str, str] | None = None) -> None:
    """Raise :class:`NoUsableGPU` when SLURM allotted this task GPUs (``SLURM_GPUS_ON_NODE``) and
    torch can use none (no driver, a driver too old, a CPU-only torch wheel): the stage would
    otherwise run on the CPU, many times slower, for hours or days, holding GPUs it never touches."""
    env = os.environ if environ is None else environ
    allotted = env.get("SLURM_GPUS_ON_NODE", "")
    if not allotted.isdigit() or int(allotted) < 1 or torch.cuda.is_available():
        return
    try:
        torch.cuda.init()  # raises with the reason is_available() keeps to itself
        why = f"torch.cuda.device_count() is {torch.cuda.device_count()}"
    except Exception as e:  # its text is the diagnosis
        why = str(e).split(". ")[0]
    build = gpu_build() or "a CPU-only build"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not all(i.isdigit() for i in visible.split(",")):  # SLURM sets 0,1,...
        build += "; CUDA_VISIBLE_DEVICES " + ("unset" if visible is None else f"is '{visible}'")
    raise NoUsableGPU(
        f"SLURM gave this task {allotted} GPU(s), torch can use none: {why[:90]} (torch {torch.__version__}, "
        f"{build}) -- fix the node's driver or the job's environment (cluster.setup), cluster.exclude the node, "
        "or set cluster.gpus_per_node=0 to run on CPUs")


_EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
_saved_env: dict[str, str | None] = {}
_depth = 0  # setup() calls not yet torn down: the outermost teardown destroys the group
_group_info: DistEnv | None = None  # the outermost setup()'s, until its teardown


def setup() -> DistEnv:
    """Export the variables DeepSpeed needs, pick the device and initialise the process group (or
    join the one an enclosing setup() made: evaluate keeps one around its two trainings)."""
    global _depth, _group_info
    info = detect()
    if not _saved_env:  # teardown puts them back: a later job started from this process (a
        # subprocess, an sbatch that exports the environment) must not inherit this rank's identity
        # nor the accelerator this stage named
        _saved_env.update({k: os.environ.get(k) for k in _EXPORTED})
    # DeepSpeed's engine picks its GPU by LOCAL_RANK: given the device index, as for set_device below
    gpu = info.device.index if info.device.type == "cuda" else None
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_RANK=str(info.local_rank if gpu is None else gpu),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu)
    else:  # the device DeepSpeed would fall back to, named: its fallback warns of a GPU it may have missed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        import deepspeed

        if info.backend == "gloo":
            _skip_shared_memory_op()
        deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)
    _depth += 1  # only once it worked: a failed setup has no teardown
    _group_info = info
    return info


def _skip_shared_memory_op() -> None:
    """On CPU DeepSpeed compiles a C++ shared-memory op at every init that finds no build of it for
    this environment: 35-50 s, again on each machine and after another venv built it in between
    (the build's key holds the venv's paths). It serves only DeepSpeed's inference all-reduce
    (tensor-parallel inference); training's collectives go through the gloo process group. Its
    table of buildable ops is one dict that DeepSpeed keeps for the process, filled on first read
    by test-compiling every op (gcc lines in each stage's log, and a node may have no compiler)
    and read only by that build: seeding it with the op marked unbuildable skips both."""
    import deepspeed.ops

    compatible = vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    if isinstance(compatible, dict):  # else a DeepSpeed that keeps it otherwise: the op is built, as before
        compatible["deepspeed_shm_comm"] = False


def teardown(barrier: bool = True) -> None:
    """Barrier then destroy the group: a process that exits without it may abort at exit. Pass
    ``barrier=False`` when other ranks may not get there (an error on this rank only). Inside an
    enclosing setup() the group stays (the outer teardown destroys it); the barrier is still kept:
    rank 0's export must be on disk before another rank reads it."""
    global _depth, _group_info
    _depth = max(0, _depth - 1)
    if _depth:
        if barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()
        return
    try:
        if dist.is_available() and dist.is_initialized():
            try:
                if barrier:
                    dist.barrier()
            finally:
                ds_comm = sys.modules.get("deepspeed.comm")
                if ds_comm is not None and ds_comm.is_initialized():
                    # DeepSpeed's own call also drops its cached groups, so a later train() in this
                    # process (evaluate trains two classifiers) starts clean.
                    ds_comm.destroy_process_group()
                else:
                    dist.destroy_process_group()
    finally:  # a failed barrier too: the group is gone, so is this process's rank identity
        _restore_env()
        _group_info = None


@contextmanager
def process_group(agreed: tuple[type[BaseException], ...] = ()) -> Iterator[DistEnv]:
    """``setup()`` around a block, then ``teardown()``: with its barrier when the block returned or
    raised one of ``agreed`` (errors every rank decides together, so every rank gets there), without
    it for any other error (this rank alone may be failing; a barrier would hang the others)."""
    info = setup()
    try:
        yield info
    except agreed:
        teardown(barrier=True)
        raise
    except BaseException:
        teardown(barrier=False)
        raise
    teardown(barrier=True)


def _restore_env() -> None:
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank."""
    t = torch.tensor([0.0 if flag else 1.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def agree(error: BaseException | None, what: str, world_size: int) -> None:
    """After each rank's share of some work: every rank raises if any rank failed, the failed rank
    its own ``error``, the others OtherRankFailed (the cause is in the failed rank's log). Every
    rank must call it, failed or not, or the others would wait."""
    if not (all_true(error is None) if world_size > 1 else error is None):
        raise error or OtherRankFailed(f"{what}: another rank failed (its log says why)")


def any_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on some rank."""
    return not all_true(not flag)


def block(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items: shares differ by at most one item and, in rank
    order, cover 0..n once."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (``t`` itself in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = t.clone().cuda() if dist.get_backend() == "nccl" else t.clone()
    dist.all_reduce(out)
    return out.to(t.device)


def all_concat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (CPU rows; counts may differ) concatenated in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


def split_calls(calls: dict[str, Callable[[], T]], rank: int = 0, world_size: int = 1) -> dict[str, T]:
    """Run each of ``calls`` on one rank (the i-th on rank i % world_size) and return every result
    on every rank, in the order of ``calls``. Every rank must call this with the same names. When a
    call raises, every rank raises: that rank its own error, the others one naming it."""
    mine: dict[str, T] = {}
    error: BaseException | None = None
    for i, (name, call) in enumerate(calls.items()):
        if i % world_size == rank:
            try:
                mine[name] = call()
            except Exception as e:  # every rank must reach the gather below, or the others would wait
                error = e
                break
    if world_size == 1:
        if error is not None:
            raise error
        return mine
    every: list[tuple[dict[str, T], str | None] | None] = [None] * world_size
    dist.all_gather_object(every, (mine, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failed = [(r, e) for r, (_, e) in enumerate(every) if e is not None]
    if failed:
        r, e = failed[0]
        raise OtherRankFailed(f"rank {r} failed ({e}); its log has the traceback")
    results = {name: out for part, _ in every for name, out in part.items()}
    return {name: results[name] for name in calls}
