"""Small parts of the training layer: rank discovery, LR schedule, splitting calls over ranks, what a
checkpoint can be restored into."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.training.distributed import (NoUsableGPU, cuda_index, detect, first_host, node, require_allotted_gpus,
                                           use_allotted_cpus)
from pipeline.training.engine import lr_factor


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


def test_a_checkpoint_refuses_another_model_naming_the_keys_its_stage_depends_on(tmp_path):
    import json

    from pipeline.config import compose
    from pipeline.training.fingerprint import config_hash, resume_refusal, trained_with

    def cfg(*overrides):
        return compose(["stage=train_vqvae", *overrides])

    ckpt = tmp_path / "step_00000020"
    ckpt.mkdir()
    assert resume_refusal(ckpt, cfg(), "train_vqvae") is None  # no client state (a save cut short): nothing to tell
    (ckpt / "client.json").write_text(json.dumps({"trained_with": trained_with(cfg())}))
    assert resume_refusal(ckpt, cfg(), "train_vqvae") is None
    assert resume_refusal(ckpt, cfg("train.lr=0.1", "data.num_workers=0"), "train_vqvae") is None
    other = cfg("data.resolution=64", "model.top_prior.layers=7", "model.vqvae.res_blocks=3")
    assert resume_refusal(ckpt, other, "train_vqvae") == (
        f"{ckpt} was trained with another model or dataset configuration "
        "(data.resolution=32 there, 64 now; model.vqvae.res_blocks=2 there, 3 now)")
    # each stage by the settings it depends on: another stage's model section is not one of them
    assert resume_refusal(ckpt, cfg("model.classifier.blocks=2"), "train_vqvae") is None
    assert "model.classifier.blocks=1 there, 2 now" in resume_refusal(ckpt, cfg("model.classifier.blocks=2"), "evaluate")
    assert resume_refusal(ckpt, cfg("model.vqvae.beta=0.5"), "train_top_prior") is None
    assert resume_refusal(ckpt, cfg("model.vqvae.codebook_size_top=16"), "train_top_prior").endswith(
        "(model.vqvae.codebook_size_top=32 there, 16 now)")
    every = {k: ("x" if k.startswith("model.vqvae.") else v) for k, v in trained_with(cfg()).items()}
    (ckpt / "client.json").write_text(json.dumps({"trained_with": every}))
    assert resume_refusal(ckpt, cfg(), "train_vqvae").endswith(f"; and {len(cfg().model.vqvae) - 8} more)")
    # written before checkpoints kept their settings: the hash over all of model.* decides
    (ckpt / "client.json").write_text(json.dumps({"config_hash": config_hash(cfg())}))
    assert resume_refusal(ckpt, cfg(), "train_vqvae") is None
    assert resume_refusal(ckpt, cfg("model.classifier.blocks=2"), "train_vqvae") == (
        f"{ckpt} was trained with another model or dataset configuration")


def _checkpoint_rank(rank: int, world: int, port: int, jobs: list, out_dir: str, client: dict) -> None:
    """Each job (directory, zero_stage, bf16, steps[, batch_norm]): build a small model's engine as
    the training engine does, resume the directory's checkpoint (steps >= 0; -1: its weights only),
    train ``steps`` steps and save a checkpoint if it trained; record the state or the refusal."""
    import json

    from torch import nn

    from pipeline.training import distributed
    from pipeline.training.checkpoint import CheckpointManager, CheckpointMismatch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    results = []
    with distributed.process_group():
        import deepspeed  # after the process group's set-up named DeepSpeed's accelerator

        for directory, zero_stage, bf16, steps, *batch_norm in jobs:
            torch.manual_seed(0)
            # buffers to restore; torch's batch norm takes no bf16 weights beside fp32 statistics
            norm = nn.BatchNorm1d(16) if (batch_norm or [not bf16])[0] else nn.Identity()
            model = nn.Sequential(nn.Linear(8, 16), norm, nn.Tanh(), nn.Linear(16, 1))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": zero_stage},
                      "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
            ckpts = CheckpointManager(Path(directory), rank, world)
            ckpts.configure(config, weights_only=steps < 0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                              lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5))
            try:
                start = ckpts.load(engine, weights_only=steps < 0) or {"step": 0}
            except CheckpointMismatch as e:
                results.append({"refused": str(e)})
                continue
            for step in range(start["step"], start["step"] + max(0, steps)):
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank * 100 + step))
                engine.backward(engine(x.to(engine.module[0].weight.dtype)).float().pow(2).mean())
                engine.step()
            if steps > 0:
                ckpts.save(engine, start["step"] + steps, client)
            results.append({"weights": [p.float().sum().item() for p in engine.module.parameters()],
                            "buffers": [b.float().sum().item() for b in engine.module.buffers()],
                            # this rank's: all of it with ZeRO-0, its shard with ZeRO-1
                            "exp_avg": sum(s["exp_avg"].abs().sum().item() for s in optimizer.state.values()),
                            "lr": engine.get_lr(), "steps": engine.global_steps})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _spawn_checkpoints(world: int, jobs: list, out_dir: Path, client: dict) -> list:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a port free now, for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_checkpoint_rank, args=(world, port, jobs, str(out_dir), client), nprocs=world, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def test_a_checkpoint_resumes_on_any_number_of_ranks_and_zero_layouts_and_the_rest_is_refused(tmp_path):
    """ZeRO-0 keeps the whole optimizer state: two ranks' checkpoint resumes in one process with
    it. ZeRO-1/2 shard it over their ranks: DeepSpeed's universal format re-shards it (buffers too),
    also into another ZeRO-1/2 layout (stage, bf16), and the next checkpoint is an ordinary one. A
    ZeRO-0 state converts to no other layout: that is refused before DeepSpeed is asked (and by
    submit before a job is queued), naming the fix; weights-only still loads. A conversion that
    fails stops every rank."""
    from pipeline.config import ConfigError, compose
    from pipeline.launch.preflight import _checkpoints_resumable
    from pipeline.training.checkpoint import WEIGHTS_ONLY_FIX
    from pipeline.training.fingerprint import trained_with

    zero0, zero1 = str(tmp_path / "zero0"), str(tmp_path / "digits" / "train_vqvae" / "checkpoints")
    zero2 = str(tmp_path / "zero2_bf16")  # the README's ImageNet settings on GPUs
    client = {"trained_with": trained_with(compose(["stage=train_vqvae"]))}  # what the training keeps
    saved, saved_rank1 = _spawn_checkpoints(2, [(zero0, 0, False, 2), (zero1, 1, False, 2), (zero2, 2, True, 2)],
                                            tmp_path, client)
    assert saved[0]["exp_avg"] == saved_rank1[0]["exp_avg"] > 0  # ZeRO-0: every rank holds all of it
    whole = saved[1]["exp_avg"] + saved_rank1[1]["exp_avg"]  # ZeRO-1: each rank its shard
    assert 0 < saved[1]["exp_avg"] < whole and saved[1]["steps"] == 2
    [loads] = _spawn_checkpoints(1, [(zero0, 0, False, 0), (zero1, 1, False, 0), (zero1, 1, False, -1),
                                     (zero0, 1, False, 0), (zero0, 0, True, 0), (zero1, 1, False, 1),
                                     (zero1, 1, False, 0), (zero2, 2, True, 0), (zero1, 2, False, 0),
                                     (zero2, 1, False, 0, False)], tmp_path, client)
    assert loads[0] == saved[0]  # weights, buffers, optimizer and schedule, as two ranks held them
    # re-sharded: both shards in one rank; weights, buffers and schedule as they were; the conversion gone
    assert loads[1]["exp_avg"] == pytest.approx(whole, rel=1e-6) and not Path(zero1, "universal").exists()
    assert {**loads[1], "exp_avg": 0} == {**saved[1], "exp_avg": 0}
    assert loads[2]["weights"] == saved[1]["weights"] and loads[2]["exp_avg"] == 0  # fresh optimizer
    assert loads[3]["refused"].startswith(
        f"{zero0}/step_00000002 was written with ZeRO stage 0, this job has ZeRO stage 1, and DeepSpeed keeps the "
        "optimizer state differently in each: rerun with deepspeed.zero_stage=0, or pass resume_weights_only=true "
        "to load the weights only (fresh optimizer; the step count continues)")
    assert "was written with bf16 off, this job has bf16 on, and DeepSpeed keeps the optimizer state differently " \
           "in each: rerun with deepspeed.bf16=false, or pass" in loads[4]["refused"]
    assert loads[5]["steps"] == 3 and loads[6] == loads[5]  # one step on from the re-sharded state, saved, resumed
    assert loads[8] == loads[6]  # the same state, held by ZeRO-2 in place of ZeRO-1
    # and one process's ZeRO-1 checkpoint in two ranks, ZeRO-1 and ZeRO-2: each its shard of the whole
    for ranks in zip(*_spawn_checkpoints(2, [(zero1, 1, False, 0), (zero1, 2, False, 0)], tmp_path, client)):
        assert ranks[0]["exp_avg"] + ranks[1]["exp_avg"] == pytest.approx(loads[6]["exp_avg"], rel=1e-6)
        assert all({**r, "exp_avg": 0} == {**loads[6], "exp_avg": 0} for r in ranks) and 0 < ranks[0]["exp_avg"]
    assert not Path(zero1, "universal").exists()
    # a checkpoint the conversion cannot read: rank 0 refuses it, and so does rank 1 rather than wait
    # for ever where the launcher lets it live on (here each rank's refusal is caught); nothing is lost
    broken = tmp_path / "broken"
    shutil.copytree(zero1, broken)
    tag = (broken / "latest").read_text().strip()
    (broken / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    files = {p.name: p.read_bytes() for p in (broken / tag).iterdir()}
    first, second = [ranks[0]["refused"]
                     for ranks in _spawn_checkpoints(2, [(str(broken), 1, False, 0)], tmp_path, client)]
    assert first.startswith(f"{broken}/{tag}: converting its optimizer state for this job in DeepSpeed's universal "
                            "format failed (UnpicklingError: ")
    assert first.endswith("): resume it as it was written, on 1 rank(s) with deepspeed.zero_stage=1 "
                          f"deepspeed.bf16=false, or {WEIGHTS_ONLY_FIX}")
    assert second == first.replace(" failed (", " failed (rank 0: ", 1)
    assert {p.name: p.read_bytes() for p in (broken / tag).iterdir()} == files
    assert [p.name for p in (broken / "universal").iterdir()] == [f"{tag}.failed"]
    # bf16 with ZeRO-2 (DeepSpeed's fp32 master weights in the shards) re-shards alike
    assert loads[7]["exp_avg"] == pytest.approx(saved[2]["exp_avg"] + saved_rank1[2]["exp_avg"], rel=1e-6)
    assert {**loads[7], "exp_avg": 0} == {**saved[2], "exp_avg": 0} and loads[7]["steps"] == 2
    # and into fp32 ZeRO-1: its fp32 master weights, rounded to bf16 in the bf16 model
    assert loads[9]["exp_avg"] == pytest.approx(loads[7]["exp_avg"], rel=1e-6)
    assert loads[9]["weights"] != loads[7]["weights"]
    assert loads[9]["weights"] == pytest.approx(loads[7]["weights"], rel=1e-2)
    assert {**loads[9], "exp_avg": 0, "weights": 0} == {**loads[7], "exp_avg": 0, "weights": 0}

    # submit refuses the same before a job is queued, by the layout that job will have
    def submitted(*overrides):
        return _checkpoints_resumable(compose(["stage=train_vqvae", f"run_root={tmp_path}", *overrides]),
                                      "train_vqvae")
    with pytest.raises(ConfigError, match=r"stage=train_vqvae: \S+step_00000003 was written with ZeRO stage 1, "
                                          r"this job has ZeRO stage 0, and DeepSpeed cannot convert .* -- rerun with "
                                          r"deepspeed.zero_stage=1 \(or 2; deepspeed.bf16 either way\), or pass "
                                          r"resume_weights_only=true"):
        submitted("cluster=slurm", "cluster.gpus_per_node=2")
    shutil.copytree(zero0, tmp_path / "plain" / "train_vqvae" / "checkpoints")
    with pytest.raises(ConfigError, match="written with bf16 off, this job has bf16 on, .* deepspeed.bf16=false"):
        submitted("experiment=plain", "cluster=slurm", "cluster.gpus_per_node=2")  # auto: on with GPUs
    submitted("experiment=plain", "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=2", "deepspeed.bf16=false")
    submitted("deepspeed.zero_stage=2", "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=2")
    submitted("resume_weights_only=true")
