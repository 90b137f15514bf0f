"""Cached incremental decoding of a GatedStack: at each raster position only what that position
needs is computed, with results identical to the full forward.

Why it is exact: the vertical stream at row i depends only on code rows < i, so every layer's
vertical row i is computed once, when row i starts; the horizontal stream at (i, j) needs the
previous layer's horizontal values at (i, j-k//2 .. j), the vertical pre-activations at (i, j) and
the condition there; attention needs the keys/values of positions <= (i, j), kept per layer. All
per-layer maps are kept as caches that fill in raster order; the same convolution weights are
applied to the window a position can see, so only summation order differs from the full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.pixelcnn import CausalSelfAttention, GatedStack, gate


def _conv(conv: torch.nn.Conv2d, window: torch.Tensor) -> torch.Tensor:
    return F.conv2d(window, conv.weight, conv.bias)


def _at(cond: torch.Tensor, i: int, j: int | None) -> torch.Tensor:
    """A condition map (B, C, 1 or H, 1 or W) at row i (all columns), or at (i, j) as (B, C, 1, 1)."""
    row = cond[:, :, i if cond.shape[2] > 1 else 0][:, :, None]
    if j is None:
        return row
    return row[:, :, :, j if cond.shape[3] > 1 else 0][:, :, :, None]


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
        new = lambda ch: torch.zeros(batch, ch, self.H, self.W, dtype=p.dtype, device=p.device)  # noqa: E731
        self.x = new(c)                                    # embedded codes
        self.v = [new(c) for _ in range(n + 1)]            # vertical stream after input / each layer
        self.pre_v = [new(2 * c) for _ in range(n)]        # each layer's vertical pre-activation
        self.h = [new(c) for _ in range(n + 1)]            # horizontal stream (after attention)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in stack.attn_after:
            a: CausalSelfAttention = stack.attention[str(i)]
            shape = (batch, a.heads, self.H * self.W, c // a.heads)
            self.kv[i] = (p.new_zeros(shape), p.new_zeros(shape))

    def set(self, i: int, j: int, codes: torch.Tensor) -> None:
        self.x[:, :, i, j] = self.stack.embedding(codes)

    def _rows(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Rows i-pad .. i of ``t`` with the zero padding of VerticalConv: (B, C, pad+1, W+2*pad)."""
        lo = i - self.pad
        rows = t[:, :, max(lo, 0):i + 1]
        return F.pad(rows, (self.pad, self.pad, max(0, -lo), 0))

    def _start_row(self, i: int) -> None:
        s = self.stack
        if i > 0:  # v after the input layer at row i is V(x) at row i-1 (shift_down)
            self.v[0][:, :, i:i + 1] = _conv(s.input.v, self._rows(self.x, i - 1))
        for n, layer in enumerate(s.layers):
            pre_v = _conv(layer.v_conv, self._rows(self.v[n], i))
            self.pre_v[n][:, :, i:i + 1] = pre_v
            self.v[n + 1][:, :, i:i + 1] = self.v[n][:, :, i:i + 1] + gate(pre_v + _at(self.cond[n][0], i, None))

    def _left(self, t: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Row i, columns j-pad .. j of ``t`` with HorizontalConv's zero padding: (B, C, 1, pad+1)."""
        lo = j - self.pad
        return F.pad(t[:, :, i:i + 1, max(lo, 0):j + 1], (max(0, -lo), 0, 0, 0))

    def logits(self, i: int, j: int) -> torch.Tensor:
        """(B, K) logits at (i, j), given codes set at every earlier position."""
        s = self.stack
        if j == 0:
            self._start_row(i)
        h = s.input.v_to_h(self.v[0][:, :, i:i + 1, j:j + 1])
        if j > 0:  # shift_right: H(x) at (i, j-1)
            h = h + _conv(s.input.h, self._left(self.x, i, j - 1))
        self.h[0][:, :, i:i + 1, j:j + 1] = h
        for n, layer in enumerate(s.layers):
            pre_h = _conv(layer.h_conv, self._left(self.h[n], i, j)) + layer.v_to_h(self.pre_v[n][:, :, i:i + 1, j:j + 1])
            h = h + layer.h_out(gate(pre_h + _at(self.cond[n][1], i, j)))
            h = h + layer.ffn(h)
            if n in self.kv:
                h = self._attend(n, h, i * self.W + j, i, j)
            self.h[n + 1][:, :, i:i + 1, j:j + 1] = h
        return s.output(h)[:, :, 0, 0]

    def _attend(self, n: int, h: torch.Tensor, pos: int, i: int, j: int) -> torch.Tensor:
        a: CausalSelfAttention = self.stack.attention[str(n)]
        b, c = h.shape[:2]
        x = a.norm(h[:, :, 0, 0]) + a.row[i] + a.col[j]
        q, k, v = a.qkv(x).view(b, 3, a.heads, c // a.heads).unbind(1)  # each (B, heads, d)
        keys, values = self.kv[n]
        keys[:, :, pos], values[:, :, pos] = k, v
        y = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, :pos + 1], values[:, :, :pos + 1])
        return h + a.out(y[:, :, 0].reshape(b, c))[:, :, None, None]
