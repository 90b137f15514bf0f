"""Small pure functions of the training layer: rank discovery, LR schedule."""

from __future__ import annotations

import pytest

from pipeline.training.distributed import detect, first_host
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


@pytest.mark.parametrize("nodes,first", [("node7", "node7"), ("a[1-3]", "a1"), ("a[09,12]", "a09")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_lr_warmup_then_cosine_down_to_the_floor():
    f = [lr_factor(s, 10, 110, "cosine", 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(50, 10, 110, "constant", 0.1) == 1.0


def test_teardown_gives_the_environment_back(monkeypatch):
    """A process that trained (evaluate's classifiers, in-process tests) must not pass its rank
    variables on to jobs it starts later: srun tasks would take them for a torchrun launch."""
    import os

    from pipeline.training import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for _ in range(2):  # twice: the second group starts clean
        distributed.setup()
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
        distributed.teardown()
        assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)
