"""Streaming image shards to many ranks: an endless training stream and an exactly-once ordered one.

Shard URLs are anything webdataset's ``gopen`` opens: local paths (what the manifest lists),
``pipe:cmd`` (e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -``) or http(s) URLs.

Both streams batch inside the loader workers and ship uint8 ``(B, H, W, 3)`` tensors (4x less
inter-process traffic than float); the main process converts to float in [-1, 1], NCHW view
with channels-last memory. Bad samples and truncated tars are counted by ``CorruptCounter``
(never sleeping, never raising), and the count reaches the caller with every batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import signal
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.transforms import load_crop

log = logging.getLogger(__name__)


class CorruptCounter:
    """A webdataset handler: count and log the error, keep going."""

    def __init__(self, where: str = "") -> None:
        self.count, self.where = 0, where

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        if self.count <= 10 or self.count % 1000 == 0:
            log.warning("corrupt data #%d%s: %s: %s", self.count, self.where, type(exn).__name__, exn)
        return True


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _to_batch(images: list[np.ndarray], labels: list[int], **extra: Any) -> dict[str, Any]:
    return {"image": torch.from_numpy(np.stack(images)), "label": torch.tensor(labels), **extra}


def _image_bytes(sample: dict) -> bytes:
    raw = sample.get("jpg") or sample.get("png")
    if raw is None:
        raise ValueError(f"sample {sample.get('__key__')} has no jpg/png entry")
    return raw


class ImageSample:
    """Image shard sample -> (``resolution``² uint8 HWC crop, label)."""

    def __init__(self, resolution: int, augment: str, hflip: bool):
        self.resolution, self.augment, self.hflip = resolution, augment, hflip

    def __call__(self, sample: dict, rng: random.Random) -> tuple[np.ndarray, int]:
        return load_crop(_image_bytes(sample), self.resolution, self.augment, self.hflip, rng), int(sample["cls"])

    @staticmethod
    def finish(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (to_float(batch[0]), *batch[1:])


class _TrainShards(IterableDataset):
    def __init__(self, urls: list[str], *, batch_size: int, decode: Any, seed: int, rank: int,
                 world_size: int, start_step: int, shuffle_buffer: int):
        super().__init__()
        self.urls, self.batch_size, self.decode, self.shuffle_buffer = list(urls), batch_size, decode, shuffle_buffer
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        g, n = self.rank * nw + wid, self.world_size * nw
        # Split by rank and worker when there are enough shards; otherwise everyone resamples all.
        urls = self.urls[g::n] if len(self.urls) >= n else self.urls
        # Reseeded from (seed, rank, worker, step): a resumed run does not replay the same stream.
        rng = random.Random(f"{self.seed}:{self.rank}:{wid}:{self.start_step}")
        counter = CorruptCounter(f" (rank {self.rank} worker {wid})")
        shards_without_sample = [0]

        def resampled() -> Iterator[dict[str, str]]:
            while True:
                if shards_without_sample[0] > 3 * len(urls) + 10:  # fail instead of spinning forever
                    raise RuntimeError(f"no readable sample in the last {shards_without_sample[0]} shards "
                                       "read; check them with `submit stage=prepare verify=true`")
                shards_without_sample[0] += 1
                yield {"url": rng.choice(urls)}

        buffer: list[dict] = []
        rows: list[tuple] = []
        for sample in wds.tarfile_samples(resampled(), handler=counter):
            shards_without_sample[0] = 0
            buffer.append(sample)
            if len(buffer) < self.shuffle_buffer:
                continue
            sample = buffer.pop(rng.randrange(len(buffer)))
            try:
                rows.append(self.decode(sample, rng))
            except Exception as exn:  # noqa: BLE001 - any bad sample is counted, never fatal
                counter(exn)
                continue
            if len(rows) == self.batch_size:
                fields = tuple(torch.from_numpy(np.stack(col)) if isinstance(col[0], np.ndarray)
                               else torch.tensor(col) for col in zip(*rows))
                yield {"fields": fields, "corrupt": counter.count, "worker": wid}
                rows = []


def private_generator() -> torch.Generator:
    """For DataLoader's per-iterator worker base seed, which it otherwise draws from the global RNG:
    a resumed run opens its stream mid-segment (one more iterator than the uninterrupted run), so
    the global RNG behind dropout and codebook restarts would drift and resume would not be exact.
    Validation loaders use it too: how often a run validates must not change what it trains.
    The datasets here seed their own RNGs, so the value is irrelevant."""
    return torch.Generator().manual_seed(0)


class TrainLoader:
    """Endless resampled training stream; iterating it yields exactly ``steps`` batches on every rank.

    Image shards (the default ``sample``): each batch is ``(images, labels)``, images float in
    [-1, 1], shape (B, 3, H, W). Another ``sample`` decoder (e.g. code shards) gives its own tuple.
    ``corrupt`` is the number of bad samples/tars skipped so far on this rank.
    """

    def __init__(self, urls: list[str], *, batch_size: int, steps: int, resolution: int = 0,
                 augment: str = "center", hflip: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, num_workers: int = 2,
                 shuffle_buffer: int = 1000, sample: Any = None):
        if not urls:
            raise ValueError("no shards to read: run the stage that writes them first")
        self.steps, self.corrupt = steps, 0
        self._sample = sample or ImageSample(resolution, augment, hflip)
        self._dataset = _TrainShards(urls, batch_size=batch_size, decode=self._sample, seed=seed, rank=rank,
                                     world_size=world_size, start_step=start_step, shuffle_buffer=shuffle_buffer)
        self._num_workers = num_workers

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self._dataset, batch_size=None, num_workers=self._num_workers,
                            pin_memory=torch.cuda.is_available(), generator=private_generator(),
                            prefetch_factor=4 if self._num_workers else None,
                            persistent_workers=False, worker_init_fn=ignore_ctrl_c)
        per_worker: dict[int, int] = {}
        it = start_workers(loader)
        for _ in range(self.steps):
            batch = next(it)
            per_worker[batch["worker"]] = batch["corrupt"]
            self.corrupt = sum(per_worker.values())
            yield self._sample.finish(batch["fields"])
        del it  # shuts the workers down


class _OrderedShards(IterableDataset):
    def __init__(self, urls: list[str], *, batch_size: int, resolution: int, augment: str,
                 rank: int, world_size: int):
        super().__init__()
        self.urls, self.batch_size, self.resolution, self.augment = list(urls), batch_size, resolution, augment
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        g, n = self.rank * nw + wid, self.world_size * nw
        counter = CorruptCounter(f" (rank {self.rank} worker {wid})")
        for index in range(g, len(self.urls), n):  # shard i -> global worker i mod n; extras idle
            url = self.urls[index]
            images: list[np.ndarray] = []
            labels: list[int] = []
            keys: list[str] = []
            for sample in wds.tarfile_samples([{"url": url}], handler=counter):
                try:
                    images.append(load_crop(_image_bytes(sample), self.resolution, self.augment, False))
                    labels.append(int(sample["cls"]))
                    keys.append(sample["__key__"])
                except Exception as exn:  # noqa: BLE001 - counted, never fatal
                    counter(exn)
                    continue
                if len(images) == self.batch_size:
                    yield _to_batch(images, labels, key=keys, shard=index, corrupt=counter.count, worker=wid)
                    images, labels, keys = [], [], []
            if images:  # the tail of every shard is kept
                yield _to_batch(images, labels, key=keys, shard=index, corrupt=counter.count, worker=wid)
            yield {"shard_done": index, "corrupt": counter.count, "worker": wid}


def ordered_batches(urls: list[str], *, batch_size: int, resolution: int, augment: str = "center",
                    rank: int = 0, world_size: int = 1, num_workers: int = 2) -> Iterator[dict[str, Any]]:
    """Every sample of ``urls`` exactly once across all ranks and workers, in shard order within a
    shard, never resampled, tails kept. Yields dicts: ``image`` (float [-1, 1], B×3×H×W), ``label``,
    ``key`` (list), ``shard`` (index into ``urls``), ``corrupt`` (bad samples so far on this rank);
    and after each shard ``{"shard_done": index}``, so a consumer can close per-shard outputs."""
    dataset = _OrderedShards(urls, batch_size=batch_size, resolution=resolution, augment=augment,
                             rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, generator=private_generator(),
                        prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_ctrl_c)
    per_worker: dict[int, int] = {}
    for batch in start_workers(loader):
        per_worker[batch.pop("worker")] = batch["corrupt"]
        batch["corrupt"] = sum(per_worker.values())
        if "image" in batch:
            batch["image"] = to_float(batch["image"])
        yield batch


def ignore_ctrl_c(_worker_id: int) -> None:
    """Loader workers ignore SIGINT: Ctrl-C in a terminal reaches every process of the group. A
    worker started with Python's default handler (spawned, or forked before the training took
    Ctrl-C as a stop flag) would exit on it and fail the next batch of the step that the training
    finishes to save its checkpoint; a forked one would run the training's handler. The main
    process shuts its workers down itself. A worker of :func:`start_workers` is born with SIGINT
    blocked; ignoring it first drops a Ctrl-C that is pending, unblocking it then restores the mask."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)``, its workers started while this thread blocks SIGINT: forked workers (the
    default on Linux) are born with it blocked, so a Ctrl-C in the moment before a worker has run
    :func:`ignore_ctrl_c` cannot kill it. This process still gets that Ctrl-C: blocked, not ignored,
    it waits until the workers are started, or another thread takes it for the handler. (Ignoring
    it meanwhile lost a Ctrl-C sent just as a training segment started its loader.) Spawned
    workers inherit the mask too, and so do forkserver ones (Python 3.14's default) when the server
    starts here: its children inherit its mask, so one started unblocked elsewhere leaves them
    exposed until ignore_ctrl_c."""
    _start_resource_tracker(loader)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _start_resource_tracker(loader: DataLoader) -> None:
    """Start multiprocessing's resource tracker now if the loader's workers will need it (spawn,
    forkserver): starting it inside start_workers' window would end that window early, as CPython
    unblocks SIGINT after the tracker starts instead of restoring the mask, and the first loader's
    workers died on a Ctrl-C before their init."""
    context = loader.multiprocessing_context or multiprocessing.get_context()
    if loader.num_workers and context.get_start_method() != "fork":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (channels-last memory, no copy of layout)."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
