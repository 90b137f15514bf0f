"""The loaders over real WebDataset tars: exactly-once ordered stream, endless training stream."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import compose
from pipeline.data import shards
from pipeline.data.streams import TrainLoader, ordered_batches
from pipeline.stages import StageContext
from pipeline.stages import prepare
from pipeline.tracking import StageRun

SIZES = [7, 5, 4]  # three uneven shards


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), value, np.uint8)).save(buf, format="JPEG", quality=98)
    return buf.getvalue()


@pytest.fixture
def tars(tmp_path):
    urls, n = [], 0
    for s, size in enumerate(SIZES):
        path = tmp_path / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                sink.write({"__key__": f"k{n:03d}", "jpg": _jpeg(10 * n), "cls": n % 3})
                n += 1
        urls.append(str(path))
    return urls


def test_ordered_stream_is_exactly_once_over_ranks_and_workers(tars):
    keys: Counter = Counter()
    done: list[int] = []
    for rank in range(2):  # 2 ranks x 2 workers = 4 readers for 3 shards: one reader idles
        for batch in ordered_batches(tars, batch_size=3, resolution=16, rank=rank, world_size=2,
                                     num_workers=2):
            if "shard_done" in batch:
                done.append(batch["shard_done"])
                continue
            keys.update(batch["key"])
            assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].dtype == torch.float32
            # labels and pixels stay with their key
            n = [int(k[1:]) for k in batch["key"]]
            assert batch["label"].tolist() == [i % 3 for i in n]
            got = (batch["image"].mean(dim=(1, 2, 3)) + 1) * 127.5
            assert torch.allclose(got, torch.tensor([10.0 * i for i in n]), atol=3)
    assert keys == Counter(f"k{i:03d}" for i in range(sum(SIZES)))
    assert sorted(done) == [0, 1, 2]


def test_ordered_stream_keeps_shard_order_and_counts_a_truncated_tar(tars):
    data = open(tars[1], "rb").read()
    open(tars[1], "wb").write(data[: len(data) // 2])
    batches = [b for b in ordered_batches(tars, batch_size=100, resolution=16, num_workers=0)
               if "key" in b]
    assert batches[0]["key"] == [f"k{i:03d}" for i in range(7)]  # tar order within a shard
    assert batches[-1]["key"] == [f"k{i:03d}" for i in range(12, 16)]
    assert batches[-1]["corrupt"] >= 1


def test_training_stream_same_batches_on_every_rank(tars):
    counts = []
    for rank in range(2):
        loader = TrainLoader(tars, batch_size=4, steps=9, resolution=16, augment="random_resized_crop",
                             rank=rank, world_size=2, num_workers=2, shuffle_buffer=5)
        batches = list(loader)
        counts.append(len(batches))
        images, labels = batches[-1]
        assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)
        assert -1.0 <= images.min() and images.max() <= 1.0
    assert counts == [9, 9]


def test_training_stream_is_reseeded_on_resume(tars):
    def first_labels(**kw):
        loader = TrainLoader(tars, batch_size=8, steps=3, resolution=16, num_workers=0,
                             shuffle_buffer=4, **kw)
        return [tuple(y.tolist()) for _, y in loader]

    assert first_labels(start_step=0) == first_labels(start_step=0)  # deterministic
    assert first_labels(start_step=0) != first_labels(start_step=100)  # a resume is not a replay
    assert first_labels(rank=0, world_size=2) != first_labels(rank=1, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_streams_leave_the_global_rng_alone(tars, workers):
    # A resumed run opens one more stream than the uninterrupted run; if streams drew from the
    # global RNG, dropout and codebook restarts after a resume would differ from the reference.
    torch.manual_seed(1)
    before = torch.get_rng_state()
    list(TrainLoader(tars, batch_size=4, steps=3, resolution=16, num_workers=workers, shuffle_buffer=4))
    list(ordered_batches(tars, batch_size=4, resolution=16, num_workers=workers))
    assert torch.equal(torch.get_rng_state(), before)


def test_training_stream_survives_a_truncated_tar(tars, caplog):
    data = open(tars[0], "rb").read()
    open(tars[0], "wb").write(data[: len(data) // 2])
    loader = TrainLoader(tars, batch_size=4, steps=12, resolution=16, num_workers=0, shuffle_buffer=2)
    with caplog.at_level(logging.WARNING):
        assert len(list(loader)) == 12
    assert loader.corrupt >= 1
    assert "corrupt data #1" in caplog.text


def test_training_stream_fails_instead_of_hanging_on_unreadable_shards(tmp_path):
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"not a tar at all" * 10)
    loader = TrainLoader([str(bad)], batch_size=2, steps=1, resolution=16, num_workers=0)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(loader)


def test_array_tasks_split_shards_and_the_last_writes_the_manifest(tmp_path):
    cfg = compose(["stage=prepare", f"run_root={tmp_path}", "data.shard_size=300"])
    stage_dir = tmp_path / "digits" / "prepare"
    stage_dir.mkdir(parents=True)
    log = logging.getLogger("test")

    def task(i):
        run = StageRun(cfg, "prepare", stage_dir)  # never entered: logs nothing
        return prepare.run(cfg, StageContext("prepare", stage_dir, run, log, task=i, tasks=2))

    first = task(1)
    out = stage_dir / "shards"
    assert first["shards_pending_other_tasks"] == 4 and not (out / shards.MANIFEST).exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000001.tar", "train-000003.tar",
                                                         "val-000000.tar"]
    second = task(0)
    assert second["shards_pending_other_tasks"] == 0
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 1797
    # each task's own work; the stage's totals from the task that completed it
    assert "images" not in first and second["images"] == 1797 and second["images_skipped"] == 0
    assert first["images_written"] + second["images_written"] == 1797


def test_array_tasks_that_started_together_complete_the_stage(tmp_path, monkeypatch):
    """SLURM starts an array's tasks together: task 0 is still writing when task 1 ends (held here
    by a wrapper around the real shard writer), then finds every shard complete, task 1's included,
    and writes the manifest. Each task used to count only the shards complete when it started: no
    task of an array started together wrote the manifest."""
    import threading

    cfg = compose(["stage=prepare", f"run_root={tmp_path}", "data.shard_size=300"])
    stage_dir = tmp_path / "digits" / "prepare"
    stage_dir.mkdir(parents=True)
    writing, go_on, write_shard = threading.Event(), threading.Event(), shards.write_shard

    def held(*args, **kwargs):
        if threading.current_thread().name == "task 0":
            writing.set()
            assert go_on.wait(120)
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", held)

    def task(i):
        return prepare.run(cfg, StageContext("prepare", stage_dir, StageRun(cfg, "prepare", stage_dir),
                                             logging.getLogger("test"), task=i, tasks=2))

    first: list[dict] = []
    task0 = threading.Thread(target=lambda: first.append(task(0)), name="task 0")
    task0.start()
    try:
        assert writing.wait(120)
        second = task(1)
        assert second["shards_pending_other_tasks"] == 4 and not second["complete"]
    finally:
        go_on.set()
        task0.join(120)
    assert first[0]["shards_pending_other_tasks"] == 0 and first[0]["complete"], first
    manifest = json.loads((stage_dir / "shards" / shards.MANIFEST).read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 1797


CTRL_C_READER = """
import os, signal, sys, time
from pipeline.data.streams import TrainLoader, ordered_batches

urls = sys.argv[1:]
train = iter(TrainLoader(urls, batch_size=2, steps=40, resolution=16, num_workers=2))
ordered = ordered_batches(urls, batch_size=1, resolution=16, num_workers=2)
next(train), next(ordered)  # the workers start with Python's default SIGINT handler (KeyboardInterrupt)
signal.signal(signal.SIGINT, lambda *_: None)  # the main process takes Ctrl-C as a flag, as a training does
os.killpg(0, signal.SIGINT)  # Ctrl-C in a terminal: every process of the group, the workers too
time.sleep(2)
n_train = 1 + sum(1 for _ in train)  # more than the workers prefetched: they must still be there
n_ordered = 1 + sum(1 for b in ordered if "key" in b)
print(n_train, n_ordered)
"""


def test_ctrl_c_leaves_the_loader_workers_to_the_main_process(tars):
    """A training finishes its step (and saves a checkpoint) after Ctrl-C; a worker that died on the
    signal would fail the step's next batch once the prefetched ones are used up."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CTRL_C_READER, *tars], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["40", str(sum(SIZES))]


EARLY_CTRL_C = """
import os, signal, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from pipeline.data.streams import ignore_ctrl_c, start_workers

class Numbers(IterableDataset):
    def __iter__(self):
        yield from (torch.tensor(i) for i in range(10))

class CtrlCWhileStarting(DataLoader):
    def _get_iterator(self):
        os.killpg(0, signal.SIGINT)  # a Ctrl-C in the middle of start_workers, before any worker exists
        return super()._get_iterator()

def slow_init(worker_id):  # Ctrl-C arrives before any worker could have ignored it
    time.sleep(2)
    ignore_ctrl_c(worker_id)

got, main = [], os.getpid()

def on_ctrl_c(*_):  # a training takes Ctrl-C as a flag; a worker that runs this (forked) dies
    if os.getpid() != main:
        raise KeyboardInterrupt
    got.append("ctrl-c")

if __name__ == "__main__":  # spawned workers import this file again
    import sys
    signal.signal(signal.SIGINT, on_ctrl_c)
    batches = start_workers(CtrlCWhileStarting(Numbers(), batch_size=None, num_workers=2, worker_init_fn=slow_init,
                                               multiprocessing_context=sys.argv[1]))
    os.killpg(0, signal.SIGINT)
    print(len(got), sum(1 for _ in batches))
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_ctrl_c_while_the_workers_start_reaches_the_main_process_and_does_not_kill_them(start_method, tmp_path):
    """A training segment starts its loader's workers just after a checkpoint. A Ctrl-C then must
    neither be lost to the main process (it was, while SIGINT was ignored there for the start) nor
    kill a worker that has not run its init yet (with a plain iter(loader) both die: 'DataLoader
    worker ... exited unexpectedly'). Fork is Linux's default before Python 3.14, forkserver after;
    spawn and forkserver workers died while the resource tracker's start unblocked SIGINT."""
    import subprocess
    import sys

    script = tmp_path / "early_ctrl_c.py"
    script.write_text(EARLY_CTRL_C)
    proc = subprocess.run([sys.executable, str(script), start_method], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "20"]  # both Ctrl-Cs seen; each of the 2 workers yields 10 numbers
