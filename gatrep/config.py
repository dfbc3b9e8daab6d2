"""Frozen per-stage configs, built from defaults < a YAML file < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or flag that cannot be turned into a stage config."""


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """The embedding stage: images -> `embeddings` table."""

    input: str = dataclasses.field(metadata={"help": "image tree or manifest (.parquet/.csv), any fsspec URI"})
    out: str = dataclasses.field(metadata={"help": "run root URI; the stage is written to <out>/embeddings"})
    backbone: str = dataclasses.field(default="mobilenet_v2", metadata={"help": "backbone name (see --list)"})
    weights: str = dataclasses.field(
        default="default",
        metadata={"help": "'default' (explicit caches and installed weight packages), 'random', or a file"},
    )
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per backbone batch"})
    decode_batch_size: int = dataclasses.field(default=32, metadata={"help": "files per read/decode task"})
    actors: int = dataclasses.field(
        default=0, metadata={"help": "backbone actors; 0 = one per GPU, or one on a CPU-only cluster"}
    )
    threads_per_actor: int = dataclasses.field(
        default=0, metadata={"help": "torch threads in each CPU actor; 0 = the node's cores"}
    )
    dtype: str = dataclasses.field(default="float32", metadata={"help": "stored vectors: float32 or float16"})
    max_pixels: int = dataclasses.field(
        default=64_000_000, metadata={"help": "images with more pixels are refused as 'too_large'"}
    )
    max_bytes: int = dataclasses.field(
        default=100_000_000, metadata={"help": "files larger than this are refused as 'too_large'"}
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"dtype must be float32 or float16, not {self.dtype!r}")
        for name in ("batch_size", "decode_batch_size", "max_pixels", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.actors < 0 or self.threads_per_actor < 0:
            raise ConfigError("actors and threads_per_actor must be >= 0")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict, for manifests and checkpoints."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config from `to_dict` output; refuses unknown keys by name."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err


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
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
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
