"""VQ-VAE-2 at cluster scale: staged jobs tracked in MLflow.

The package is split into library code (``data``, ``stages``, ``tracking``, later ``models`` and
training) that knows nothing about schedulers, and the launch layer (``launch``, ``cli``) that
turns a composed config into a job on this machine or on SLURM.
"""

__version__ = "0.1.0"
