#!/usr/bin/env python
"""Naive vs cached (incremental) sampling of both priors at the real map sizes: top 32², bottom
64² conditioned on 32² (the paper's 256² images), seconds per batch and per sample.

    python tools/bench_sampling.py                                   # all three model sizes
    python tools/bench_sampling.py --models tiny_digits --batch 16
    python tools/bench_sampling.py --device cuda                     # on a GPU

Models: the ``tiny_digits`` and ``paper_imagenet256`` presets' priors, and ``reference``: our
priors at the reference port's default size (256 channels, 4 blocks x 4 residual layers = 16
layers, attention on the top, 3 conditioning blocks on the bottom). Random weights: the cost does
not depend on them.

Columns (every sampler draws one position at a time in raster order, ``--batch`` samples at once):
- ``naive, prefix``: the reference port's sampler, which at row i re-runs the prior on rows 0..i.
  Too slow to run in full on a CPU, so one forward on r rows is timed at several prefix lengths r
  and the per-position cost is integrated over the whole map (W positions per row).
- ``naive, full map``: ``sample.method=naive`` (the exactness reference of the tests): one forward
  of the whole map per position, timed once and multiplied by H*W.
- ``cached``: ``sample.method=cached``. A row's cost (its vertical rows + W positions) changes
  only through attention's key/value length, so whole rows are timed at several row indices and
  integrated over all rows; the caches are allocated up front, so a row's cost does not depend on
  the rows before it having been decoded. ``--full-cached`` decodes the whole map instead.
- ``speed-up``: naive (prefix) / cached — the comparison with the reference port's sampler.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from omegaconf import OmegaConf

from pipeline.config import config_dir
from pipeline.models import build
from pipeline.models.incremental import IncrementalStack

REFERENCE = {"vqvae": {"codebook_size_top": 512, "codebook_size_bottom": 512},
             "top_prior": {"hidden": 256, "res_channels": 256, "layers": 16, "kernel_size": 5, "attn_layers": 4,
                           "attn_heads": 8, "out_stack": 2, "dropout": 0.1, "checkpointing": False},
             "bottom_prior": {"hidden": 256, "res_channels": 256, "layers": 16, "kernel_size": 5, "cond_blocks": 3,
                              "out_stack": 2, "dropout": 0.1, "checkpointing": False}}


def model_cfg(name: str) -> dict:
    if name == "reference":
        return REFERENCE
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))


def _seconds(fn, device: torch.device, repeats: int = 1) -> float:
    """Mean seconds of ``fn``; a warm-up call first unless one call is long enough to swamp it."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    first = once()
    if first > 5.0:
        return first
    return sum(once() for _ in range(repeats)) / repeats


def _integrate(points: list[tuple[int, float]], xs: range) -> float:
    """Sum over ``xs`` of a piecewise-linear interpolation of (x, cost) ``points``."""
    total = 0.0
    for x in xs:
        k = max(0, min(len(points) - 2, sum(1 for p in points if p[0] <= x) - 1))
        (x0, c0), (x1, c1) = points[k], points[k + 1]
        total += c0 + (c1 - c0) * (x - x0) / (x1 - x0)
    return total


def _marks(h: int, first: int) -> list[int]:
    return sorted({first, h // 3, 2 * h // 3, h - 1 + first})


@torch.inference_mode()  # as sample_top / sample_bottom run
def bench(prior, kind: str, batch: int, size: tuple[int, int], device: torch.device, args) -> dict:
    h, w = size
    classes = torch.zeros(batch, dtype=torch.long, device=device)
    codes = torch.randint(0, prior.num_codes, (batch, h, w), device=device)
    if kind == "top":
        forward = lambda r: prior(codes[:, :r], classes)  # noqa: E731
        cond = prior.conditions(classes)
    else:
        top = torch.randint(0, prior.num_top_codes, (batch, h // 2, w // 2), device=device)
        features = prior.condition(top, size)  # once per batch, like both samplers
        forward = lambda r: prior(codes[:, :r], top, classes, features=features[:, :, :r])  # noqa: E731
        cond = prior.conditions(features, classes)
    # naive: a forward on r rows at a few prefix lengths r; position (i, j) costs forward(i + 1)
    per_rows = [(r, _seconds(lambda: forward(r), device, args.repeats)) for r in _marks(h, 1)]
    naive_prefix = w * _integrate(per_rows, range(1, h + 1))
    naive_full = h * w * per_rows[-1][1]
    state = IncrementalStack(prior.stack, cond, batch, size)

    def row(i: int) -> None:
        for j in range(w):
            state.logits(i, j)
            state.set(i, j, codes[:, i, j])
    if args.full_cached:
        cached = _seconds(lambda: [row(i) for i in range(h)], device)
        how = f"prefix at rows {[r for r, _ in per_rows]}, cached full map"
    else:
        rows = [(i, _seconds(lambda: row(i), device, args.repeats)) for i in _marks(h, 0)]
        cached = _integrate(rows, range(h))
        how = f"prefix at rows {[r for r, _ in per_rows]}, cached rows {[i for i, _ in rows]}"
    return {"naive_prefix": naive_prefix, "naive_full": naive_full, "cached": cached, "how": how}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_digits,reference,paper_imagenet256")
    ap.add_argument("--batch", type=int, default=8, help="samples decoded together")
    ap.add_argument("--top", type=int, default=32, help="top map side (bottom is twice)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (one if a call takes > 5 s)")
    ap.add_argument("--full-cached", action="store_true", help="decode the whole map with the cached sampler")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {args.threads} threads"
    print(f"# {where}, torch {torch.__version__}, batch {args.batch}, fp32")
    print("| model | prior | map | naive, prefix s/batch | naive, full map s/batch | cached s/batch "
          "| cached s/sample | speed-up | how |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        cfg = model_cfg(name)
        for kind, side in (("top", args.top), ("bottom", 2 * args.top)):
            torch.manual_seed(0)
            prior = build(f"{kind}_prior", cfg, num_classes=1000).eval().to(device)
            r = bench(prior, kind, args.batch, (side, side), device, args)
            print(f"| {name} | {kind} | {side}² | {r['naive_prefix']:.1f} | {r['naive_full']:.1f} | "
                  f"{r['cached']:.2f} | {r['cached'] / args.batch:.3f} | {r['naive_prefix'] / r['cached']:.0f}x | "
                  f"{r['how']} |", flush=True)


if __name__ == "__main__":
    main()
