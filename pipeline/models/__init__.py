"""The VQ-VAE-2 models: pure PyTorch, no I/O, no launcher.

    from pipeline.models import VQVAE2, TopPrior, BottomPrior, build
    vqvae = build("vqvae", cfg.model)                      # or VQVAE2(hidden_channels=128, ...)
    top = build("top_prior", cfg.model, num_classes=1000)
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from pipeline.models.classifier import Classifier
from pipeline.models.priors import BottomPrior, TopPrior
from pipeline.models.quantizer import VectorQuantizer
from pipeline.models.vqvae import VQVAE2

__all__ = ["VQVAE2", "Classifier", "TopPrior", "BottomPrior", "VectorQuantizer", "build", "load_exported",
           "load_exported_digest", "parameter_count"]


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def build(which: str, model_cfg: Any, num_classes: int | None = None) -> nn.Module:
    """One of ``vqvae``, ``top_prior``, ``bottom_prior``, ``classifier`` from a ``model`` config
    (Hydra or dict); the priors take their code-book sizes from ``model_cfg.vqvae``."""
    cfg = _plain(model_cfg)
    vq = {k: v for k, v in cfg["vqvae"].items()}
    if which == "vqvae":
        return VQVAE2(**vq)
    if num_classes is None:
        raise ValueError(f"build('{which}'): num_classes is required (from the dataset manifest)")
    if which == "classifier":
        return Classifier(num_classes=num_classes, **cfg["classifier"])
    if which == "top_prior":
        return TopPrior(num_codes=vq["codebook_size_top"], num_classes=num_classes, **cfg["top_prior"])
    if which == "bottom_prior":
        return BottomPrior(num_codes=vq["codebook_size_bottom"], num_top_codes=vq["codebook_size_top"],
                           num_classes=num_classes, **cfg["bottom_prior"])
    raise ValueError(f"build('{which}'): choose vqvae, top_prior, bottom_prior or classifier")


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_exported(path: Any, device: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A ``model.pt`` written by a training stage -> (model in eval mode, the file's metadata)."""
    import torch

    blob = torch.load(path, map_location=device, weights_only=True)
    return _from_blob(blob, device)


def load_exported_digest(path: Any, device: Any = "cpu") -> tuple[nn.Module, dict[str, Any], str]:
    """``load_exported`` plus the sha256 of the file, from one read: the digest names exactly the
    weights loaded, even if the file is replaced in between."""
    import hashlib
    import io
    from pathlib import Path

    import torch

    data = Path(path).read_bytes()
    model, meta = _from_blob(torch.load(io.BytesIO(data), map_location=device, weights_only=True), device)
    return model, meta, hashlib.sha256(data).hexdigest()


def _from_blob(blob: dict[str, Any], device: Any) -> tuple[nn.Module, dict[str, Any]]:
    model = build(blob["kind"], blob["model_config"], num_classes=blob.get("num_classes"))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), {k: v for k, v in blob.items() if k != "state_dict"}
