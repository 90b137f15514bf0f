"""Building blocks of the priors: a gated PixelCNN without blind spot, plus causal self-attention.

Two streams run over the code map in raster order (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"):
  vertical   ``v[i, j]`` depends only on input rows < i;
  horizontal ``h[i, j]`` depends only on inputs before (i, j) in raster order.
The first layer establishes this with a one-row shift (v) and a one-column shift (h); later layers
keep it with convolutions that only look up (v) or left (h), and ``h`` also reads ``v``.
Self-attention on ``h`` may therefore attend to positions <= p: ``h`` at p already excludes p.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def shift_down(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class VerticalConv(nn.Conv2d):
    """Output (i, j) sees input rows i-k//2 .. i, columns j-k//2 .. j+k//2."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, (k // 2 + 1, k))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.k // 2, self.k // 2, self.k // 2, 0)))


class HorizontalConv(nn.Conv2d):
    """Output (i, j) sees input row i, columns j-k//2 .. j."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, (1, k // 2 + 1))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.k // 2, 0, 0, 0)))


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class CausalInput(nn.Module):
    """Embedded codes (B, C, H, W) -> strictly causal (v, h) streams."""

    def __init__(self, cin: int, hidden: int, k: int):
        super().__init__()
        self.v = VerticalConv(cin, hidden, k)
        self.h = HorizontalConv(cin, hidden, k)
        self.v_to_h = nn.Conv2d(hidden, hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = shift_down(self.v(x))  # rows < i
        return v, shift_right(self.h(x)) + self.v_to_h(v)  # (row i, cols < j) + rows < i


class GatedLayer(nn.Module):
    """One gated residual layer on both streams, with a per-position condition (class, top codes)
    added to the gate pre-activations, then a 1x1 residual feed-forward of ``res_channels``."""

    def __init__(self, hidden: int, res_channels: int, k: int, dropout: float):
        super().__init__()
        self.v_conv = VerticalConv(hidden, 2 * hidden, k)
        self.h_conv = HorizontalConv(hidden, 2 * hidden, k)
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        self.ffn = nn.Sequential(nn.Conv2d(hidden, res_channels, 1), nn.GELU(), nn.Conv2d(res_channels, hidden, 1))
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond_v: torch.Tensor, cond_h: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        pre_v = self.v_conv(v)
        v = v + gate(pre_v + cond_v)
        pre_h = self.h_conv(h) + self.v_to_h(pre_v)  # pre_v at row i only knows rows < i
        h = h + self.dropout(self.h_out(gate(pre_h + cond_h)))
        h = h + self.dropout(self.ffn(h))
        return v, h


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over raster positions, each attending to positions <= itself,
    with learned row and column embeddings as 2-D position information."""

    def __init__(self, hidden: int, heads: int, dropout: float, max_size: int = 128):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"attention: hidden {hidden} not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.row = nn.Parameter(torch.zeros(max_size, hidden))
        self.col = nn.Parameter(torch.zeros(max_size, hidden))
        nn.init.normal_(self.row, std=0.02)
        nn.init.normal_(self.col, std=0.02)
        self.norm = nn.LayerNorm(hidden)  # per position: a norm over positions would leak the future
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        pos = (self.row[:hh, None, :] + self.col[None, :ww, :]).reshape(hh * ww, c)
        x = self.norm(h.flatten(2).transpose(1, 2)) + pos  # (B, HW, C)
        q, k, v = self.qkv(x).view(b, hh * ww, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(b, hh * ww, c))
        return h + y.transpose(1, 2).reshape(b, c, hh, ww)


class OutputStack(nn.Module):
    """1x1 residual blocks, then logits over the K codes."""

    def __init__(self, hidden: int, blocks: int, num_codes: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GELU(), nn.Conv2d(hidden, hidden, 1), nn.GELU(), nn.Conv2d(hidden, hidden, 1))
            for _ in range(blocks))
        self.logits = nn.Sequential(nn.GELU(), nn.Conv2d(hidden, num_codes, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h)
        return self.logits(h)


class GatedStack(nn.Module):
    """Embedding -> causal input -> ``layers`` gated layers (attention after every
    ``layers // attn_layers``-th) -> output stack. Condition maps are added to every layer."""

    def __init__(self, *, num_codes: int, hidden: int, res_channels: int, layers: int, kernel_size: int,
                 attn_layers: int, attn_heads: int, out_stack: int, dropout: float, checkpointing: bool):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size {kernel_size}: must be odd")
        self.embedding = nn.Embedding(num_codes, hidden)
        self.input = CausalInput(hidden, hidden, kernel_size)
        self.layers = nn.ModuleList(GatedLayer(hidden, res_channels, kernel_size, dropout) for _ in range(layers))
        every = math.ceil(layers / attn_layers) if attn_layers else 0
        self.attn_after = {i for i in range(layers) if every and (i + 1) % every == 0}
        self.attention = nn.ModuleDict({str(i): CausalSelfAttention(hidden, attn_heads, dropout)
                                        for i in sorted(self.attn_after)})
        self.output = OutputStack(hidden, out_stack, num_codes)
        self.checkpointing = checkpointing

    def forward(self, codes: torch.Tensor, cond: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """codes (B, H, W) int64; cond[i] = (for v, for h), each (B, 2*hidden, 1 or H, 1 or W)."""
        v, h = self.input(self.embedding(codes).permute(0, 3, 1, 2))
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training:
                v, h = checkpoint(layer, v, h, *cond[i], use_reentrant=False)
            else:
                v, h = layer(v, h, *cond[i])
            if i in self.attn_after:
                attn = self.attention[str(i)]
                h = checkpoint(attn, h, use_reentrant=False) if self.checkpointing and self.training else attn(h)
        return self.output(h)
