"""Compose and validate the Hydra config of a `submit` call.

Composition uses Hydra's compose API (not ``@hydra.main``) so that ``submit`` owns its command
line, its exit codes and its error messages, and nothing is written before validation passes.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import pipeline.configs

GROUPS = ("stage", "data", "model", "cluster", "tracking", "deepspeed")


class ConfigError(Exception):
    """A bad setting: names the key, what is wrong and how to fix it (one line)."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem} -- {fix}")


def config_dir() -> Path:
    return Path(pipeline.configs.__file__).resolve().parent


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _parse_override_target(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def split_stage_scoped(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Take out the overrides scoped to one stage, ``<stage>:<key>=<value>`` (in a stage=all command,
    e.g. ``train_top_prior:train.max_steps=200000``): (the others, {stage: [its overrides]})."""
    stages = [s for s in group_options("stage") if s != "all"]
    plain: list[str] = []
    scoped: dict[str, list[str]] = {}
    for o in overrides:
        target = o.partition("=")[0]
        if ":" not in target:  # a value may hold a colon (tracking.uri=http://host:5000), a key never does
            plain.append(o)
            continue
        stage, _, override = o.partition(":")
        if stage not in stages:
            raise ConfigError(target, f"'{stage}' is not a stage", f"scope an override with one of: {', '.join(stages)}")
        if _parse_override_target(override)[0] in GROUPS:
            raise ConfigError(target, "a config group is chosen for every stage at once",
                              f"pass {override} without '{stage}:'")
        scoped.setdefault(stage, []).append(override)
    return plain, scoped


def _check_overrides(overrides: list[str]) -> None:
    """Catch what Hydra would report in less helpful words: bad syntax, unknown group options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(ov, "not a key=value override", "write it as key=value, e.g. stage=prepare")
        try:
            parser.parse_overrides([ov])
        except OverrideParseException as e:
            raise ConfigError(ov, "cannot parse this override (" + str(e).splitlines()[0] + ")",
                              "quote values with special characters, e.g. key='a,b'") from None
        key, value = _parse_override_target(ov)
        if key in GROUPS:
            options = group_options(key)
            if value not in options:
                raise ConfigError(
                    f"{key}={value}", f"unknown option for config group '{key}'",
                    f"choose one of: {', '.join(options)}")


def compose(overrides: list[str]) -> DictConfig:
    """Compose the primary config with command-line overrides; raise ConfigError on any problem."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    _check_overrides(overrides)
    if not any(_parse_override_target(o)[0] == "stage" for o in overrides):
        raise ConfigError("stage", "no stage given",
                          f"pass stage=<name>, one of: {', '.join(group_options('stage'))}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
            defaults = hydra_compose(config_name="config", overrides=[
                o for o in overrides if _parse_override_target(o)[0] in GROUPS])
    except (HydraException, OmegaConfBaseException) as e:
        raise _explain(e, overrides) from None
    _check_types(cfg, defaults, "")
    # The job may run elsewhere (another cwd, another node), and a done stage's recorded config is
    # compared with a later command's: pin every path to an absolute one.
    cfg.run_root = _absolute(cfg.run_root)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not str(value).startswith("/"):  # None also where it is ??? (missing)
            OmegaConf.update(cfg, key, _absolute(value))
    return cfg


# Config keys holding a file or folder path (besides run_root), made absolute by compose.
PATH_KEYS = ("data.source", "encode.vqvae", "eval.inception_weights", "eval.cache_root")


def _absolute(path: object) -> str:
    return str(Path(os.path.expanduser(str(path))).absolute())


def _explain(err: Exception, overrides: list[str]) -> ConfigError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for ov in overrides:
        key, _ = _parse_override_target(ov)
        if f"'{key}'" in str(err) or f"Key '{key.split('.')[-1]}'" in str(err):
            if "not in struct" in str(err) or "Could not override" in str(err):
                return ConfigError(key, "no such config key", unknown_key_fix(key, overrides))
            return ConfigError(ov, text, "fix this override")
    return ConfigError("overrides", text, "see `submit --help` for the accepted keys")


def _keys(overrides: list[str]) -> set[str]:
    """Every dotted key of the config the group choices among ``overrides`` compose to."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from pipeline.tracking import flatten  # tracking imports this module

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return set(flatten(OmegaConf.to_container(cfg, resolve=False)))  # unresolved: ??? values are fine here


def unknown_key_fix(key: str, overrides: list[str]) -> str:
    """The fix for an unknown ``key``: the stages whose config has it, else the likely intended key
    (of the chosen stage, or of any stage for stage=all), else where to look."""
    targets = [_parse_override_target(o) for o in overrides]
    groups = [o for o, (k, _) in zip(overrides, targets) if k in GROUPS and k != "stage"]
    chosen = [v for k, v in targets if k == "stage"][-1:]
    keys = {s: _keys([*groups, f"stage={s}"]) for s in group_options("stage") if s != "all"}
    owners = [s for s, known in keys.items() if key in known]
    if owners:
        return f"it is a setting of stage={', stage='.join(owners)}" + (f", not of stage={chosen[0]}" if chosen else "")
    searched = keys if chosen in (["all"], []) else {chosen[0]: keys.get(chosen[0], set())}
    close = difflib.get_close_matches(key, sorted(set().union(*searched.values())), n=1, cutoff=0.8)
    return f"did you mean {close[0]}?" if close else "check the spelling against `submit stage=<name> --cfg job`"


# Keys whose default's type is one of several they take; `validate` checks their values.
_MIXED_TYPES = ("deepspeed.bf16",)  # auto, true or false


def _check_types(cfg: DictConfig, defaults: DictConfig, prefix: str) -> None:
    """Overrides must keep the type of the default (an int stays an int: ``seed=abc`` is refused)."""
    for key in defaults:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(defaults, key) or OmegaConf.is_missing(cfg, key) or path in _MIXED_TYPES:
            continue
        default, value = defaults[key], cfg[key]
        if isinstance(default, DictConfig):
            _check_types(cfg[key], default, path + ".")
        elif default is not None and value is not None and type(default) is not type(value) and not (
                isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{path}={value}", f"expected {type(default).__name__} "
                              f"(default {default})", f"pass {path}=<{type(default).__name__}>")


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
    if float(cfg.tracking.system_metrics_interval) <= 0:
        raise ConfigError(f"tracking.system_metrics_interval={cfg.tracking.system_metrics_interval}",
                          "must be > 0 seconds", "pass e.g. tracking.system_metrics_interval=10")
    # a/b, ../x or '' would put the stage dirs elsewhere (other odd names are left: a run may exist)
    if "/" in str(cfg.experiment) or str(cfg.experiment) in ("", ".", ".."):
        raise ConfigError(f"experiment={cfg.experiment}", "not usable as a directory name under run_root",
                          "pass a name without '/', e.g. experiment=imagenet256")
    if str(cfg.experiment) in _RUN_ROOT_OWN:
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


# The stages whose outputs depend on how samples are drawn: one directory per ``sample_set``.
SAMPLE_SET_STAGES = ("sample", "evaluate")
SAMPLE_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What run_root holds besides the experiments (tracking's artifacts, evaluate's default feature cache)
_RUN_ROOT_OWN = ("mlartifacts", "fidelity_cache", "mlflow.db")


def stage_name(cfg: DictConfig, stage: str) -> str:
    """``stage``, or ``<stage>-<sample_set>`` for sample and evaluate when a sample set is named:
    the name of the stage's directory and of its MLflow run."""
    named = cfg.get("sample_set")
    return f"{stage}-{named}" if named is not None and stage in SAMPLE_SET_STAGES else stage


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """Where a stage of this experiment keeps its outputs, logs, config and MLflow run id."""
    return Path(cfg.run_root) / str(cfg.experiment) / stage_name(cfg, stage)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
