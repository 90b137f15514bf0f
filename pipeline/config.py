"""Compose the Hydra config of a `submit` call (its values are checked by `pipeline.config_checks`),
and its flat ``a.b=value`` form (MLflow params, the settings a resume or rerun compares).

Composition uses Hydra's compose API (not ``@hydra.main``) so that ``submit`` owns its command
line, its exit codes and its error messages, and nothing is written before validation passes.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import pipeline.configs
from pipeline.wording import first_few

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


# Config dicts whose keys are the user's (sbatch options) and the option of the group that has them:
# Hydra's struct mode refuses a key the file does not list (`cluster.extra={reservation: mine}` was
# "no such config key"), so their overrides become force-adding ones ('++'). '++' merges a mapping
# into the one there, so a whole one given (`train_vqvae:cluster.extra={}` after `cluster.extra=
# {hold: true}`) first removes what was there: it replaces it, as for any other key.
OPEN_DICTS = {"cluster.extra": ("cluster", "slurm")}


def _open_dict_overrides(overrides: list[str]) -> list[str]:
    chosen = {k: v for k, v in map(_parse_override_target, overrides) if k in GROUPS}
    opened = [d for d, (group, option) in OPEN_DICTS.items() if chosen.get(group) == option]

    def rewritten(override: str) -> list[str]:
        key = _parse_override_target(override)[0]
        if override.startswith(("++", "~")) or not any(key == d or key.startswith(d + ".") for d in opened):
            return [override]
        return ([f"~{key}"] if key in opened else []) + [f"++{override.lstrip('+')}"]

    return [o for override in overrides for o in rewritten(override)]


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
    overrides = _open_dict_overrides(overrides)
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
    of_option = _other_option_with(key, groups)
    if of_option:
        return of_option
    searched = keys if chosen in (["all"], []) else {chosen[0]: keys.get(chosen[0], set())}
    known = sorted(set().union(*searched.values()))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if close:
        return f"did you mean {close[0]}?"
    leaf = key.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] in (leaf, _LEAF_SYNONYMS.get(leaf))]
    if same_name:  # the right name under another section (train.batch_size -> deepspeed.micro_batch)
        return f"did you mean {first_few(same_name, limit=5)}?"
    return "check the spelling against `submit stage=<name> --cfg job`"


# names other trainers use -> the name of the same setting here
_LEAF_SYNONYMS = {"batch_size": "micro_batch", "learning_rate": "lr", "epochs": "max_steps", "steps": "max_steps",
                  "iterations": "max_steps", "max_iters": "max_steps", "temp": "temperature",
                  "num_samples": "per_class", "n_samples": "per_class"}


def _other_option_with(key: str, groups: list[str]) -> str:
    """Where another option of ``key``'s config group has it (``cluster.partition=gpu`` without
    ``cluster=slurm``): which, and the group choice to pass; else ''."""
    group = key.partition(".")[0]
    if group not in GROUPS or group == "stage":
        return ""
    given = [g.partition("=")[2] for g in groups if g.partition("=")[0] == group][-1:]
    current = given[0] if given else next(
        str(d[group]) for d in OmegaConf.load(config_dir() / "config.yaml").defaults if group in d)
    others = [g for g in groups if g.partition("=")[0] != group]

    def has(option: str) -> bool:
        return any(key == d or key.startswith(d + ".") for d, owner in OPEN_DICTS.items() if owner == (group, option)) \
            or key in _keys([*others, f"{group}={option}", "stage=prepare"])

    owners = [o for o in group_options(group) if o != current and has(o)]
    return (f"it is a setting of {group}={f', {group}='.join(owners)}, not of {group}={current}: pass "
            f"{' or '.join(f'{group}={o}' for o in owners)}") if owners else ""


# Keys whose default's type is one of several they take; `validate` checks their values.
_MIXED_TYPES = ("deepspeed.bf16",)  # auto, true or false


def _check_types(cfg: DictConfig, defaults: DictConfig, prefix: str) -> None:
    """Overrides must keep the type of the default (an int stays an int: ``seed=abc`` is refused)."""
    for key in defaults:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(defaults, key) or OmegaConf.is_missing(cfg, key) or path in _MIXED_TYPES:
            continue
        default, value = defaults[key], cfg[key]
        if isinstance(default, (DictConfig, ListConfig)) and not isinstance(value, type(default)):
            # null too: the jobs iterate these (cluster.setup=null failed only as sbatch was called)
            if isinstance(default, DictConfig) and len(default):  # a section: its keys are set one by one
                raise ConfigError(f"{path}={value}", "is a config section, not a value",
                                  f"set its keys, e.g. {path}.{next(iter(default))}=<value>")
            kind, shape = ("a list", "[<value>, ...]") if isinstance(default, ListConfig) else \
                ("a mapping", "{<key>: <value>, ...}")
            raise ConfigError(f"{path}={value}", f"expected {kind} (default {OmegaConf.to_container(default)})",
                              f"pass '{path}={shape}'")
        if isinstance(default, DictConfig):
            _check_types(value, default, path + ".")
        elif default is not None and value is not None and type(default) is not type(value) and not (
                isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{path}={value}", f"expected {type(default).__name__} "
                              f"(default {default})", f"pass {path}=<{type(default).__name__}>")


# The stages whose outputs depend on how samples are drawn: one directory per ``sample_set``.
SAMPLE_SET_STAGES = ("sample", "evaluate")
SAMPLE_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


def flatten(cfg: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, the form MLflow params take."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def changed_settings(then: Mapping[str, str], now: Mapping[str, str], compared: Callable[[str], bool],
                     limit: int) -> str:
    """``key=old there, new now; ...`` for the flat keys both sides have that ``compared`` keeps and
    that differ (a key one side lacks was added or dropped since: not a change of setting), the
    first ``limit`` of them and how many more; '' where none differs."""
    changed = [f"{k}={then[k]} there, {now[k]} now" for k in sorted(set(then) & set(now))
               if then[k] != now[k] and compared(k)]
    return first_few(changed, limit, sep="; ")
