"""`submit stage=<s> [group=option ...] --help`: every key that stage's command takes, with its value
for these overrides and what it means, read from the comments in ``configs/``.

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

from pipeline.config import GROUPS, config_dir

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
