#!/usr/bin/env python
"""Regenerate the README's pictures from a finished run (the embedded default by default):

    submit stage=all                      # the run the pictures come from
    python tools/make_docs_images.py      # -> docs/val_reconstructions.png, docs/samples_per_class.png

- ``val_reconstructions.png``: real val digits (odd rows) over the VQ-VAE's reconstructions of
  them (even rows), one column per class, from `evaluate`'s reconstruction shards;
- ``samples_per_class.png``: one row per class of `sample`'s samples (the priors' ancestral samples
  decoded by the VQ-VAE), unfiltered;
- ``default_run_metrics.md``: `evaluate`'s report of that run (the table the README shows).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from pipeline.data import grids, shards


def _images(urls: list[str]) -> dict[str, tuple[int, torch.Tensor]]:
    """key -> (class, image in [-1, 1]) of image shards."""
    return {s["__key__"]: (int(s["cls"]), grids.decode(s))
            for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def reconstruction_grid(exp_dir: Path, per_class: int) -> Image.Image:
    recons = _images(sorted(str(p) for p in (exp_dir / "evaluate" / "reconstructions").glob("recon-*.tar")))
    if not recons:
        raise SystemExit(f"no reconstruction shards under {exp_dir / 'evaluate'}: run `submit stage=evaluate` first")
    real = _images(shards.shard_urls(exp_dir / "prepare" / "shards", "val"))
    by_class: dict[int, list[str]] = {}
    for key, (c, _) in recons.items():
        if len(by_class.setdefault(c, [])) < per_class:
            by_class[c].append(key)
    classes = sorted(by_class)[:grids.GRID_CLASSES]
    rows = []
    for i in range(per_class):
        keys = [by_class[c][i] for c in classes if i < len(by_class[c])]
        rows += [torch.stack([real[k][1] for k in keys]), torch.stack([recons[k][1] for k in keys])]
    return grids.grid(rows, max(1, 128 // rows[0].shape[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-root", default="runs", help="run_root of the finished run (default: ./runs)")
    ap.add_argument("--experiment", default="digits", help="experiment name (default: digits)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"), help="output folder")
    ap.add_argument("--per-class", type=int, default=10, help="samples per class in the sample grid")
    args = ap.parse_args()
    exp_dir, out = Path(args.run_root) / args.experiment, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(exp_dir, 2).save(out / "val_reconstructions.png", optimize=True)
    sample_dir = exp_dir / "sample" / "shards"
    if not (sample_dir / shards.MANIFEST).exists():
        raise SystemExit(f"{sample_dir}: no finished samples; run `submit stage=sample` first")
    grids.class_grid(shards.shard_urls(sample_dir, "samples"), args.per_class).save(
        out / "samples_per_class.png", optimize=True)
    report = exp_dir / "evaluate" / "report.md"
    if report.exists():
        shutil.copyfile(report, out / "default_run_metrics.md")
    for name in ("val_reconstructions.png", "samples_per_class.png", "default_run_metrics.md"):
        if (out / name).exists():
            print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
