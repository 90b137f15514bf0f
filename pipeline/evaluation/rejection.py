"""Classifier-based rejection sampling (VQ-VAE-2 paper, section 3.3): keep, in every class, the
samples the real-data classifier finds most likely to be of their intended class; and the real
images a kept set is fairly compared with (same count per class)."""

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


def extremes(labels: np.ndarray, scores: np.ndarray, per_side: int,
             max_classes: int) -> list[tuple[list[int], list[int]]]:
    """Per class (the first ``max_classes`` present, in class order): the indices of its ``per_side``
    highest-scoring samples (highest first) and of its ``per_side`` lowest (lowest last), never the
    same sample twice; ties broken by index, as in ``accepted``."""
    out = []
    for c in np.unique(labels)[:max_classes]:
        idx = np.flatnonzero(labels == c)
        ranked = idx[np.argsort(-scores[idx], kind="stable")].tolist()
        best = ranked[:per_side]
        out.append((best, ranked[max(len(best), len(ranked) - per_side):]))
    return out


def rate_name(rate: float) -> str:
    """``accept_<rate>`` as it appears in metric names: accept_1.0, accept_0.5, accept_0.1."""
    return f"accept_{float(rate)}"


def class_matched(pool: np.ndarray, labels: np.ndarray) -> tuple[list[int], dict[int, int]]:
    """Indices into ``pool`` (labels of real images) with as many of each class as ``labels`` has,
    the first ones of each class in pool order; and, per class the pool has too few of, how many
    were missing (those classes get all the pool has)."""
    keep: list[int] = []
    short: dict[int, int] = {}
    for c, n in zip(*np.unique(labels, return_counts=True)):
        idx = np.flatnonzero(pool == c)[:n]
        keep += idx.tolist()
        if len(idx) < n:
            short[int(c)] = int(n - len(idx))
    return sorted(keep), short
