"""FID, Inception Score, KID, precision and recall with torch-fidelity, from features extracted once.

Two feature extractors: torch-fidelity's ``inception-v3-compat`` from a local weights file, or
``vqvae2-classifier``: a classifier exported by `evaluate` (penultimate features for FID/KID/PR,
its logits for IS), registered with torch-fidelity. Every image set's features are extracted once
and cached under a name for its content and the extractor's weights digest: subsets (the samples
kept by rejection, class-matched real baselines) are rows of those features, and a rerun extracts
nothing. The metrics are torch-fidelity's own functions applied to the features, so the numbers
are those of ``torch_fidelity.calculate_metrics`` on the same images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from pipeline import atomic
from pipeline.progress import progress_bar
from pipeline.training import distributed

CLASSIFIER = "vqvae2-classifier"
INCEPTION = "inception-v3-compat"
ISC_SPLIT_MIN = 50
# Features each extractor computes (FID/KID/PR layer first, then IS logits).
FEATURES = {CLASSIFIER: ("penultimate", "logits"), INCEPTION: ("2048", "logits_unbiased")}


class ClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity extractor over a ``model.pt`` classifier (the weights path)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        from pipeline.models import load_exported

        if feature_extractor_weights_path is None:
            raise ValueError(f"{CLASSIFIER} needs feature_extractor_weights_path=<classifier model.pt>")
        self.model, meta = load_exported(feature_extractor_weights_path)
        self.resolution = int(meta["resolution"])

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES[CLASSIFIER]

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "penultimate"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        feats, logits = self.model.features_and_logits(x / 127.5 - 1)
        out = {"penultimate": feats.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)


def _register() -> None:
    if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER, ClassifierFeatures)


Features = dict[str, torch.Tensor]  # feature name -> (images, dims), rows in the image set's order


@dataclass
class Extractor:
    name: str       # torch-fidelity feature extractor name
    weights: Path   # its weights file
    digest: str     # first 16 hex digits of the weights' sha256
    _net: FeatureExtractorBase | None = field(default=None, repr=False, compare=False)

    def net(self) -> FeatureExtractorBase:
        """The network, built on first use (loading Inception's weights once per evaluation)."""
        if self._net is None:
            self._net = create_feature_extractor(self.name, list(FEATURES[self.name]),
                                                 cuda=torch.cuda.is_available(), verbose=False,
                                                 feature_extractor_weights_path=str(self.weights))
        return self._net


def extractor(name: str, weights: Path) -> Extractor:
    _register()
    return Extractor(name, Path(weights), atomic.file_digest(Path(weights))[:16])


def cache_files(ext: Extractor, cache_name: str, cache_root: Path) -> list[Path]:
    """The files of one image set's features: torch-fidelity's cache layout, so caches written by
    ``calculate_metrics(input2_cache_name=...)`` are read too."""
    prefix = f"{cache_name}-{ext.digest}-{ext.name}-features-"
    return [cache_root / f"{prefix}{f}.pt" for f in FEATURES[ext.name]]


def features(images: Dataset, ext: Extractor, *, cache_name: str, cache_root: Path, batch_size: int = 64,
             log: logging.Logger | None = None, rank: int = 0, world_size: int = 1) -> Features:
    """``ext``'s features of every image of ``images``, loaded from ``cache_root`` when this
    ``cache_name`` (which must name the images' content) was extracted before, else extracted and
    cached. With ``world_size`` > 1 every rank calls this: rank r extracts the r-th of world_size
    contiguous blocks into a part file (kept: a requeued job extracts only the missing blocks) and
    every rank returns all the rows. Writes are atomic: an interrupted extraction leaves no cache."""
    log = log or logging.getLogger(__name__)
    files = cache_files(ext, cache_name, cache_root)
    if all(p.exists() for p in files):
        out = {f: torch.load(p, map_location="cpu") for f, p in zip(FEATURES[ext.name], files)}
        if all(len(v) == len(images) for v in out.values()):
            log.info("features of %s: reusing the cache %s", cache_name, cache_root)
            return out
        log.warning("features of %s: the cache holds %d rows for %d images; extracting again", cache_name,
                    len(next(iter(out.values()))), len(images))
    n = len(images)
    share = distributed.block(n, rank, world_size)
    lo, hi = share.start, share.stop
    # only several ranks need part files: the other ranks' blocks come through them
    parts = [[p.with_name(f"{p.name}.part-{r}-of-{world_size}") for p in files] for r in range(world_size)]
    mine, error = None, None
    if world_size > 1 and all(p.exists() for p in parts[rank]):
        log.info("features of %s: rows %d..%d were extracted before (rank %d of %d)", cache_name, lo, hi, rank,
                 world_size)
    else:
        log.info("features of %s: computing %d images with %s, caching in %s%s", cache_name, hi - lo, ext.name,
                 cache_root, f" (rows {lo}..{hi} of {n}: rank {rank} of {world_size})" if world_size > 1 else "")
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            mine = _extract(Subset(images, share), ext, batch_size)
            for p, v in zip(parts[rank], mine.values()) if world_size > 1 else ():
                _save(v, p)
        except Exception as e:  # every rank must reach the agreement below, or the others would wait
            error = e
    distributed.agree(error, f"features of {cache_name}", world_size)
    out = {f: torch.cat([mine[f] if r == rank and mine is not None else torch.load(part[i], map_location="cpu")
                         for r, part in enumerate(parts)]) for i, f in enumerate(FEATURES[ext.name])}
    if world_size > 1:
        distributed.all_true(True)  # every rank has read the parts before rank 0 removes them
    if rank == 0:
        for f, p in zip(FEATURES[ext.name], files):
            _save(out[f], p)
            for part in p.parent.glob(f"{p.name}.part-*"):  # this world size's and any earlier one's
                part.unlink(missing_ok=True)
    return out


def _extract(images: Dataset, ext: Extractor, batch_size: int) -> Features:
    net, cuda = ext.net(), torch.cuda.is_available()
    parts: dict[str, list[torch.Tensor]] = {f: [] for f in FEATURES[ext.name]}
    with torch.no_grad(), progress_bar(total=len(images), unit="img", desc=f"features {ext.name}") as bar:
        for batch in DataLoader(images, batch_size=batch_size, num_workers=0, pin_memory=cuda):
            for f, v in zip(FEATURES[ext.name], net(batch.cuda(non_blocking=True) if cuda else batch)):
                parts[f].append(v.cpu())
            bar.update(len(batch))
    # a rank with no rows (fewer images than ranks): torch.cat skips a 1-d empty tensor
    return {f: torch.cat(v) if v else torch.zeros(0) for f, v in parts.items()}


def _save(tensor: torch.Tensor, path: Path) -> None:
    tmp = atomic.temp_name(path)
    try:
        torch.save(tensor, tmp)
        atomic.commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rows(feats: Features, indices: Sequence[int]) -> Features:
    """The features of the images at ``indices`` (a subset, in that order)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    return {f: v[idx] for f, v in feats.items()}


def isc_splits(n: int) -> int:
    """Inception Score splits for n images: up to 10, of at least ISC_SPLIT_MIN images each. A split's
    IS is at most its image count (the exp of an entropy over that many images), so small splits
    would cap the score of a small set (10 splits of 5 kept samples: IS <= 5 whatever the samples)."""
    return max(1, min(10, n // ISC_SPLIT_MIN))


FidStatistics = dict[str, np.ndarray]  # torch-fidelity's mean "mu" and covariance "sigma"


def fid_statistics(feats: Features, ext: Extractor) -> FidStatistics:
    """The mean and covariance of the FID layer: computed once for a reference set that many FIDs
    share (a 2048x2048 covariance over 50,000 ImageNet val features takes seconds each time)."""
    return fid_features_to_statistics(feats[FEATURES[ext.name][0]])


def fid(samples: Features, reference: Features, ext: Extractor, reference_stats: FidStatistics | None = None) -> float:
    """FID of ``samples`` against ``reference`` (``reference_stats``: its fid_statistics, if known)."""
    stats = fid_statistics(samples, ext), (fid_statistics(reference, ext) if reference_stats is None
                                           else reference_stats)
    return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])


def metrics(samples: Features, reference: Features, ext: Extractor, *, kid_subset_size: int = 1000,
            prc_neighborhood: int = 3, seed: int = 0, reference_stats: FidStatistics | None = None) -> dict[str, float]:
    """fid, isc, kid, precision, recall of the ``samples`` features against the ``reference``
    features, as torch-fidelity's calculate_metrics computes them (same seeds and defaults), and the
    spreads of IS over its splits and of KID over its subsets (isc_std, kid_std)."""
    layer, isc_layer = FEATURES[ext.name]
    n_s, n_r = len(samples[layer]), len(reference[layer])
    if min(n_s, n_r) < 2 or min(n_s, n_r) <= prc_neighborhood:
        raise ValueError(f"too few images for the metrics: {n_s} samples, {n_r} reference "
                         f"(need more than eval.prc_neighborhood={prc_neighborhood})")
    isc = isc_features_to_metric(samples[isc_layer], isc_splits(n_s), shuffle=True, rng_seed=seed)
    kid = kid_features_to_metric(samples[layer], reference[layer], kid_subset_size=min(kid_subset_size, n_s, n_r),
                                 rng_seed=seed, verbose=False)
    # precision/recall compare every pair of images: on a GPU there, and always in row blocks
    # (save_cpu_ram) rather than whole distance matrices (10 GB each at 50,000 images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prc = prc_features_to_metric(samples[layer].to(device), reference[layer].to(device),
                                 prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False)
    return {"fid": fid(samples, reference, ext, reference_stats), "isc": float(isc["inception_score_mean"]),
            "isc_std": float(isc["inception_score_std"]), "kid": float(kid["kernel_inception_distance_mean"]),
            "kid_std": float(kid["kernel_inception_distance_std"]), "precision": float(prc["precision"]),
            "recall": float(prc["recall"])}
