"""Code shards: what `encode` writes and the priors read.

One code shard per image shard, same name and same sample keys: ``top.npy`` and ``bottom.npy``
(integer maps in the smallest unsigned dtype that holds K), ``cls`` and ``json`` (source key).
Per shard a completion marker ``{name}_stats.json``; per split a manifest ``codes.json``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import shards
from pipeline.data.shard_images import IndexedShards

MANIFEST = "codes.json"
FORMAT = "vqvae2-pipeline/code-shards-v1"


def code_dtype(num_codes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_codes <= 256 else np.uint16 if num_codes <= 65536 else np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


class CodeSample:
    """Code shard sample -> (top codes int64 (h, w), bottom codes int64 (H, W), label)."""

    def __call__(self, sample: dict, rng: random.Random) -> tuple[np.ndarray, np.ndarray, int]:
        return (load_npy(sample["top.npy"]).astype(np.int64), load_npy(sample["bottom.npy"]).astype(np.int64),
                int(sample["cls"]))

    @staticmethod
    def finish(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return batch


class CodeMaps(IndexedShards):
    """Random access to the samples of code shards: (top codes, bottom codes, label) as int64
    tensors, the same as ``CodeSample`` gives the stream; ``limit``: a class-balanced subset."""

    def __init__(self, urls: list[str], limit: int | None = None):
        super().__init__(urls, limit, exts=("top.npy", "bottom.npy"), need_all=True)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.entries[i]
        top, bottom = (torch.from_numpy(load_npy(e.read(ext)).astype(np.int64)) for ext in ("top.npy", "bottom.npy"))
        return top, bottom, torch.tensor(e.label)


def read_manifest(code_dir: Path) -> dict[str, Any]:
    return shards.read_manifest(code_dir, MANIFEST, made_by="encode")


def shard_urls(code_dir: Path, split: str) -> list[str]:
    return shards.shard_urls(code_dir, split, MANIFEST, made_by="encode")


def verify(code_dir: Path, task: int = 0, tasks: int = 1) -> tuple[int, list[str]]:
    """Re-read the code shards of ``codes.json`` (array task ``task`` of ``tasks``): every code map
    of the manifest's size with codes below its codebook's size, every label a class; return
    (samples read, problems found)."""
    manifest = read_manifest(code_dir)
    sizes = {"top.npy": (manifest["top_size"], manifest["codebook_size_top"]),
             "bottom.npy": (manifest["bottom_size"], manifest["codebook_size_bottom"])}

    def check(key: str, ext: str, data: bytes) -> None:
        if ext in sizes:
            side, k = sizes[ext]
            codes = load_npy(data)
            if codes.shape != (side, side) or codes.dtype.kind not in "ui":
                raise ValueError(f"sample {key}: {ext} is {codes.dtype} {codes.shape}, expected integer "
                                 f"({side}, {side})")
            if codes.size and (codes.min() < 0 or codes.max() >= k):
                raise ValueError(f"sample {key}: {ext} holds codes up to {codes.max()}, the codebook has {k}")
        elif ext == "cls" and not 0 <= int(data) < manifest["num_classes"]:
            raise ValueError(f"sample {key}: label {int(data)}, the manifest has {manifest['num_classes']} classes")

    return shards.verify_tars(code_dir, manifest, check, lambda exts: {"top.npy", "bottom.npy", "cls"} <= exts,
                              "encode", task, tasks)
