"""Dataclass configs turned into command-line flags, with named presets, checked before anything loads.

Every field of the dataclass becomes `--field-name`; `--preset NAME` picks the defaults first, flags override.
A config class may define `check(self)`, raising ConfigError (via `must` / `one_of`) for a value out of range:
parse_config then prints one line naming the flag and exits with status 2, before any model or data is read.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from data.io import DataError, write_text_atomic


class ConfigError(ValueError):
    """A flag's value is out of its allowed range: the user's error, reported without a traceback."""


def must(ok: bool, name: str, rule: str, value) -> None:
    """Raise ConfigError "--name rule, got value" unless ok."""
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')} {rule}, got {value!r}")


def one_of(name: str, value, options) -> None:
    must(value in options, name, f"must be one of {', '.join(map(str, options))}", value)


@contextlib.contextmanager
def exit_on_user_error():
    """For entry points: a user's error (a flag out of range, a missing model, data or stage file, bad data)
    prints one line `error: ...` and exits with status 2; any other exception is a bug and keeps its traceback."""
    try:
        yield
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    cfg = cls(**args)
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except ConfigError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)  # one line naming the flag
            sys.exit(2)
    return cfg, preset


def save_config(cfg, path: Path):
    """The resolved config as JSON, written atomically."""
    write_text_atomic(path, json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")


def run_cli(cls, presets: dict, train, argv=None, default_preset: str = "cpu-demo"):
    """A trainer's entry point: flags -> config (checked) -> train(cfg, preset) -> its final metrics as one JSON
    line on rank 0. A user's error (a bad flag, a missing model or data path) is one line and exit status 2."""
    from .tracking import summary_line

    with exit_on_user_error():
        cfg, preset = parse_config(cls, presets, argv, default_preset)
        final = train(cfg, preset)
    if final and os.environ.get("RANK", "0") == "0":
        print(summary_line(final))
