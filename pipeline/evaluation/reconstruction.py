"""VQ-VAE reconstructions of the real val split: MSE / PSNR, and the reconstructions themselves as
image shards (one per val shard, written atomically with a marker) so reconstruction FID reads
them like any other image set, and a requeued job keeps the shards it finished. Ranks split the
shards. A marker names its source shard, its images and the VQ-VAE: another val subset or another
model is reconstructed anew. Codebook usage is the share of each level's codes that at least one
val image uses (counts kept in the markers)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import atomic
from pipeline.data.shard_images import ShardImages, write_image_shard
from pipeline.progress import progress_bar
from pipeline.training import distributed


@torch.no_grad()
def reconstruct(vqvae: nn.Module, val: ShardImages, out_dir: Path, batch_size: int, log: logging.Logger,
                model_id: str, elsewhere: tuple[Path, ...] = (), rank: int = 0,
                world_size: int = 1) -> tuple[dict[str, float], list[str]]:
    """({"mse", "psnr"} in [-1, 1] pixel units, "usage_top", "usage_bottom"; the reconstruction
    shard paths), shard by shard of ``val``. ``model_id`` names the VQ-VAE (its file's digest). A
    finished shard of the same source in one of ``elsewhere`` (other reconstruction dirs: another
    sample set's evaluate) is used where it is instead of being written again. With ``world_size``
    > 1 every rank calls this and writes the shards i with i % world_size == rank."""
    by_tar: dict[str, list[int]] = {}
    for i, e in enumerate(val.entries):
        by_tar.setdefault(e.tar, []).append(i)
    jobs = []
    for n, (tar, indices) in enumerate(by_tar.items()):
        keys = "\n".join(val.entries[i].key for i in indices)
        jobs.append((f"recon-{n:06d}", tar, indices,
                     {"shard": Path(tar).name, "count": len(indices), "vqvae": model_id,  # not the path: a moved
                      "keys": hashlib.sha256(keys.encode()).hexdigest()[:16]}))      # run_root reuses
    error = None
    try:
        todo = [job for n, job in enumerate(jobs) if n % world_size == rank
                and not any(_finished(Path(d), job[0], job[3]) for d in (out_dir, *elsewhere))]
        with progress_bar(total=sum(len(job[2]) for job in todo), unit="img", desc="reconstruct",
                          disable=not todo) as bar:
            for name, tar, indices, source in todo:
                _reconstruct_shard(vqvae, val.subset(indices), out_dir, name, source, batch_size, bar)
                log.info("reconstructed %s: %d images", Path(tar).name, len(indices))
    except Exception as e:  # every rank must reach the agreement below, or the others would wait
        error = e
    distributed.agree(error, "reconstructions", world_size)
    sq_err, values, urls = 0.0, 0, []
    counts = {level: np.zeros(k, dtype=np.int64) for level, k in _sizes(vqvae).items()}
    for name, tar, _, source in jobs:
        out, stats = next((Path(d) / f"{name}.tar", st) for d in (out_dir, *elsewhere)
                          if (st := _finished(Path(d), name, source)))
        sq_err += stats["sq_err"]
        values += stats["values"]
        for level in counts:
            counts[level] += np.asarray(stats[f"codes_{level}"], dtype=np.int64)
        urls.append(str(out))
    mse = sq_err / max(values, 1)
    return {"mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
            **{f"usage_{level}": float((c > 0).mean()) for level, c in counts.items()}}, urls


def _sizes(vqvae: nn.Module) -> dict[str, int]:
    return {"top": vqvae.quant_t.K, "bottom": vqvae.quant_b.K}


def _reconstruct_shard(vqvae: nn.Module, part: ShardImages, out_dir: Path, name: str, source: dict,
                       batch_size: int, bar: tqdm) -> None:
    device = next(vqvae.parameters()).device
    images, err = [], 0.0
    used = {level: np.zeros(k, dtype=np.int64) for level, k in _sizes(vqvae).items()}
    for b in range(0, len(part), batch_size):
        x = torch.stack([part[j] for j in range(b, min(b + batch_size, len(part)))])
        real = x.float().div(127.5).sub(1.0).to(device)
        top, bottom = vqvae.encode(real)
        recon = vqvae.decode_codes(top, bottom).float().clamp(-1, 1)
        for level, codes in (("top", top), ("bottom", bottom)):
            used[level] += torch.bincount(codes.flatten().cpu(), minlength=len(used[level])).numpy()
        err += float(((recon - real) ** 2).sum())
        images.append(((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        bar.update(len(x))
    write_image_shard(out_dir / f"{name}.tar", np.concatenate(images), list(part.labels), [e.key for e in part.entries])
    stats = {"source": source, "sq_err": err, "values": int(sum(im.size for im in images)),
             **{f"codes_{level}": c.tolist() for level, c in used.items()}}
    atomic.write_json(out_dir / f"{name}_stats.json", stats)


def _finished(directory: Path, name: str, source: dict) -> dict:
    """The marker's stats when ``<directory>/<name>.tar`` is a finished reconstruction of ``source``, else {}."""
    marker, out = directory / f"{name}_stats.json", directory / f"{name}.tar"
    stats = json.loads(marker.read_text()) if marker.exists() and out.exists() else {}
    return stats if stats.get("source") == source and "codes_top" in stats else {}
