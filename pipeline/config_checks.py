"""Checks of a composed config's values, before anything of a job is created: each problem is a
ConfigError naming the key and the fix (what composing cannot see: ranges, paths, choices)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import SAMPLE_SET_NAME, ConfigError

# What run_root holds besides the experiments (tracking's artifacts, evaluate's default feature cache)
RUN_ROOT_OWN = ("mlartifacts", "fidelity_cache", "mlflow.db")


def _missing_keys(cfg: DictConfig) -> list[str]:
    missing: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for k in node:
            path = f"{prefix}{k}"
            if OmegaConf.is_missing(node, k):
                missing.append(path)
            elif isinstance(node[k], DictConfig):
                walk(node[k], path + ".")
    walk(cfg, "")
    return missing


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def validate(cfg: DictConfig) -> None:
    """Check everything a job needs before anything is created; raise ConfigError otherwise."""
    for key in _missing_keys(cfg):
        hint = "/path/to/the/dataset" if key == "data.source" else "<value>"
        raise ConfigError(key, "required value is missing", f"pass {key}={hint}")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(getattr(e, "full_key", "config"), str(e).splitlines()[0],
                          "fix the interpolation") from None

    run_root = Path(cfg.run_root)
    anchor = _nearest_existing(run_root)
    if not anchor.is_dir():
        raise ConfigError(f"run_root={cfg.run_root}", f"'{anchor}' is a file, not a directory",
                          "pass run_root=<a writable directory>")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"run_root={cfg.run_root}", f"'{anchor}' is not writable",
                          "pass run_root=<a writable directory>")

    source = cfg.data.get("source")
    if cfg.data.name == "digits" and source is not None:
        raise ConfigError(f"data.source={source}", "data=digits is embedded and takes no source",
                          "drop data.source, or use data=folder data.source=...")
    if source is not None:
        src = Path(os.path.expanduser(str(source)))
        if not src.exists():
            raise ConfigError(f"data.source={source}", "path does not exist",
                              "pass data.source=/path/to/the/dataset")
        if not src.is_dir():
            raise ConfigError(f"data.source={source}", "not a directory",
                              "pass the dataset's top directory")
        if not os.access(src, os.R_OK | os.X_OK):
            raise ConfigError(f"data.source={source}", "directory is not readable",
                              "fix its permissions or pass another path")
        from pipeline.data.imagenet_tars import has_tars

        if cfg.data.name == "imagenet" and not has_tars(src) and not any(
                (src / sub / "train").is_dir() for sub in (".", "ILSVRC/Data/CLS-LOC")):
            raise ConfigError(f"data.source={source}", "no train/ folder (nor ILSVRC/Data/CLS-LOC/train, "
                              "nor ILSVRC2012_img_train.tar)", "pass the folder that holds ImageNet's "
                              "train/ and val/, or its downloaded ILSVRC2012 tarballs")
    _check_choice(cfg, "data.augment", ("none", "center", "random_resized_crop"))
    from pipeline.stages import VERIFIABLE

    if cfg.verify and str(cfg.stage.name) not in VERIFIABLE:
        raise ConfigError("verify=true", f"stage={cfg.stage.name} writes no shards to verify",
                          "pass stage=prepare, stage=encode or stage=sample with verify=true (one stage at a time)")
    if not (cfg.deepspeed.bf16 == "auto" or isinstance(cfg.deepspeed.bf16, bool)):  # 'false' would be truthy
        raise ConfigError(f"deepspeed.bf16={cfg.deepspeed.bf16}", "must be auto, true or false",
                          "pass deepspeed.bf16=true (unquoted), false or auto")
    _check_choice(cfg, "data.layout", ("auto", "folders", "kaggle", "devkit", "tars"))
    if int(cfg.prepare.workers) < 1:
        raise ConfigError(f"prepare.workers={cfg.prepare.workers}", "must be at least 1",
                          "pass prepare.workers=<processes>")
    if "encode" in cfg and cfg.encode.vqvae and not Path(str(cfg.encode.vqvae)).expanduser().is_file():
        raise ConfigError(f"encode.vqvae={cfg.encode.vqvae}", "no such file",
                          "pass the model.pt a train_vqvae stage exported, or drop encode.vqvae to train one")
    if float(cfg.tracking.progress_every_s) <= 0:
        raise ConfigError(f"tracking.progress_every_s={cfg.tracking.progress_every_s}",
                          "must be > 0 seconds", "pass e.g. tracking.progress_every_s=30")
    if float(cfg.wait_report_min) < 0:
        raise ConfigError(f"wait_report_min={cfg.wait_report_min}", "must be >= 0 minutes",
                          "pass e.g. wait_report_min=10, or 0 for no progress lines")
    if float(cfg.cluster.get("rank0_grace_s", 0)) < 0:  # the sleep would raise in a rank that failed
        raise ConfigError(f"cluster.rank0_grace_s={cfg.cluster.rank0_grace_s}", "must be >= 0 seconds",
                          "pass e.g. cluster.rank0_grace_s=30")
    if float(cfg.tracking.system_metrics_interval) <= 0:
        raise ConfigError(f"tracking.system_metrics_interval={cfg.tracking.system_metrics_interval}",
                          "must be > 0 seconds", "pass e.g. tracking.system_metrics_interval=10")
    # a/b, ../x or '' would put the stage dirs elsewhere (other odd names are left: a run may exist)
    if "/" in str(cfg.experiment) or str(cfg.experiment) in ("", ".", ".."):
        raise ConfigError(f"experiment={cfg.experiment}", "not usable as a directory name under run_root",
                          "pass a name without '/', e.g. experiment=imagenet256")
    if str(cfg.experiment) in RUN_ROOT_OWN:
        raise ConfigError(f"experiment={cfg.experiment}", f"{Path(cfg.run_root) / str(cfg.experiment)} holds "
                          "the run_root's own files", "pass another name, e.g. experiment=imagenet256")
    named = cfg.get("sample_set")
    if named is not None and not isinstance(named, str):  # 0.70 or 1e3 would silently become sample-0.7/, sample-1000.0/
        raise ConfigError(f"sample_set={named}", f"read as a {type(named).__name__} value, not a name",
                          "start it with a letter, e.g. sample_set=t07, or quote it: \"sample_set='<name>'\"")
    if named is not None and not SAMPLE_SET_NAME.fullmatch(named):
        raise ConfigError(f"sample_set={named}", "not usable in a directory name",
                          "pass letters, digits, '.', '_' or '-' (not first), e.g. sample_set=t07, or null")
    _check_data(cfg)
    if "train" in cfg:
        _check_training(cfg)
    if "sample" in cfg:
        _check_sampling(cfg)
    if "eval" in cfg:
        _check_eval(cfg)


def _at_least(cfg: DictConfig, keys: tuple[str, ...], low: int) -> None:
    """Integer settings a job would otherwise trip over after it started (a zero step interval
    divides by zero, a zero batch never ends)."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"{key}={value}", f"must be an integer of at least {low}", f"pass {key}=<n>")


def _check_data(cfg: DictConfig) -> None:
    """A resolution not a multiple of 8 failed in the VQ-VAE's first forward (a tensor-size error)."""
    d = cfg.data
    _at_least(cfg, ("data.shard_size", "data.shuffle_buffer"), 1)
    _at_least(cfg, ("data.num_workers",), 0)
    _at_least(cfg, ("data.resolution",), 8)
    if int(d.resolution) % 8:  # the top codes are 1/8 of the image side
        raise ConfigError(f"data.resolution={d.resolution}", "must be a multiple of 8 (top codes are 1/8 of the "
                          "side, bottom codes 1/4)", f"pass data.resolution={max(8, int(d.resolution) // 8 * 8)}")
    fraction = d.get("val_fraction")  # data=imagenet has its own val split
    if fraction is not None and not 0 < float(fraction) < 1:
        raise ConfigError(f"data.val_fraction={fraction}", "must be between 0 and 1 (exclusive)",
                          "pass e.g. data.val_fraction=0.1")


def _check_training(cfg: DictConfig) -> None:
    t = cfg.train
    _at_least(cfg, tuple(f"train.{k}" for k in ("max_steps", "log_every", "eval_every", "eval_samples", "ckpt_every",
                                                "keep_ckpts")), 1)
    _at_least(cfg, ("train.warmup_steps",), 0)
    _at_least(cfg, ("deepspeed.micro_batch", "deepspeed.grad_accum"), 1)
    _check_choice(cfg, "train.schedule", ("cosine", "constant"))
    if int(cfg.deepspeed.zero_stage) not in (0, 1, 2):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}", "must be 0, 1 or 2",
                          "pass deepspeed.zero_stage=1 to shard the optimizer state, 2 to shard gradients too")
    if float(t.lr) <= 0:
        raise ConfigError(f"train.lr={t.lr}", "must be > 0", "pass e.g. train.lr=3e-4")
    if not 0 <= float(t.min_lr_ratio) <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio}", "must be in [0, 1]",
                          "pass e.g. train.min_lr_ratio=0.1")
    if float(cfg.deepspeed.grad_clip) < 0:
        raise ConfigError(f"deepspeed.grad_clip={cfg.deepspeed.grad_clip}", "must be >= 0 (0: off)",
                          "pass e.g. deepspeed.grad_clip=1.0")


def _check_sampling(cfg: DictConfig) -> None:
    s = cfg.sample
    _check_choice(cfg, "sample.method", ("cached", "naive"))
    for key in ("per_class", "batch_size", "shard_size", "grid_per_class"):
        if int(s[key]) < 1:
            raise ConfigError(f"sample.{key}={s[key]}", "must be at least 1", f"pass sample.{key}=<n>")
    if float(s.temperature) <= 0:
        raise ConfigError(f"sample.temperature={s.temperature}", "must be > 0", "pass e.g. sample.temperature=1.0")
    if not 0 < float(s.top_p) <= 1:
        raise ConfigError(f"sample.top_p={s.top_p}", "must be in (0, 1]", "pass e.g. sample.top_p=0.95")
    if int(s.top_k) < 0:
        raise ConfigError(f"sample.top_k={s.top_k}", "must be >= 0 (0: no top-k)", "pass e.g. sample.top_k=0")
    if s.seed is not None and (not isinstance(s.seed, int) or isinstance(s.seed, bool)):
        raise ConfigError(f"sample.seed={s.seed}", "must be an integer or null (null: the global seed)",
                          "pass e.g. sample.seed=1")
    if s.classes is not None and (not OmegaConf.is_list(s.classes) or not len(s.classes)):
        raise ConfigError(f"sample.classes={s.classes}", "must be a non-empty list of class indices",
                          "pass e.g. 'sample.classes=[0,3,7]', or null for every class")


def _check_eval(cfg: DictConfig) -> None:
    e = cfg.eval
    _check_choice(cfg, "eval.features", ("classifier", "inception"))
    _check_choice(cfg, "eval.classifier_augment", ("none", "center", "random_resized_crop"))
    if e.features == "inception":
        weights = e.inception_weights
        if weights is None or not Path(os.path.expanduser(str(weights))).is_file():
            raise ConfigError(f"eval.inception_weights={weights}", "no such file (jobs never download weights)",
                              "run `python tools/fetch_inception_weights.py --out <file>` where the internet is "
                              "reachable and pass eval.inception_weights=<file>, or use eval.features=classifier")
    rates = list(e.accept_rates) if OmegaConf.is_list(e.accept_rates) else []
    if not rates or not all(isinstance(r, (int, float)) and 0 < float(r) <= 1 for r in rates):
        raise ConfigError(f"eval.accept_rates={e.accept_rates}", "must be a non-empty list of fractions in (0, 1]",
                          "pass e.g. 'eval.accept_rates=[1.0,0.5,0.1]'")
    for key in ("batch_size", "kid_subset_size", "prc_neighborhood"):
        if int(e[key]) < 1:
            raise ConfigError(f"eval.{key}={e[key]}", "must be at least 1", f"pass eval.{key}=<n>")


def _check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value not in choices:
        raise ConfigError(f"{key}={value}", "unknown choice", f"pass one of: {', '.join(choices)}")
