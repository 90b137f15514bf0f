"""What a training checkpoint was trained with (the model and the dataset), so that resuming it with
another one is refused, naming the keys that differ, before anything starts (``submit``'s checks)
and again in the job (a job queued before the checkpoint existed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.stages import depends_on
from pipeline.config import changed_settings, flatten


def config_hash(cfg: DictConfig) -> str:
    """The model and dataset settings as one digest: what checkpoints written before they kept
    ``trained_with`` hold, and are compared by."""
    keys = {"model": cfg.model, "data": cfg.data.name, "resolution": cfg.data.resolution}
    blob = json.dumps(OmegaConf.to_container(OmegaConf.create(keys), resolve=True), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_with(cfg: DictConfig) -> dict[str, str]:
    """The model and dataset settings, flat (``model.vqvae.hidden_channels``: "64"), kept in each
    checkpoint to say which of them changed."""
    return {"data.name": str(cfg.data.name), "data.resolution": str(cfg.data.resolution),
            **flatten(cfg.model, "model.")}


# what to do about a refusal
RESUME_FIX = "pass the values it was trained with to resume it, or experiment=<a new name> to train from scratch"


def resume_refusal(checkpoint: Path, cfg: DictConfig, stage: str) -> str | None:
    """Why the checkpoint ``checkpoint`` (a ``step_*`` dir) of ``stage`` cannot be resumed with
    ``cfg`` (see RESUME_FIX), or None where it can (or has no client state to tell). Compared: the
    dataset and the model settings the stage depends on (``stages.MODEL_SETTINGS``; a changed
    model.classifier does not stop the VQ-VAE's training), where both sides have them."""
    client_file = checkpoint / "client.json"
    if not client_file.exists():
        return None
    client = json.loads(client_file.read_text())
    then, now = client.get("trained_with"), trained_with(cfg)
    if then is None:  # written before checkpoints kept their settings: only the hash over all of model.*
        if client.get("config_hash") == config_hash(cfg):
            return None
        return f"{checkpoint} was trained with another model or dataset configuration"
    changed = changed_settings(then, now, lambda k: depends_on(stage, k), limit=8)
    return f"{checkpoint} was trained with another model or dataset configuration ({changed})" if changed else None
