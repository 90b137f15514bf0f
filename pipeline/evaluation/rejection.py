"""Classifier-based rejection sampling (VQ-VAE-2 paper, section 3.3): keep, in every class, the
samples the real-data classifier finds most likely to be of their intended class."""

from __future__ import annotations

import numpy as np


def accepted(labels: np.ndarray, scores: np.ndarray, rate: float) -> list[int]:
    """Indices kept at acceptance ``rate``: the top ``round(rate * n_c)`` (at least one) of each class
    by score, ties broken by index; returned in index order."""
    keep: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(rate * len(idx))))
        keep += idx[np.argsort(-scores[idx], kind="stable")[:n]].tolist()
    return sorted(keep)


def rate_name(rate: float) -> str:
    """``accept_<rate>`` as it appears in metric names: accept_1.0, accept_0.5, accept_0.1."""
    return f"accept_{float(rate)}"
