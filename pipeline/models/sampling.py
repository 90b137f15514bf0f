"""Ancestral sampling: top codes given classes, then bottom codes given top codes and classes.

This is the straightforward sampler: at every raster position it re-runs the prior on the whole
map (positions after the current one are ignored by causality). Exact, and slow: 1 forward per
position.
"""

from __future__ import annotations

import torch

from pipeline.models.priors import BottomPrior, TopPrior


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """(N, K) logits -> (N, K) logits with temperature applied and tokens outside top-k/top-p at -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature}: must be > 0")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _draw(logits: torch.Tensor, generator: torch.Generator | None, **filt) -> torch.Tensor:
    probs = filter_logits(logits, **filt).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_top(prior: TopPrior, classes: torch.Tensor, size: tuple[int, int], *,
               generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> torch.Tensor:
    """classes (B,) -> top codes (B, H, W)."""
    codes = torch.zeros(len(classes), *size, dtype=torch.long, device=classes.device)
    for i in range(size[0]):
        for j in range(size[1]):
            logits = prior(codes, classes)[:, :, i, j]
            codes[:, i, j] = _draw(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
    return codes


@torch.no_grad()
def sample_bottom(prior: BottomPrior, top: torch.Tensor, classes: torch.Tensor, size: tuple[int, int], *,
                  generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """top codes (B, H', W'), classes (B,) -> bottom codes (B, H, W)."""
    codes = torch.zeros(len(classes), *size, dtype=torch.long, device=classes.device)
    features = prior.condition(top, size)  # the conditioning stack runs once
    for i in range(size[0]):
        for j in range(size[1]):
            logits = prior(codes, top, classes, features=features)[:, :, i, j]
            codes[:, i, j] = _draw(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
    return codes
