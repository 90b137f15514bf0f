"""Image grids for MLflow: rows of [-1, 1] image tensors -> one PIL image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def grid(rows: list[torch.Tensor], scale: int = 1) -> Image.Image:
    """``rows``: tensors (N, 3, H, W) in [-1, 1], one grid row each (same H, W)."""
    arrays = []
    for r in rows:
        x = ((r.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arrays.append(np.concatenate(list(x.permute(0, 2, 3, 1).numpy()), axis=1))
    width = max(a.shape[1] for a in arrays)
    arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in arrays]
    img = Image.fromarray(np.concatenate(arrays, axis=0))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
