"""Dataclass configs turned into command-line flags, with named presets.

Every field of the dataclass becomes `--field-name`; `--preset NAME` picks the defaults first, flags override.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[s.lower()]
    if default is None:
        return str
    return type(default)


def parse_config(cls, presets: dict[str, dict], argv=None, default_preset: str | None = None):
    """(cls instance, preset name) from `--preset` (overrides of the dataclass defaults) and then the flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default_preset, choices=sorted(presets))
    known, _ = pre.parse_known_args(argv)
    base = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}
    if known.preset:
        unknown = set(presets[known.preset]) - set(base)
        if unknown:
            raise ValueError(f"preset {known.preset!r} sets unknown fields {sorted(unknown)}")
        base.update(presets[known.preset])

    p = argparse.ArgumentParser(description=cls.__doc__, parents=[pre],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = base[f.name]
        kind = _flag_type(default)
        help_ = f.metadata.get("help", "")
        if isinstance(default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, nargs="?", const=True,
                           help=help_)
        elif isinstance(default, (list, tuple)):
            p.add_argument(f"--{f.name.replace('_', '-')}", nargs="*", default=default, help=help_)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, help=help_)
    args = vars(p.parse_args(argv))
    preset = args.pop("preset")
    return cls(**args), preset


def save_config(cfg, path: Path):
    """The resolved config as JSON, written atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
