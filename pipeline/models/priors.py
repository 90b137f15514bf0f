"""The two priors over VQ-VAE-2 codes: a class-conditional top prior with causal self-attention,
and a bottom prior conditioned on the top codes through a deep conditioning stack."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.pixelcnn import GatedStack
from pipeline.models.vqvae import ResBlock


class _ClassCondition(nn.Module):
    """A learned class embedding, projected per layer to gate biases for both streams. Class id
    ``num_classes`` means "no class" (unconditional samples, classifier-free style training)."""

    def __init__(self, num_classes: int, hidden: int, layers: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, hidden)
        self.per_layer = nn.ModuleList(nn.Linear(hidden, 4 * hidden) for _ in range(layers))

    def forward(self, classes: torch.Tensor) -> list[torch.Tensor]:
        if classes.min() < 0 or classes.max() > self.num_classes:
            raise ValueError(f"class ids must be in 0..{self.num_classes} ({self.num_classes} = no class)")
        e = self.embedding(classes)
        return [p(e)[:, :, None, None] for p in self.per_layer]  # (B, 4*hidden, 1, 1)


class TopPrior(nn.Module):
    """Gated PixelCNN with causal multi-head self-attention over the top code map.

    forward(codes (B, H, W) int64, classes (B,) int64) -> logits (B, K, H, W); the logits at a
    position depend only on codes before it in raster order (and on the class).
    """

    def __init__(self, *, num_codes: int, num_classes: int, hidden: int = 512, res_channels: int = 2048,
                 layers: int = 20, kernel_size: int = 5, attn_layers: int = 4, attn_heads: int = 8,
                 out_stack: int = 20, dropout: float = 0.1, checkpointing: bool = False):
        super().__init__()
        self.num_codes, self.num_classes = num_codes, num_classes
        self.stack = GatedStack(num_codes=num_codes, hidden=hidden, res_channels=res_channels, layers=layers,
                                kernel_size=kernel_size, attn_layers=attn_layers, attn_heads=attn_heads,
                                out_stack=out_stack, dropout=dropout, checkpointing=checkpointing)
        self.classes = _ClassCondition(num_classes, hidden, layers)

    def conditions(self, classes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (for v, for h) gate biases, each (B, 2*hidden, 1, 1)."""
        return [c.chunk(2, dim=1) for c in self.classes(classes)]

    def forward(self, codes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.stack(codes, self.conditions(classes))


class BottomPrior(nn.Module):
    """Gated PixelCNN over the bottom code map, conditioned on the whole top code map.

    forward(codes (B, H, W), top (B, H', W'), classes (B,)) -> logits (B, K, H, W). The top codes
    go through an embedding and ``cond_blocks`` residual blocks (not causal: they are all known),
    are resized to the bottom grid, and are added, projected per layer, to every gated layer.
    """

    def __init__(self, *, num_codes: int, num_top_codes: int, num_classes: int, hidden: int = 512,
                 res_channels: int = 1024, layers: int = 20, kernel_size: int = 5, cond_blocks: int = 20,
                 out_stack: int = 20, dropout: float = 0.1, checkpointing: bool = False):
        super().__init__()
        self.num_codes, self.num_top_codes, self.num_classes = num_codes, num_top_codes, num_classes
        self.stack = GatedStack(num_codes=num_codes, hidden=hidden, res_channels=res_channels, layers=layers,
                                kernel_size=kernel_size, attn_layers=0, attn_heads=1, out_stack=out_stack,
                                dropout=dropout, checkpointing=checkpointing)
        self.classes = _ClassCondition(num_classes, hidden, layers)
        self.top_embedding = nn.Embedding(num_top_codes, hidden)
        self.cond_stack = nn.Sequential(*[ResBlock(hidden, hidden) for _ in range(cond_blocks)], nn.ReLU())
        self.cond_up = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.per_layer = nn.ModuleList(nn.Conv2d(hidden, 4 * hidden, 1) for _ in range(layers))
        self.checkpointing = checkpointing

    def condition(self, top: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Top codes -> conditioning features on the bottom grid (B, hidden, H, W); computed once
        per sample when sampling."""
        c = self.top_embedding(top).permute(0, 3, 1, 2)
        if self.checkpointing and self.training:
            c = torch.utils.checkpoint.checkpoint(self.cond_stack, c, use_reentrant=False)
        else:
            c = self.cond_stack(c)
        return self.cond_up(F.interpolate(c, size=size, mode="nearest"))

    def conditions(self, features: torch.Tensor, classes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (for v, for h) gate biases, each (B, 2*hidden, H, W), from ``condition``'s features."""
        return [(c + p(features)).chunk(2, dim=1) for c, p in zip(self.classes(classes), self.per_layer)]

    def forward(self, codes: torch.Tensor, top: torch.Tensor, classes: torch.Tensor,
                features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            features = self.condition(top, tuple(codes.shape[-2:]))
        return self.stack(codes, self.conditions(features, classes))
