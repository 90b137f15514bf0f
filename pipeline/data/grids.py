"""Image grids for MLflow and docs/: rows of [-1, 1] image tensors -> one PIL image."""

from __future__ import annotations

import io

import numpy as np
import torch
import webdataset as wds
from PIL import Image

GRID_CLASSES = 20  # classes shown in a per-class grid (ImageNet has 1000)
GUTTER = 96  # grey level of the frame between grid cells


def grid(rows: list[torch.Tensor], scale: int = 1) -> Image.Image:
    """``rows``: tensors (N, 3, H, W) in [-1, 1], one grid row each (same H, W)."""
    arrays = []
    for r in rows:
        x = ((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        # A 1-px grey frame per cell: dark images (digits on black) otherwise run into each other.
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=GUTTER)
        arrays.append(np.concatenate(list(x.permute(0, 2, 3, 1).numpy()), axis=1))
    width = max(a.shape[1] for a in arrays)
    arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in arrays]
    img = Image.fromarray(np.concatenate(arrays, axis=0))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def decode(sample: dict, size: int | None = None) -> torch.Tensor | None:
    """The image of a shard sample as (3, H, W) in [-1, 1], resized to ``size``² if given; None
    when the sample has no image."""
    raw = sample.get("png") or sample.get("jpg") or sample.get("jpeg")
    if raw is None:
        return None
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    img = img.resize((size, size), Image.BICUBIC) if size else img
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


def shard_rows(urls: list[str], per_row: int, max_rows: int = GRID_CLASSES, classes: int | None = None,
               size: int | None = None) -> dict[int, list[torch.Tensor]]:
    """The first ``per_row`` images of each of the first ``max_rows`` classes of image shards, by
    class, resized to ``size``² if given. With ``classes`` (how many the data has) reading stops as
    soon as every row is full instead of going through every shard."""
    rows: dict[int, list[torch.Tensor]] = {}
    wanted = min(classes, max_rows) if classes else None
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        c = int(s["cls"])
        if (c in rows or len(rows) < max_rows) and len(rows.setdefault(c, [])) < per_row:
            image = decode(s, size)
            if image is not None:
                rows[c].append(image)
        if wanted and len(rows) == wanted and all(len(v) == per_row for v in rows.values()):
            break
    return rows


def class_grid(urls: list[str], per_class: int, max_classes: int = GRID_CLASSES, classes: int | None = None,
               size: int | None = None) -> Image.Image:
    """One row per class (the first classes, in class order), the first ``per_class`` images of
    each, shown at least 128 pixels wide."""
    rows = shard_rows(urls, per_class, max_classes, classes, size)
    if not rows:
        raise ValueError(f"no labelled images in {urls[:3]}")
    height = next(iter(rows.values()))[0].shape[-1]
    return grid([torch.stack(v) for _, v in sorted(rows.items())], max(1, 128 // height))
