"""`submit --help`: the stages, config groups and top-level keys; `submit stage=<s> [group=option ...]
--help`: every key that stage's command takes, with its value for these overrides and what it
means, read from the comments in ``configs/``.

A key's meaning is its comment in the YAML file that sets it: the comment after it on its line, or
the comment lines right above it. Files are read in Hydra's order (the groups' chosen options,
then the stage, then ``config.yaml``), a later file's comment winning, as its value does.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import GROUPS, config_dir, group_options

_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*):(.*)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, comment) of what follows ``key:``; a '#' inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def key_comments(path: Path, prefix: str) -> dict[str, str]:
    """Dotted key (under ``prefix``) -> its comment, for every key of a YAML config file."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the maps enclosing the current line
    above: list[str] = []  # comment lines since the last key
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if not stripped.startswith("# @package"):
                above.append(stripped[1:].strip())
            continue
        m = _KEY.match(line)
        if not m:  # a list item, a blank line: comments above do not carry past it
            above = [] if not stripped else above
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        _, inline = _split_comment(m.group(3))
        dotted = ".".join([*(k for _, k in stack), key])
        text = inline or " ".join(above)
        if text and not (indent == 0 and key == "defaults"):
            comments[prefix + dotted] = text
        stack.append((indent, key))
        above = []
    return comments


def choices(overrides: list[str]) -> dict[str, str]:
    """The option of every config group for these overrides (the last one given, else the default)."""
    import yaml

    primary = yaml.safe_load((config_dir() / "config.yaml").read_text())
    chosen = {k: str(v) for d in primary["defaults"] if isinstance(d, dict) for k, v in d.items()}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in GROUPS:
            chosen[key] = value
    return chosen


def all_comments(overrides: list[str]) -> dict[str, str]:
    chosen = choices(overrides)
    comments: dict[str, str] = {}
    for group in (*(g for g in GROUPS if g != "stage"), "stage"):
        path = config_dir() / group / f"{chosen[group]}.yaml"
        is_global = path.read_text().startswith("# @package _global_")
        comments.update(key_comments(path, "" if is_global else f"{group}."))
    comments.update(key_comments(config_dir() / "config.yaml", ""))
    return comments


def leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of nested dicts."""
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def shown(value: object) -> str:
    """A value as it would be typed on the command line (null, true, [0.9, 0.999])."""
    return value if isinstance(value, str) else json.dumps(value)


def stage_help(cfg: DictConfig, overrides: list[str], width: int = 110) -> str:
    """The keys of the composed ``cfg``, section by section: ``key = value`` and its meaning."""
    comments = all_comments(overrides)
    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that cannot resolve here: show it as written
        values = OmegaConf.to_container(cfg, resolve=False)
    chosen = choices(overrides)
    lines = [f"stage={cfg.stage.name} with " + ", ".join(f"{g}={chosen[g]}" for g in GROUPS if g != "stage")
             + ": its keys, their values for this command, and what they mean (from configs/)"]
    sections: dict[str, list[tuple[str, object]]] = {}
    for key, value in leaves(values):
        sections.setdefault(key.split(".")[0] if "." in key else "top-level", []).append((key, value))
    # the stage's own keys first (train.*, sample.*, ...), then the experiment's, then the groups'
    order = sorted(sections, key=lambda s: (s in GROUPS, s == "top-level"))
    for section in order:
        lines += ["", f"{section}:"]
        for key, value in sections[section]:
            lines.append(f"  {key} = {shown(value)}")
            lines += textwrap.wrap(comments.get(key, "(no comment)"), width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    return "\n".join(lines)


USAGE = ("usage: submit stage=<stage> [group=option ...] [key=value ...] [<stage>:key=value ...] [--cfg job] "
         "[--help]")


def _describe(group: str, option: str) -> str:
    import yaml

    node = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text())
    return str(node.get(group, node).get("description", ""))  # stage files are @package _global_


def help_text() -> str:
    import yaml

    from pipeline.stages import ORDER

    lines = [USAGE, "", "Runs one stage of the VQ-VAE-2 pipeline, tracked in MLflow.", "", "stages:"]
    for st in sorted(group_options("stage"), key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER)):
        lines.append(f"  {st:<20}{_describe('stage', st)}")
    primary = yaml.safe_load((config_dir() / "config.yaml").read_text())
    defaults = choices([])
    lines += ["", "config groups (group=option; default marked *):"]
    for g in GROUPS:
        opts = [f"{o}*" if defaults.get(g) == o else o for o in group_options(g)]
        lines.append(f"  {g:<20}{', '.join(opts)}")
    comments = key_comments(config_dir() / "config.yaml", "")
    lines += ["", "top-level keys (default: meaning):"]
    for key, value in leaves({k: v for k, v in primary.items() if k != "defaults"}):
        lines += textwrap.wrap(f"{shown(value)}: {comments.get(key, '')}", 110,
                               initial_indent=f"  {key:<22}", subsequent_indent=" " * 24)
    lines += ["", "examples:", textwrap.indent(textwrap.dedent("""\
        submit stage=all                                       # every stage of the embedded default, here (3-5 min on 2 cores)
        submit stage=prepare                                   # embedded digits -> shards, local
        submit stage=prepare data=folder data.source=/data/flowers
        submit stage=prepare data=imagenet data.source=/datasets/ILSVRC2012 prepare.workers=16
        submit stage=encode verify=true                        # re-read every shard against the manifest (prepare, encode, sample)
        submit stage=prepare --cfg job                         # print the resolved config, run nothing
        submit stage=train_top_prior model=paper_imagenet256 --help  # that stage's keys: values and meanings
        submit stage=prepare tracking.uri=http://127.0.0.1:5000
        submit stage=all data=imagenet data.source=/datasets/ILSVRC2012 model=paper_imagenet256 cluster=slurm
        submit stage=all sample_set=t10 sample.temperature=1.0 # samples of other settings from the same priors, evaluated
        submit stage=all train.max_steps=5000 train_bottom_prior:train.max_steps=8000  # <stage>:key for one stage only
        submit status                                          # where every stage stands
        submit cancel                                          # cancel the experiment's queued and running SLURM jobs (stage=<s>: one)"""), "  "),
        "", "submit stage=<stage> [group=option ...] --help lists that stage's keys, their values and what they mean;",
        "every key is documented in the YAML files under " + str(config_dir())]
    return "\n".join(lines)
