#!/usr/bin/env python
"""Is a compiled per-position step faster than the cached sampler's eager one? (issue #10)

    python tools/bench_compiled_step.py                                   # CPU, inductor
    python tools/bench_compiled_step.py --device cuda --mode reduce-overhead   # CUDA graphs

``IncrementalStack.logits(i, j)`` slices its caches with Python ints, so ``torch.compile`` of it
recompiles for every column until dynamo's recompile limit. This script decodes rows with a
static-shape form of the same step (tensor positions, ``index_select`` / ``index_copy_``, attention
over the whole key cache with a causal mask), which compiles once and is what CUDA graphs need,
and times it beside the eager cached step. Every logit of the compiled step is checked against the
eager one first (max abs diff <= 1e-4, or the script exits 1), so a speed-up is never reported for
a step that is not exact. Rows are timed at a few row indices, each including its row start.

Measured on the 2-core CPU (torch 2.14.1, batch 8, inductor): ``tiny_digits`` top 32² 0.082 s ->
0.060 s per row (1.36x), bottom 64² 0.068 s -> 0.042 s (1.60x); ``reference`` top 0.66 s -> 0.64 s
(1.04x, matmul-bound); 3-36 s of compilation per model (~70 s the first time, building inductor's
C++ helpers). The eager static form alone is ~10% slower than the cached step (the mask makes
attention read the whole cache). The GPU numbers are what this script is for.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench_sampling import model_cfg
from pipeline.models import build
from pipeline.models.incremental import IncrementalStack
from pipeline.models.pixelcnn import gate


def static_logits(st: IncrementalStack, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``st.logits(i, j)`` for j's row already started, with 0-d tensor positions and fixed shapes."""
    s, pad = st.stack, st.pad
    window = torch.arange(pad + 1, device=j.device)
    h = st.h0_row.index_select(1, j.view(1))[:, 0]
    shifted = st.x_row.index_select(1, (j - 1 + window).clamp(min=0)).flatten(1)
    h = h + (j > 0) * torch.addmm(s.input.h.bias, shifted, st.w_in)  # column 0 has no left neighbour
    pos = i * st.W + j
    for n in range(len(s.layers)):
        st.h_row[n].index_copy_(1, (pad + j).view(1), h[:, None])
        bias = st.row_bias[n].index_select(1, j.view(1))[:, 0]
        h = h + st.h_out[n](gate(torch.addmm(bias, st.h_row[n].index_select(1, j + window).flatten(1), st.w_h[n])))
        h = h + st.ffn[n](h)
        if n in st.kv:
            a = s.attention[str(n)]
            b, c = h.shape
            x = a.norm(h) + a.row.index_select(0, i.view(1)) + a.col.index_select(0, j.view(1))
            q, k, v = a.qkv(x).view(b, 3, a.heads, c // a.heads).unbind(1)
            keys, values = st.kv[n]
            keys.index_copy_(2, pos.view(1), k[:, :, None])
            values.index_copy_(2, pos.view(1), v[:, :, None])
            mask = (torch.arange(keys.shape[2], device=pos.device) <= pos)[None]
            y = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)
            h = h + a.out(y[:, :, 0].reshape(b, c))
    for block in st.out_blocks:
        h = h + block(h)
    return st.to_logits(h)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_digits,reference")
    ap.add_argument("--prior", default="top", choices=["top", "bottom"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=32, help="top map side (bottom is twice)")
    ap.add_argument("--mode", default="default", help="torch.compile mode (reduce-overhead = CUDA graphs), or eager")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    side = args.top if args.prior == "top" else 2 * args.top
    print(f"# {args.prior} prior {side}², batch {args.batch}, {device}, torch {torch.__version__}, mode {args.mode}")
    print("| model | compile s | eager s/row | compiled s/row | speed-up | max abs diff |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        prior = build(f"{args.prior}_prior", model_cfg(name), num_classes=1000).eval().to(device)
        classes = torch.zeros(args.batch, dtype=torch.long, device=device)
        codes = torch.randint(0, prior.num_codes, (args.batch, side, side), device=device)
        if args.prior == "top":
            cond = prior.conditions(classes)
        else:
            top = torch.randint(0, prior.num_top_codes, (args.batch, side // 2, side // 2), device=device)
            cond = prior.conditions(prior.condition(top, (side, side)), classes)
        eager = IncrementalStack(prior.stack, cond, args.batch, (side, side))
        other = IncrementalStack(prior.stack, cond, args.batch, (side, side))
        torch._dynamo.reset()  # a fresh compilation per model: guards on another model's stack only recompile
        step = static_logits if args.mode == "eager" else torch.compile(static_logits, mode=args.mode)
        at = [torch.tensor(n, device=device) for n in range(side)]

        def sync() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        t0, diff = sync(), 0.0
        for i in range(2):  # compiles on the first call; checks every logit of two rows
            for j in range(side):
                if j == 0:
                    other._start_row(i)
                diff = max(diff, (eager.logits(i, j) - step(other, at[i], at[j])).abs().max().item())
                eager.set(i, j, codes[:, i, j])
                other.set(i, j, codes[:, i, j])
        compile_s = sync() - t0
        if diff > 1e-4:
            raise SystemExit(f"{name}: compiled step differs from the eager one by {diff:.2e} > 1e-4")

        def row(i: int, compiled: bool) -> float:
            t = sync()
            for j in range(side):
                if compiled:
                    if j == 0:
                        other._start_row(i)
                    step(other, at[i], at[j])
                    other.set(i, j, codes[:, i, j])
                else:
                    eager.logits(i, j)
                    eager.set(i, j, codes[:, i, j])
            return sync() - t
        rows = sorted({side // 3, 2 * side // 3, side - 1})
        e = sum(row(i, False) for i in rows) / len(rows)
        c = sum(row(i, True) for i in rows) / len(rows)
        print(f"| {name} | {compile_s:.1f} | {e:.4f} | {c:.4f} | {e / c:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
