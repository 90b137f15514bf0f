"""Random access to the images of tar shards, for metrics that need a map-style dataset
(torch-fidelity's inputs, per-class subsets for rejection sampling) — no image-folder dumps.

The index holds, per sample, the tar file and the byte range of its image member (found once by
reading the tar headers); ``dataset[i]`` seeks there, decodes, and crops to ``resolution``².
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.transforms import load_crop

IMAGE_EXTS = ("png", "jpg", "jpeg")


@dataclass(frozen=True)
class Entry:
    key: str
    label: int
    tar: str
    offset: int
    size: int


def index_tars(urls: list[str]) -> tuple[list[Entry], int]:
    """Entries of every sample with an image and a class, in shard order; and how many samples
    were left out because a member is missing or unreadable."""
    entries: list[Entry] = []
    bad = 0
    for url in urls:
        found: dict[str, dict] = {}
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                slot = found.setdefault(key, {})
                if ext in IMAGE_EXTS:
                    slot["image"] = (member.offset_data, member.size)
                elif ext == "cls":
                    try:
                        slot["label"] = int(tar.extractfile(member).read().decode().strip())
                    except ValueError:
                        slot["label"] = None
        for key, slot in found.items():
            if "image" in slot and slot.get("label") is not None:
                entries.append(Entry(key, slot["label"], url, *slot["image"]))
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


class ShardImages(Dataset):
    """uint8 tensors (3, H, W) — torch-fidelity's input format — over the samples of ``urls``."""

    def __init__(self, urls: list[str], resolution: int, crop: str = "center", limit: int | None = None):
        """``limit``: at most that many samples, spread evenly over the classes (shards written
        class by class, like ImageNet's val folders, would otherwise give only the first classes)."""
        entries, self.skipped = index_tars(urls)
        if limit:
            entries = [entries[i] for i in balanced_first([e.label for e in entries], int(limit))]
        self.entries = entries
        self.resolution, self.crop = resolution, crop

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> torch.Tensor:
        e = self.entries[i]
        with open(e.tar, "rb") as f:
            f.seek(e.offset)
            raw = f.read(e.size)
        img = load_crop(raw, self.resolution, self.crop, False)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

    @property
    def labels(self) -> np.ndarray:
        return np.array([e.label for e in self.entries], dtype=np.int64)

    def subset(self, indices: list[int]) -> "ShardImages":
        """A dataset of the given samples (same decoding), in the given order."""
        view = ShardImages.__new__(ShardImages)
        view.entries = [self.entries[i] for i in indices]
        view.resolution, view.crop, view.skipped = self.resolution, self.crop, 0
        return view


def write_image_shard(path: Path, images: np.ndarray, labels: list[int], keys: list[str] | None = None) -> Path:
    """uint8 (N, H, W, 3) images -> a PNG tar shard, atomically (reconstructions, reference sets)."""
    import io

    import webdataset as wds
    from PIL import Image

    from pipeline import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_name(path)
    with open(tmp, "wb") as stream:
        sink = wds.TarWriter(stream)
        for i, (img, c) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": keys[i] if keys else f"s{i:06d}", "png": buf.getvalue(), "cls": int(c)})
        sink.close()
    atomic.commit(tmp, path)
    return path
