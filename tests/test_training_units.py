"""Small parts of the training layer: rank discovery, LR schedule, splitting calls over ranks,
the CPU bf16 probe."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from pipeline.training.distributed import (NoUsableGPU, cuda_index, detect, first_host, gpu_build, node,
                                           require_allotted_gpus, use_allotted_cpus)
from pipeline.training.engine import cpu_emulates_bf16, lr_factor


def test_slurm_environment_gives_rank_and_a_shared_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[003-004,010],cpu1"}
    info = detect(env)
    assert (info.rank, info.world_size, info.local_rank) == (5, 8, 1)
    assert info.master_addr == "gpu003" and info.source == "slurm"
    assert info.master_port == detect({**env, "SLURM_PROCID": "0"}).master_port == 20000 + 123456 % 20000


def test_torchrun_environment_and_single_process():
    info = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.master_addr, info.master_port) == (1, 2, "10.0.0.1", 1234)
    single = detect({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single") and single.master_port > 0


def test_node_of_a_slurm_task_a_torchrun_rank_and_a_single_process():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURMD_NODENAME": "gpu004"}
    assert node(env) == node({**env, "SLURM_PROCID": "8"})  # one node, one execution
    assert (node(env).index, node(env).count, node(env).name) == (1, 2, "gpu004")
    # a requeued job is another execution of the same job
    assert node(env).execution != node({**env, "SLURM_RESTART_COUNT": "1"}).execution
    rank = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "TORCHELASTIC_RUN_ID": "abc"}
    assert (node(rank).index, node(rank).count, node(rank).name) == (1, 2, "node1")
    assert node(rank).execution != node({**rank, "TORCHELASTIC_RESTART_COUNT": "2"}).execution
    assert (node({}).index, node({}).count) == (0, 1)


@pytest.mark.parametrize("nodes,first", [("node7", "node7"), ("a[1-3]", "a1"), ("a[09,12]", "a09")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_a_slurm_task_uses_as_many_cpu_threads_as_it_was_allotted_cores():
    default = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # torch's default on a 2-core node
        said = use_allotted_cpus({"SLURM_CPUS_PER_TASK": "1"})
        assert torch.get_num_threads() == 1 and "1 CPU thread(s) per task" in said and "default of 2" in said
        torch.set_num_threads(2)
        # the user's OMP_NUM_THREADS is kept; more cores allotted than threads, or no allotment: unchanged
        for env in ({"SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "2"}, {"SLURM_CPUS_PER_TASK": "4"}, {}):
            assert use_allotted_cpus(env) is None and torch.get_num_threads() == 2, env
    finally:
        torch.set_num_threads(default)


def test_gpus_slurm_gave_that_torch_cannot_use_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here; a GPU machine stands in
    for env in ({}, {"SLURM_GPUS_ON_NODE": "0"}, {"SLURM_GPUS_ON_NODE": ""}):  # no GPU asked for: CPU is right
        require_allotted_gpus(env)
    with pytest.raises(NoUsableGPU, match=r"^SLURM gave this task 2 GPU\(s\), torch can use none: \S.* \(torch "
                                          r"[^;]+\) -- .* set cluster.gpus_per_node=0 to run on CPUs$"):
        require_allotted_gpus({"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
    # a CUDA_VISIBLE_DEVICES that hides every GPU is a likely cause: named
    for visible, said in (("", "CUDA_VISIBLE_DEVICES is ''"), (None, "CUDA_VISIBLE_DEVICES unset")):
        env = {"SLURM_GPUS_ON_NODE": "1", **({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible})}
        with pytest.raises(NoUsableGPU, match=re.escape(said)):
            require_allotted_gpus(env)
    # the build named is the one installed: CUDA, ROCm (torch.version.cuda is None there) or CPU-only
    # (gpu_build() None: what submit's preflight refuses GPUs for)
    env = {"SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
    builds = (("12.8", None, "CUDA 12.8"), (None, "6.4.1", "ROCm 6.4.1"), (None, None, None))
    for cuda, hip, build in builds:
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", hip, raising=False)
        assert gpu_build() == build
        with pytest.raises(NoUsableGPU, match=re.escape(f", {build or 'a CPU-only build'})")):
            require_allotted_gpus(env)


def test_each_rank_takes_its_own_gpu_whether_it_sees_the_nodes_or_only_its_own():
    # every task sees all 8 of the node's GPUs (SLURM's default, torchrun): the local rank's
    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))
    # a site binding one GPU per task (--gpu-bind, --gpus-per-task): each task's only one, cuda:0 (it
    # was cuda:<local rank>, an invalid device ordinal on all but the first rank)
    assert [cuda_index(r, 1) for r in range(8)] == [0] * 8
    with pytest.raises(NoUsableGPU, match=r"local rank 2 sees 2 GPUs, neither one of its own nor all"):
        cuda_index(2, 2)  # two GPUs per task: not a layout the jobs are made with


def test_lr_warmup_then_cosine_down_to_the_floor():
    f = [lr_factor(s, 10, 110, "cosine", 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(50, 10, 110, "constant", 0.1) == 1.0


def test_teardown_gives_the_environment_back(monkeypatch):
    """A process that trained (evaluate's classifiers, in-process tests) must not pass its rank
    variables on to jobs it starts later: srun tasks would take them for a torchrun launch."""
    from pipeline.training import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for _ in range(2):  # twice: the second group starts clean
        distributed.setup()
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
        distributed.teardown()
        assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)


def test_a_cpu_training_names_deepspeeds_accelerator_and_gives_the_variable_back():
    """DeepSpeed, left to find the accelerator, warns on every CPU stage (the first command's
    console too) that it may have missed a GPU; the stage knows it trains on the CPU and says so.
    Its own process: DeepSpeed picks the accelerator once, when first imported."""
    import subprocess
    import sys

    script = ("import os; from pipeline.training import distributed\n"
              "distributed.setup(); inside = os.environ.get('DS_ACCELERATOR')\n"
              "from deepspeed.accelerator import get_accelerator\n"
              "name = get_accelerator().device_name(); distributed.teardown()\n"
              "print(inside, name, os.environ.get('DS_ACCELERATOR'))")
    from pipeline.training.distributed import _EXPORTED

    env = {k: v for k, v in os.environ.items() if k not in _EXPORTED}  # what setup() would export
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].split() == ["cpu", "cpu", "None"]
    said = done.stdout + done.stderr  # DeepSpeed's logger writes to stdout
    assert "unable to detect" not in said and "Setting accelerator" not in said


def test_a_cpu_process_group_does_not_build_deepspeeds_shared_memory_op(monkeypatch):
    """DeepSpeed compiles that op (35-50 s per machine and environment) for its inference all-reduce
    only; training on CPU goes through gloo without it."""
    from deepspeed.comm import comm as deepspeed_comm

    from pipeline.training import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with distributed.process_group() as group:
        assert group.backend == "gloo" and deepspeed_comm.cdb.shm_comm_op is None


def test_process_group_nests_and_skips_the_barrier_only_for_a_lone_error(monkeypatch):
    """evaluate keeps one group around its two trainings: the inner block leaves the group up, the
    outer destroys it. An error on one rank must not wait at a barrier the others never reach; a
    decision every rank took together (``agreed``) keeps it."""
    import torch.distributed as dist

    from pipeline.training import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))

    with distributed.process_group() as outer:
        assert outer.world_size == 1 and dist.is_initialized()
        with distributed.process_group():
            pass
        assert dist.is_initialized() and len(barriers) == 1  # inner: barrier kept, group stays
    assert not dist.is_initialized() and len(barriers) == 2 and "RANK" not in os.environ

    class Agreed(Exception):
        pass

    for error, agreed, expected in ((RuntimeError, (), 0), (Agreed, (Agreed,), 1)):
        barriers.clear()
        with pytest.raises(error):
            with distributed.process_group(agreed=agreed):
                raise error("boom")
        assert len(barriers) == expected, error
        assert not dist.is_initialized() and "RANK" not in os.environ


def _split_calls_rank(rank: int, init_file: str, failing: str | None, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from pipeline.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ran: list[str] = []

    def call(name: str) -> dict:
        ran.append(name)
        if name == failing:
            raise ValueError(f"{name} broke")
        return {"name": name, "pid": os.getpid()}
    try:
        out = distributed.split_calls({n: (lambda n=n: call(n)) for n in ("a", "b", "c")}, rank, 2)
        result = {"ran": ran, "out": out}
    except Exception as e:
        result = {"ran": ran, "error": f"{type(e).__name__}: {e}"}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("failing", [None, "b"])
def test_split_calls_runs_each_call_on_one_rank_and_every_rank_gets_every_result(tmp_path, failing):
    """evaluate's metrics: each image set's on one rank, the results gathered; an error on one rank
    reaches every rank (none waits for a result that never comes)."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_split_calls_rank, args=(str(tmp_path / "init"), failing, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["ran"] for r in ranks] == [["a", "c"], ["b"]]
    if failing is None:
        assert ranks[0]["out"] == ranks[1]["out"]
        assert list(ranks[0]["out"]) == ["a", "b", "c"]  # the order of the calls
        assert ranks[0]["out"]["a"]["pid"] == ranks[0]["out"]["c"]["pid"] != ranks[0]["out"]["b"]["pid"]
    else:
        assert ranks[1]["error"] == "ValueError: b broke"
        assert ranks[0]["error"] == "OtherRankFailed: rank 1 failed (ValueError: b broke); its log has the traceback"


def test_split_calls_in_one_process_runs_every_call_and_raises_its_error():
    from pipeline.training.distributed import split_calls

    assert split_calls({"x": lambda: 1, "y": lambda: 2}) == {"x": 1, "y": 2}
    with pytest.raises(KeyError):
        split_calls({"x": lambda: {}["missing"]})


def test_cpu_emulates_bf16_where_the_cpu_flags_lack_bf16_units(monkeypatch):
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next(line for line in cpuinfo if line.startswith(("flags", "Features"))).split(":")[1].split()
    assert cpu_emulates_bf16() == ("avx2" in flags and "avx512_bf16" not in flags and "amx_tile" not in flags)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: no warning
    assert cpu_emulates_bf16() is False
