"""The command line of every job (`gatrep <job> [flags]`, `python -m jobs.<job>`): flags (and --config YAML) ->
config -> run -> summary.

A user error (bad input, a missing or stale stage, a bad flag: gatrep.errors.UserError) prints one line
and exits 2; anything else is a bug and shows its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import yaml

from gatrep import stages
from gatrep.config import ConfigError, from_dict
from gatrep.errors import UserError

C = TypeVar("C")

JOBS = (*stages.NAMES, "pipeline", "reindex", "categorize")


def _flag_type(field: dataclasses.Field) -> Any:
    hint = field.type if not isinstance(field.type, str) else eval(field.type, vars(typing))  # noqa: S307
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return lambda s: tuple(inner(x) for x in s.split(",") if x)
    return hint


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per config field, plus --config FILE.yaml."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of field values; flags override it")
    for field in dataclasses.fields(cls):
        has_default = field.default is not dataclasses.MISSING
        default = field.default if has_default else None
        help_text = field.metadata.get("help", "")
        if has_default:
            help_text += f" (default: {default})"
        parser.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, type=_flag_type(field), default=None,
            help=help_text,
        )
    return parser


def parse(cls: type[C], argv: Sequence[str] | None, description: str) -> C:
    """Parse argv into a frozen `cls`: defaults, then --config YAML, then flags."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            parser.error(f"--config {args.config}: cannot be read as YAML ({err})")
        if not isinstance(loaded, dict):
            parser.error(f"{args.config}: expected a mapping of field names to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        parser.error("missing required flags: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        return from_dict(cls, values)
    except ConfigError as err:
        parser.error(str(err))
    raise AssertionError("unreachable")


def job_module(name: str) -> ModuleType:
    """The module that runs job `name`: a stage module, or gatrep.pipeline / gatrep.reindex."""
    if name in ("pipeline", "reindex"):
        return importlib.import_module(f"gatrep.{name}")
    return stages.module(name)


def run_job(name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` into the job's config, run it and print its summary; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    module = job_module(name)
    if "--list" in argv and hasattr(module, "list_names"):
        print(module.list_names())
        return 0
    cfg = parse(module.CONFIG, argv, module.DESCRIPTION)
    start = time.perf_counter()
    try:
        result = module.run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(module.summary(result))
    print(f"  total: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`gatrep <job> [flags]`: run one job by name."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        print(f"usage: gatrep {{{','.join(JOBS)}}} [flags]   (gatrep <job> --help for a job's flags)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return run_job(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
