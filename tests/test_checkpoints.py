"""What a checkpoint can be restored into: another model refused by name, the optimizer state on
any number of ranks and in any other layout (ZeRO stage, bf16)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch


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


def _same_state(a: dict, b: dict) -> bool:
    """The same weights, buffers, schedule and steps, and moments to float summation order."""
    return {**a, "exp_avg": 0} == {**b, "exp_avg": 0} and a["exp_avg"] == pytest.approx(b["exp_avg"], rel=1e-6)


def test_a_checkpoint_resumes_on_any_number_of_ranks_in_any_layout(tmp_path):
    """ZeRO-0 keeps the whole optimizer state: two ranks' checkpoint resumes in one process with
    it. ZeRO-1/2 shard it over their ranks: DeepSpeed's universal format re-shards it (buffers too).
    Through that format every layout (ZeRO stage 0/1/2, bf16 on/off) converts into every other:
    a ZeRO-0 state (a torch optimizer's, wrapped under bf16) is written into it and read back from
    it; the next checkpoint is an ordinary one, and training goes on as it would have. Submit
    queues any of them. A conversion that fails stops every rank."""
    from pipeline.config import compose
    from pipeline.launch.preflight import _checkpoints_resumable
    from pipeline.training.checkpoint import WEIGHTS_ONLY_FIX
    from pipeline.training.fingerprint import trained_with

    zero0, zero1 = str(tmp_path / "zero0"), str(tmp_path / "digits" / "train_vqvae" / "checkpoints")
    zero2 = str(tmp_path / "zero2_bf16")  # the README's ImageNet settings on GPUs
    zero0_bf16 = str(tmp_path / "zero0_bf16")  # the default settings on GPUs
    client = {"trained_with": trained_with(compose(["stage=train_vqvae"]))}  # what the training keeps
    saved, saved_rank1 = _spawn_checkpoints(2, [(zero0, 0, False, 2), (zero1, 1, False, 2), (zero2, 2, True, 2),
                                                (zero0_bf16, 0, True, 2)], tmp_path, client)
    assert saved[0]["exp_avg"] == saved_rank1[0]["exp_avg"] > 0  # ZeRO-0: every rank holds all of it
    assert saved[3]["exp_avg"] == saved_rank1[3]["exp_avg"] > 0  # also under bf16
    whole = saved[1]["exp_avg"] + saved_rank1[1]["exp_avg"]  # ZeRO-1: each rank its shard
    assert 0 < saved[1]["exp_avg"] < whole and saved[1]["steps"] == 2
    shutil.copytree(zero0, tmp_path / "zero0_copy")
    [loads] = _spawn_checkpoints(1, [(zero0, 0, False, 0), (zero1, 1, False, 0), (zero1, 1, False, -1),
                                     (zero0, 1, False, 0), (zero0, 0, True, 0, True), (zero1, 1, False, 1),
                                     (zero1, 1, False, 0), (zero2, 2, True, 0), (zero1, 2, False, 0),
                                     (zero2, 1, False, 0, False), (zero1, 0, False, 0), (zero2, 0, True, 0),
                                     (zero0_bf16, 2, True, 0), (zero0, 0, False, 1),
                                     (str(tmp_path / "zero0_copy"), 2, False, 1)], tmp_path, client)
    assert loads[0] == saved[0]  # weights, buffers, optimizer and schedule, as two ranks held them
    # re-sharded: both shards in one rank; weights, buffers and schedule as they were; the conversion gone
    assert loads[1]["exp_avg"] == pytest.approx(whole, rel=1e-6) and not Path(zero1, "universal").exists()
    assert {**loads[1], "exp_avg": 0} == {**saved[1], "exp_avg": 0}
    assert loads[2]["weights"] == saved[1]["weights"] and loads[2]["exp_avg"] == 0  # fresh optimizer
    # ZeRO-0 into ZeRO-1 (written into the universal format): the same state, now held by ZeRO
    assert _same_state(loads[3], loads[0]) and not Path(zero0, "universal").exists()
    # ZeRO-0 fp32 into ZeRO-0 bf16: the fp32 master weights (rounded in the bf16 model) and moments
    assert {**loads[4], "weights": 0} == {**loads[0], "weights": 0}
    assert loads[4]["weights"] == pytest.approx(loads[0]["weights"], rel=1e-2) and loads[4] != loads[0]
    assert loads[5]["steps"] == 3 and loads[6] == loads[5]  # one step on from the re-sharded state, saved, resumed
    assert loads[8] == loads[6]  # the same state, held by ZeRO-2 in place of ZeRO-1
    # ZeRO-1/2 into ZeRO-0 (read back from the universal format), fp32 and bf16: the same state
    assert _same_state(loads[10], loads[6]) and _same_state(loads[11], loads[7])
    # a bf16 ZeRO-0 checkpoint of two ranks into one bf16 ZeRO-2 process
    assert _same_state(loads[12], saved[3])
    # converted, training goes on as it would have: one step from the ZeRO-0 state by ZeRO-0 and by ZeRO-2
    assert loads[13]["steps"] == loads[14]["steps"] == 3 and loads[13]["weights"] != loads[0]["weights"]
    assert loads[14]["weights"] == pytest.approx(loads[13]["weights"], rel=1e-6)
    assert loads[14]["exp_avg"] == pytest.approx(loads[13]["exp_avg"], rel=1e-6)
    # and one process's ZeRO-1 checkpoint in two ranks, ZeRO-1 and ZeRO-2: each its shard of the whole;
    # ZeRO-0: each all of it; and two ranks' bf16 ZeRO-0 checkpoint into bf16 ZeRO-1 on two ranks
    *sharded, unsharded, zero0_sharded = zip(*_spawn_checkpoints(
        2, [(zero1, 1, False, 0), (zero1, 2, False, 0), (zero1, 0, False, 0), (zero0_bf16, 1, True, 0)],
        tmp_path, client))
    for ranks in sharded:
        assert ranks[0]["exp_avg"] + ranks[1]["exp_avg"] == pytest.approx(loads[6]["exp_avg"], rel=1e-6)
        assert all({**r, "exp_avg": 0} == {**loads[6], "exp_avg": 0} for r in ranks) and 0 < ranks[0]["exp_avg"]
    assert all(_same_state(r, loads[6]) for r in unsharded)
    assert sum(r["exp_avg"] for r in zero0_sharded) == pytest.approx(saved[3]["exp_avg"], rel=1e-6)
    assert all({**r, "exp_avg": 0} == {**saved[3], "exp_avg": 0} for r in zero0_sharded)
    assert not Path(zero1, "universal").exists() and not Path(zero0_bf16, "universal").exists()
    # a ZeRO-0 state the conversion does not know is refused, naming what it found
    from pipeline.training.optimizer_state import MODEL_STATES, zero0_to_universal

    states = torch.load(Path(zero0, "step_00000003", MODEL_STATES), weights_only=False)
    names = list(states["module"])[:4] + list(states["module"])[-2:]  # the parameters, without the norm's buffers
    group = states["optimizer"]["param_groups"][0]
    states["optimizer"]["param_groups"] = [{**group, "params": group["params"][:2]},
                                           {**group, "params": group["params"][2:]}]
    (tmp_path / "two_groups").mkdir()
    torch.save(states, tmp_path / "two_groups" / MODEL_STATES)
    with pytest.raises(ValueError, match="^its optimizer has 2 parameter groups; only one is converted$"):
        zero0_to_universal(tmp_path / "two_groups", tmp_path / "two_groups_universal", names)
    with pytest.raises(ValueError, match="^its optimizer holds 6 parameters, this model 5$"):
        zero0_to_universal(Path(zero0, "step_00000003"), tmp_path / "fewer_universal", names[:5])
    assert not (tmp_path / "two_groups_universal").exists() and not (tmp_path / "fewer_universal").exists()
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

    # submit queues a job of any layout for them (ZeRO-1 -> ZeRO-0 bf16; ZeRO-0 fp32 -> ZeRO-0 bf16)
    def submitted(*overrides):
        return _checkpoints_resumable(compose(["stage=train_vqvae", f"run_root={tmp_path}", *overrides]),
                                      "train_vqvae")
    submitted("cluster=slurm", "cluster.gpus_per_node=2")  # bf16=auto: on with GPUs
    shutil.copytree(zero0, tmp_path / "plain" / "train_vqvae" / "checkpoints")
    submitted("experiment=plain", "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=2")
