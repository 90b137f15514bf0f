"""Training: distributed set-up, checkpoints and the one DeepSpeed engine shared by all models."""
