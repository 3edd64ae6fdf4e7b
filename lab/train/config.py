"""Model configs from flags and JSON: one flag per dataclass field, `--config` (a file or an inline
JSON object), and the embedded default's values for whatever is left unset."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Tuple

from lab.train.task import TrainError


def parse_ints(s) -> Tuple[int, ...]:
    if isinstance(s, (list, tuple)):
        return tuple(int(v) for v in s)
    return tuple(int(v) for v in str(s).replace("(", "").replace(")", "").replace(" ", "").split(",") if v)


def add_config_flags(parser, cls, builtin: dict, skip=()):
    """One flag per dataclass field (`--ch-mult 1,2,2,4`, `--using-sa/--no-using-sa`). Unset flags
    take the value from --config, else from `builtin` (the embedded default), else the dataclass."""
    g = parser.add_argument_group(f"{cls.__name__} fields (override --config; unset: the embedded default)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        d = f.default
        shown = builtin.get(f.name, d)
        shown = ",".join(map(str, shown)) if isinstance(shown, (tuple, list)) else shown
        kw = dict(dest=f"cfg_{f.name}", default=None, help=f"(default: {shown})")
        if isinstance(d, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(d, (tuple, list)):
            g.add_argument(flag, type=parse_ints, metavar="A,B,..", **kw)
        else:
            g.add_argument(flag, type=type(d), metavar=f.name.upper(), **kw)


def config_json(args, cls) -> dict:
    """The --config JSON (a file or an inline object), checked against the dataclass fields."""
    if not args.config:
        return {}
    text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainError(f"--config: neither a file nor valid JSON ({e})") from e
    if not isinstance(given, dict):
        raise TrainError(f"--config: expected a JSON object of {cls.__name__} fields, got {type(given).__name__}")
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise TrainError(f"--config: unknown {cls.__name__} fields {unknown}")
    return given


def config_from_args(cls, args, base: dict, skip=()) -> dict:
    """base <- --config JSON <- individual flags."""
    cfg = dict(base)
    cfg.update({k: v for k, v in config_json(args, cls).items() if k not in skip})
    for f in dataclasses.fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None and f.name not in skip:
            cfg[f.name] = v
    return cfg


def note_ignored_config(cls, args, cfg: dict, skip=(), source: str = "the checkpoint") -> None:
    """On resume (or --init) the model config comes from `source`: say so when the flags ask otherwise."""
    asked = config_from_args(cls, args, cfg, skip)
    norm = lambda d: {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}  # noqa: E731
    diff = sorted(k for k, v in norm(asked).items() if norm(cfg).get(k) != v)
    if diff:
        print(f"[train] the model config comes from {source}; ignored flags for {diff}",
              file=sys.stderr)

