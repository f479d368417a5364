"""Shared command-line plumbing: the options generated from `Config`, and one-line errors.

    parser = OneLineParser(description=__doc__)
    add_config_options(parser)            # --norm, --groups, ..., --preset: one per Config field
    config = config_from_args(parser.parse_args())

Help texts, choices and defaults come from the fields' metadata (`config.knob`), so a new field
is a new option with no edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import types
import typing
from collections.abc import Callable, Iterable

from jaxnorm.checkpoint import CheckpointError
from jaxnorm.config import (
    DATASET_DEFAULTS,
    IDENTITY,
    NORM_DEFAULTS,
    RECIPE,
    WIDTH_PRESETS,
    Config,
    ConfigError,
)
from jaxnorm.data import DataError
from jaxnorm.devices import setup_cpu_devices
from jaxnorm.runlock import RunLocked
from jaxnorm.train import TrainingError, TrainingInterrupted

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, RunLocked)
GROUPS = {IDENTITY: "model and data (fixed for a run)", RECIPE: "training recipe", "runtime": "where and how"}


def run_main(main: Callable[[], object], *, resume_with: str | None = None) -> None:
    """Set up the CPU devices, call `main`; print known errors as `error: ...` on stderr and exit 2.
    An interrupted training run (checkpoint saved) prints how to resume and exits 128 + the signal
    (130 on Ctrl-C). Every script runs through here, so each one gets one JAX device per CPU core
    (`jaxnorm.devices`) before anything starts JAX's backend."""
    try:
        setup_cpu_devices()
        main()
    except TrainingInterrupted as e:
        print(f"interrupted: {e}" + (f"\nresume with: {resume_with}" if resume_with else ""), file=sys.stderr)
        sys.exit(128 + e.signum)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine, not the program: a full disk, a lost permission, an I/O error
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def command_line(argv: Iterable[str], *, add: Iterable[str] = ()) -> str:
    """This script's command line (argv, then `add`), quoted for a shell."""
    argv = [a for a in argv if a not in add]
    return shlex.join(["python", sys.argv[0], *argv, *add])


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error:` line (usage stays in --help)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_config_options(parser: argparse.ArgumentParser, *, only: Iterable[str] = (),
                       exclude: Iterable[str] = ()) -> None:
    """One option per `Config` field (or the fields in `only`), plus --preset where --width is one.

    Every option defaults to None ("not given"): `config_from_args` then applies the dataset's
    defaults, so --help shows those and a given value always wins."""
    hints = typing.get_type_hints(Config)
    groups = {role: parser.add_argument_group(title) for role, title in GROUPS.items()}
    only, exclude = set(only), set(exclude)
    for f in dataclasses.fields(Config):
        if (only and f.name not in only) or f.name in exclude:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[T] or T | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        help_text = f.metadata["help"] + _default_text(f)
        kwargs = ({"action": argparse.BooleanOptionalAction} if kind is bool else
                  {"type": kind, "choices": f.metadata["choices"],
                   "metavar": f.metadata["metavar"] or {int: "N", float: "X"}.get(kind)})
        groups[f.metadata["role"]].add_argument("--" + f.name.replace("_", "-"), default=None, help=help_text,
                                                **kwargs)
        if f.name == "width":
            groups[IDENTITY].add_argument(
                "--preset", choices=sorted(WIDTH_PRESETS), default="base",
                help="channel widths (3x3/1x1): "
                + ", ".join(f"{k} {w}/{t}" for k, (w, t) in WIDTH_PRESETS.items()) + " (default %(default)s)")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is None:
        return ""
    def show(value):
        return ("on" if value else "off") if isinstance(value, bool) else value

    where = [*DATASET_DEFAULTS.items(), *((f"{d} {n}", v) for (d, n), v in NORM_DEFAULTS.items())]
    others = "; ".join(f"{show(v[f.name])} for {d}" for d, v in where if f.name in v)
    return f" (default {show(f.default)}" + (f"; {others})" if others else ")")


def config_from_args(args: argparse.Namespace, *, validate: bool = True, **fixed) -> Config:
    """The Config of the given options (and `fixed` values) over the dataset's defaults, validated
    unless `validate` is False (a config only looked at, never trained)."""
    names = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if getattr(args, "preset", None) is not None:  # explicit --width / --transition-width win
        width, transition = WIDTH_PRESETS[args.preset]
        values = {"width": width, "transition_width": transition, **values}
    values.update(fixed)
    config = Config.for_dataset(values.pop("dataset", "cifar10"), **values)
    return config.validate() if validate else config
