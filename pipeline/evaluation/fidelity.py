"""FID, Inception Score, KID, precision and recall with torch-fidelity, on shard datasets.

Two feature extractors: torch-fidelity's ``inception-v3-compat`` from a local weights file, or
``vqvae2-classifier``: a classifier exported by `evaluate` (penultimate features for FID/KID/PR,
its logits for IS), registered with torch-fidelity. The reference (real) features are cached by
torch-fidelity under a name made of (data manifest, split, crop, count) and the extractor's weights
digest, so later evaluations of the same data reuse them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch.nn import functional as F
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipeline import atomic

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


@dataclass(frozen=True)
class Extractor:
    name: str       # torch-fidelity feature extractor name
    weights: Path   # its weights file
    digest: str     # first 16 hex digits of the weights' sha256


def extractor(name: str, weights: Path) -> Extractor:
    _register()
    return Extractor(name, Path(weights), atomic.file_digest(Path(weights))[:16])


def cache_files(ext: Extractor, reference_name: str, cache_root: Path) -> list[Path]:
    prefix = f"{reference_name}-{ext.digest}-{ext.name}-features-"
    return [cache_root / f"{prefix}{f}.pt" for f in FEATURES[ext.name]]


def isc_splits(n: int) -> int:
    """Inception Score splits for n images: up to 10, of at least ISC_SPLIT_MIN images each. A split's
    IS is at most its image count (the exp of an entropy over that many images), so small splits
    would cap the score of a small set (10 splits of 5 kept samples: IS <= 5 whatever the samples)."""
    return max(1, min(10, n // ISC_SPLIT_MIN))


def metrics(samples: Dataset, reference: Dataset, ext: Extractor, *, reference_name: str, cache_root: Path,
            batch_size: int = 64, kid_subset_size: int = 1000, prc_neighborhood: int = 3, seed: int = 0,
            log: logging.Logger | None = None) -> dict[str, float]:
    """fid, isc, kid, precision, recall of ``samples`` against ``reference`` (uint8 image datasets)."""
    log = log or logging.getLogger(__name__)
    n = min(len(samples), len(reference))
    if n < 2 or len(samples) <= prc_neighborhood or len(reference) <= prc_neighborhood:
        raise ValueError(f"too few images for the metrics: {len(samples)} samples, {len(reference)} reference "
                         f"(need more than eval.prc_neighborhood={prc_neighborhood})")
    cache_root.mkdir(parents=True, exist_ok=True)
    files = cache_files(ext, reference_name, cache_root)
    if all(p.exists() for p in files):
        log.info("reference features %s: reusing the cache %s", reference_name, files[0].parent)
    else:
        log.info("reference features %s: computing %d images with %s, caching in %s", reference_name,
                 len(reference), ext.name, cache_root)
    out = torch_fidelity.calculate_metrics(
        input1=samples, input2=reference, input2_cache_name=f"{reference_name}-{ext.digest}", cache=True,
        cache_root=str(cache_root), cuda=torch.cuda.is_available(), batch_size=batch_size,
        feature_extractor=ext.name, feature_extractor_weights_path=str(ext.weights),
        isc=True, fid=True, kid=True, prc=True, isc_splits=isc_splits(len(samples)),
        kid_subset_size=min(kid_subset_size, n), prc_neighborhood=prc_neighborhood, rng_seed=seed,
        save_cpu_ram=not torch.cuda.is_available(), verbose=False)  # loader workers only beside a GPU
    return {"fid": float(out["frechet_inception_distance"]), "isc": float(out["inception_score_mean"]),
            "kid": float(out["kernel_inception_distance_mean"]), "precision": float(out["precision"]),
            "recall": float(out["recall"])}
