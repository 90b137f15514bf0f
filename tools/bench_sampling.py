#!/usr/bin/env python
"""Naive vs cached (incremental) sampling of both priors at the real map sizes: top 32², bottom
64² conditioned on 32² (the paper's 256² images), seconds per batch and per sample.

    python tools/bench_sampling.py                                   # all three model sizes
    python tools/bench_sampling.py --models tiny_digits --batch 16

Models: the ``tiny_digits`` and ``paper_imagenet256`` presets' priors, and ``reference``: our
priors at the reference port's default size (256 channels, 4 blocks x 4 residual layers = 16
layers, attention on the top, 3 conditioning blocks on the bottom). Random weights: the cost does
not depend on them.

How each number is obtained (printed in the ``how`` column):
- naive: its cost per position does not depend on the prefix (the whole map goes through the
  prior every time), so one position is timed ``--repeats`` times and multiplied by H*W; measured
  in full where ``--full-naive`` is given.
- cached: the per-position cost grows only through attention's key/value length, so positions are
  timed in windows at several prefix lengths (start, 1/3, 2/3, end of the map) and the cost is
  integrated over all positions (``sampled``), or the whole map is decoded (``full``) when
  ``--full-cached`` is given.
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


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def bench(prior, kind: str, batch: int, size: tuple[int, int], args) -> dict[str, float | str]:
    classes = torch.zeros(batch, dtype=torch.long)
    codes = torch.randint(0, prior.num_codes, (batch, *size))
    if kind == "top":
        forward = lambda: prior(codes, classes)  # noqa: E731
        cond = prior.conditions(classes)
    else:
        top = torch.randint(0, prior.num_top_codes, (batch, size[0] // 2, size[1] // 2))
        features = prior.condition(top, size)
        forward = lambda: prior(codes, top, classes, features=features)  # noqa: E731
        cond = prior.conditions(features, classes)
    n = size[0] * size[1]
    naive = _time(forward, args.repeats) * n
    state = IncrementalStack(prior.stack, cond, batch, size)
    if args.full_cached:
        t0 = time.perf_counter()
        for i in range(size[0]):
            for j in range(size[1]):
                state.logits(i, j)
                state.set(i, j, codes[:, i, j])
        return {"naive_s": naive, "cached_s": time.perf_counter() - t0, "how": "naive x H*W, cached full"}
    # Walk the map in raster order (the caches must fill), timing windows of `window` positions
    # at four prefix lengths; integrate the per-position cost piecewise-linearly.
    marks = [0, n // 3, 2 * n // 3, n - args.window]
    costs, pos = [], 0
    for mark in marks:
        while pos < mark:
            i, j = divmod(pos, size[1])
            state.logits(i, j)
            state.set(i, j, codes[:, i, j])
            pos += 1
        t0 = time.perf_counter()
        for _ in range(args.window):
            i, j = divmod(pos, size[1])
            state.logits(i, j)
            state.set(i, j, codes[:, i, j])
            pos += 1
        costs.append((mark + args.window / 2, (time.perf_counter() - t0) / args.window))
    total = 0.0
    for p in range(n):  # piecewise-linear interpolation of the per-position cost
        k = max(0, min(len(costs) - 2, sum(1 for c in costs if c[0] <= p) - 1))
        (p0, c0), (p1, c1) = costs[k], costs[k + 1]
        total += c0 + (c1 - c0) * (p - p0) / (p1 - p0)
    return {"naive_s": naive, "cached_s": total, "how": f"naive x H*W, cached sampled ({len(marks)} windows)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_digits,reference,paper_imagenet256")
    ap.add_argument("--batch", type=int, default=8, help="samples decoded together")
    ap.add_argument("--top", type=int, default=32, help="top map side (bottom is twice)")
    ap.add_argument("--repeats", type=int, default=2, help="timed full forwards per naive estimate")
    ap.add_argument("--window", type=int, default=16, help="positions per timed cached window")
    ap.add_argument("--full-cached", action="store_true", help="decode the whole map with the cached sampler")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()} {platform.processor() or ''} CPU, {args.threads} threads, torch {torch.__version__}, "
          f"batch {args.batch}")
    print("| model | prior | map | naive s/batch | cached s/batch | cached s/sample | speed-up | how |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        cfg = model_cfg(name)
        for kind, side in (("top", args.top), ("bottom", 2 * args.top)):
            torch.manual_seed(0)
            prior = build(f"{kind}_prior", cfg, num_classes=1000).eval()
            r = bench(prior, kind, args.batch, (side, side), args)
            print(f"| {name} | {kind} | {side}² | {r['naive_s']:.1f} | {r['cached_s']:.2f} | "
                  f"{r['cached_s'] / args.batch:.3f} | {r['naive_s'] / r['cached_s']:.0f}x | {r['how']} |", flush=True)


if __name__ == "__main__":
    main()
