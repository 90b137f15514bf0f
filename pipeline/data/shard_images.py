"""Random access to the samples of tar shards, for work that needs a map-style dataset or a fixed
subset (torch-fidelity's inputs, per-class subsets for rejection sampling, the class-balanced val
subsets that training validates on) — no image-folder dumps.

The index holds, per sample, its tar file, its class and the byte range of each member (found once
by reading the tar headers); ``dataset[i]`` seeks to the members it needs.
"""

from __future__ import annotations

import copy
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.images import png_bytes
from pipeline.data.streams import private_generator
from pipeline.data.transforms import load_crop

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass(frozen=True, slots=True)  # slots: an index of ImageNet's train split has 1.28M of them
class Entry:
    key: str
    label: int
    tar: str
    members: tuple[tuple[str, int, int], ...]  # (extension, offset, size) of the members kept

    def read(self, ext: str) -> bytes:
        offset, size = next((o, n) for e, o, n in self.members if e == ext)
        with open(self.tar, "rb") as f:
            f.seek(offset)
            return f.read(size)


def index_tars(urls: list[str], exts: tuple[str, ...] = IMAGE_EXTS, need_all: bool = False
               ) -> tuple[list[Entry], int]:
    """Entries of every sample with a class and its members with extension in ``exts`` (any one
    of them, or all with ``need_all``), in shard order; and how many samples were left out because
    a member is missing or unreadable."""
    entries: list[Entry] = []
    bad = 0
    for url in urls:
        found: dict[str, dict] = {}
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                slot = found.setdefault(key, {"members": []})
                if ext == "cls":
                    try:
                        slot["label"] = int(tar.extractfile(member).read().decode().strip())
                    except ValueError:
                        slot["label"] = None
                elif ext in exts:
                    # exts' own string, not one more per sample
                    slot["members"].append((exts[exts.index(ext)], member.offset_data, member.size))
        for key, slot in found.items():
            found_exts = {m[0] for m in slot["members"]}
            if slot.get("label") is not None and (found_exts == set(exts) if need_all else found_exts):
                entries.append(Entry(key, slot["label"], url, tuple(slot["members"])))
            else:
                bad += 1
    return entries, bad


def balanced_first(labels: list[int], n: int) -> list[int]:
    """Indices of ``n`` samples, as many of each class as possible (counts differ by at most one):
    the first of every class, then the second of every class, ...; returned in their original order."""
    seen: dict[int, int] = {}
    rank = []
    for i, label in enumerate(labels):
        rank.append((seen.get(label, 0), i))
        seen[label] = seen.get(label, 0) + 1
    return sorted(i for _, i in sorted(rank)[:n])


class IndexedShards(Dataset):
    """The indexed samples of ``urls``; subclasses say which members a sample needs and decode them."""

    def __init__(self, urls: list[str], limit: int | None = None, exts: tuple[str, ...] = IMAGE_EXTS,
                 need_all: bool = False):
        """``limit``: at most that many samples, spread evenly over the classes (shards written
        class by class, like ImageNet's val folders, would otherwise give only the first classes).
        ``exts``, ``need_all``: the members a sample needs, as for ``index_tars``."""
        self.entries, self.skipped = index_tars(urls, exts, need_all)
        if limit:
            self.entries = self.balanced(int(limit)).entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.entries], dtype=np.int64)

    def subset(self, indices: list[int] | range) -> "IndexedShards":
        """A dataset of the given samples (same decoding), in the given order."""
        view = copy.copy(self)
        view.entries = [self.entries[i] for i in indices]
        view.skipped = 0
        return view

    def balanced(self, n: int) -> "IndexedShards":
        """At most ``n`` samples, spread evenly over the classes (``balanced_first``)."""
        return self.subset(balanced_first([e.label for e in self.entries], n))

    def readable(self) -> "IndexedShards":
        """The samples that decode (each is decoded once: for small fixed subsets); a corrupt file in
        a val subset is left out with a warning, as the training stream leaves it out."""
        good = [i for i in range(len(self)) if self._decodes(i)]
        if len(good) < len(self):
            log.warning("%d of %d samples of a fixed subset (%s) do not decode: left out", len(self) - len(good),
                        len(self), type(self).__name__)
        return self.subset(good)

    def _decodes(self, i: int) -> bool:
        try:
            self[i]
        except (OSError, ValueError):  # PIL's UnidentifiedImageError is an OSError; npy raises ValueError
            return False
        return True

    def shard_for_rank(self, rank: int, world_size: int) -> "IndexedShards":
        """Every ``world_size``-th sample from ``rank`` on: the ranks split the set without overlap."""
        return self.subset(range(rank, len(self), world_size))

    def batches_for_rank(self, batch_size: int, rank: int, world_size: int) -> DataLoader:
        """This rank's share (``shard_for_rank``), in order, batched; the loader's seed comes from a
        private generator, so validating leaves the global RNG (dropout, restarts) alone."""
        return DataLoader(self.shard_for_rank(rank, world_size), batch_size=batch_size, generator=private_generator())


class ShardImages(IndexedShards):
    """uint8 tensors (3, H, W) — torch-fidelity's input format — over the samples of ``urls``."""

    def __init__(self, urls: list[str], resolution: int, crop: str = "center", limit: int | None = None):
        super().__init__(urls, limit)
        self.resolution, self.crop = resolution, crop

    def __getitem__(self, i: int) -> torch.Tensor:
        e = self.entries[i]
        ext = e.members[0][0]
        try:
            img = load_crop(e.read(ext), self.resolution, self.crop, False)
        except (OSError, ValueError) as err:  # PIL: unidentified or truncated image data
            raise ValueError(f"{e.tar}: {e.key}.{ext} is not a readable image ({type(err).__name__}: {err}); "
                             "`verify=true` on the stage that wrote the shard re-reads all of its shards") from err
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def write_image_shard(path: Path, images: np.ndarray, labels: list[int], keys: list[str] | None = None) -> Path:
    """uint8 (N, H, W, 3) images -> a PNG tar shard, atomically (reconstructions, reference sets)."""

    import webdataset as wds
    from PIL import Image

    from pipeline import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_name(path)
    with open(tmp, "wb") as stream:
        sink = wds.TarWriter(stream)
        for i, (img, c) in enumerate(zip(images, labels)):
            sink.write({"__key__": keys[i] if keys else f"s{i:06d}", "png": png_bytes(Image.fromarray(img)),
                        "cls": int(c)})
        sink.close()
    atomic.commit(tmp, path)
    return path
