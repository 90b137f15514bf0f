"""Cached incremental decoding of a GatedStack: at each raster position only what that position
needs is computed, with results identical to the full forward.

Why it is exact: the vertical stream at row i depends only on code rows < i, so every layer's
vertical row i is computed once, when row i starts, together with everything the horizontal stream
takes from it (v_to_h of the vertical pre-activations, the condition, the conv bias: one "row bias"
per layer). The horizontal stream at (i, j) then needs the previous layer's horizontal values at
(i, j-k//2 .. j); attention needs the keys/values of positions <= (i, j), kept per layer. The same
weights are applied to the window a position can see, so only summation order differs from the
full forward.

Why matmuls and not conv2d per position: a position is a (B, C) vector, and a CPU conv2d call on a
(B, C, 1, k) window costs ~200 us of fixed overhead, 20x a matmul of the same size. The horizontal
rows are kept as (B, pad + W, C) so that a window is a view whose flattening matches the conv
weight reshaped once to (k * C, 2C).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.models.pixelcnn import CausalSelfAttention, GatedStack, gate


def _conv(conv: torch.nn.Conv2d, window: torch.Tensor) -> torch.Tensor:
    return F.conv2d(window, conv.weight, conv.bias)


def _window_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """A (cout, cin, 1, k) horizontal conv weight as a (k * cin, cout) matrix for (k, cin)-ordered windows."""
    w = conv.weight[:, :, 0]                                  # (cout, cin, k)
    return w.permute(2, 1, 0).reshape(-1, w.shape[0]).contiguous()


def _pointwise(modules: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A 1x1 conv, GELU or Sequential of them as the same function on (B, C) vectors. Derived from
    the modules (not their indices), so a change to the model that this cannot follow is refused."""
    fns = []
    for m in modules if isinstance(modules, torch.nn.Sequential) else [modules]:
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.bias is not None:
            w = m.weight[:, :, 0, 0].t().contiguous()  # addmm on it: ~1.3 us less per call than F.linear
            fns.append(partial(torch.addmm, m.bias, mat2=w))
        elif isinstance(m, torch.nn.GELU):
            fns.append(partial(F.gelu, approximate=m.approximate))
        else:
            raise TypeError(f"incremental decoding has no per-position form of {m}")

    def run(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x
    return run


def _row(cond: torch.Tensor, i: int) -> torch.Tensor:
    """A condition map (B, C, 1 or H, 1 or W) at row i: (B, C, 1, 1 or W)."""
    return cond[:, :, i:i + 1] if cond.shape[2] > 1 else cond


class IncrementalStack:
    """Decoding state of one GatedStack for a batch of code maps of size (H, W).

    Call ``logits(i, j)`` for positions in raster order, then ``set(i, j, codes)`` with the codes
    chosen there. ``cond`` is the list the stack's forward takes (per layer, (for v, for h)).
    """

    def __init__(self, stack: GatedStack, cond: list[tuple[torch.Tensor, torch.Tensor]], batch: int,
                 size: tuple[int, int]):
        self.stack, self.cond, (self.H, self.W) = stack, cond, size
        p = stack.embedding.weight
        c, self.pad = p.shape[1], stack.input.v.k // 2
        n = len(stack.layers)
        new = lambda *shape: torch.zeros(batch, *shape, dtype=p.dtype, device=p.device)  # noqa: E731
        self.x = new(c, self.H, self.W)                    # embedded codes, for the vertical convs
        self.v = [new(c, self.H, self.W) for _ in range(n + 1)]  # vertical stream after input / each layer
        # Row i of the horizontal input of each layer (and the codes), with pad zero columns on the left.
        self.x_row = new(self.pad + self.W, c)
        self.h_row = [new(self.pad + self.W, c) for _ in range(n)]
        # Per row, what the horizontal stream takes from the vertical one (and the condition, the bias).
        self.h0_row = new(self.W, c)
        self.row_bias = [new(self.W, 2 * c) for _ in range(n)]
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in stack.attn_after:
            a: CausalSelfAttention = stack.attention[str(i)]
            shape = (batch, a.heads, self.H * self.W, c // a.heads)
            self.kv[i] = (p.new_zeros(shape), p.new_zeros(shape))
        # Weights reshaped once for per-position matmuls.
        self.w_in = _window_weight(stack.input.h)
        self.w_h = [_window_weight(layer.h_conv) for layer in stack.layers]
        self.h_out = [_pointwise(layer.h_out) for layer in stack.layers]
        self.ffn = [_pointwise(layer.ffn) for layer in stack.layers]
        self.out_blocks = [_pointwise(block) for block in stack.output.blocks]
        self.to_logits = _pointwise(stack.output.logits)

    def set(self, i: int, j: int, codes: torch.Tensor) -> None:
        e = self.stack.embedding(codes)
        self.x[:, :, i, j] = e
        self.x_row[:, self.pad + j] = e

    def _rows(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Rows i-pad .. i of ``t`` with the zero padding of VerticalConv: (B, C, pad+1, W+2*pad)."""
        lo = i - self.pad
        rows = t[:, :, max(lo, 0):i + 1]
        return F.pad(rows, (self.pad, self.pad, max(0, -lo), 0))

    def _start_row(self, i: int) -> None:
        s = self.stack
        if i > 0:  # v after the input layer at row i is V(x) at row i-1 (shift_down)
            self.v[0][:, :, i:i + 1] = _conv(s.input.v, self._rows(self.x, i - 1))
        self.h0_row.copy_(s.input.v_to_h(self.v[0][:, :, i:i + 1])[:, :, 0].transpose(1, 2))
        for n, layer in enumerate(s.layers):
            pre_v = _conv(layer.v_conv, self._rows(self.v[n], i))  # (B, 2C, 1, W)
            self.v[n + 1][:, :, i:i + 1] = self.v[n][:, :, i:i + 1] + gate(pre_v + _row(self.cond[n][0], i))
            bias = layer.v_to_h(pre_v) + _row(self.cond[n][1], i) + layer.h_conv.bias[:, None, None]
            self.row_bias[n].copy_(bias[:, :, 0].transpose(1, 2))  # broadcasts a per-row condition over W

    def logits(self, i: int, j: int) -> torch.Tensor:
        """(B, K) logits at (i, j), given codes set at every earlier position."""
        s, k = self.stack, self.pad + 1
        if j == 0:
            self._start_row(i)
        h = self.h0_row[:, j]
        if j > 0:  # shift_right: H(x) at (i, j-1), whose window ends at padded column pad + j - 1
            window = self.x_row[:, j - 1:j - 1 + k].flatten(1)
            h = h + torch.addmm(s.input.h.bias, window, self.w_in)
        for n in range(len(s.layers)):
            self.h_row[n][:, self.pad + j] = h
            pre_h = torch.addmm(self.row_bias[n][:, j], self.h_row[n][:, j:j + k].flatten(1), self.w_h[n])
            h = h + self.h_out[n](gate(pre_h))
            h = h + self.ffn[n](h)
            if n in self.kv:
                h = self._attend(n, h, i * self.W + j, i, j)
        for block in self.out_blocks:
            h = h + block(h)
        return self.to_logits(h)

    def _attend(self, n: int, h: torch.Tensor, pos: int, i: int, j: int) -> torch.Tensor:
        a: CausalSelfAttention = self.stack.attention[str(n)]
        b, c = h.shape
        x = a.norm(h) + a.row[i] + a.col[j]
        q, k, v = a.qkv(x).view(b, 3, a.heads, c // a.heads).unbind(1)  # each (B, heads, d)
        keys, values = self.kv[n]
        keys[:, :, pos], values[:, :, pos] = k, v
        y = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, :pos + 1], values[:, :, :pos + 1])
        return h + a.out(y[:, :, 0].reshape(b, c))
