"""Versioned run roots: complete versions under `<run>/versions/<vNNNN>/`, and `<run>/CURRENT`, the pointer to
the one readers use.

A rebuild (`jobs.reindex`) writes every stage of a new version in its own folder, then `_version.json` in it
(the version is complete), and switches the pointer last: one small file written whole (a rename on a local
filesystem, a single PUT on an object store). A reader resolves the pointer once, when it starts, and reads
that version to the end however many versions are published meanwhile; only `prune` removes a version, and it
keeps the newest `keep` complete ones. A run root without a pointer is an ordinary run (`jobs.pipeline`): its
stages sit directly under it and readers use it as it is.
"""

from __future__ import annotations

import datetime
import json
import posixpath
import re
from typing import Any

from gatrep import io

POINTER = "CURRENT"
VERSIONS = "versions"
RECORD = "_version.json"  # written last inside a version: the version is complete
NAME = re.compile(r"^v(\d{4,})$")


class VersionError(io.StageError):
    """A version that does not exist or is incomplete, or a pointer that cannot be read or moved."""


def root(run: str, version: str) -> str:
    """The folder of one version."""
    return io.join(run, VERSIONS, version)


def current(run: str) -> dict[str, Any] | None:
    """The pointer's record ({"version", "switched", "previous"}), or None when the run root has none."""
    fs, path = io.url_to_fs(io.join(run, POINTER))
    if not fs.exists(path):
        return None
    try:
        record = json.loads(fs.cat_file(path))
        NAME.match(record["version"]).group(1)  # type: ignore[union-attr]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VersionError(f"{io.join(run, POINTER)} is not a version pointer ({err}); restore it with "
                           f"jobs.reindex --rollback, or delete it to read the run root itself") from err
    return dict(record)


def resolve(run: str, version: str = "") -> str:
    """The root a reader uses: `version` when given (it must be complete), else the version the pointer names,
    else the run root itself (a run without versions)."""
    if version:
        record(run, version)  # refuses a missing or incomplete version
        return root(run, version)
    pointer = current(run)
    return run if pointer is None else root(run, pointer["version"])


def record(run: str, version: str) -> dict[str, Any]:
    """The `_version.json` of a complete version; VersionError when the version is absent or incomplete."""
    fs, path = io.url_to_fs(io.join(root(run, version), RECORD))
    if not NAME.match(version) or not fs.exists(path):
        known = ", ".join(complete(run)) or "none"
        raise VersionError(f"{run} has no complete version {version!r} (complete versions: {known})")
    return dict(json.loads(fs.cat_file(path)))


def _names(run: str) -> list[str]:
    """Every version folder's name, complete or not, oldest first."""
    fs, path = io.url_to_fs(io.join(run, VERSIONS))
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted((n for n in names if NAME.match(n)), key=lambda n: int(NAME.match(n).group(1)))  # type: ignore[union-attr]


def complete(run: str) -> list[str]:
    """The complete versions (their record is written), oldest first."""
    fs, _ = io.url_to_fs(run)
    return [n for n in _names(run) if fs.exists(io.url_to_fs(io.join(root(run, n), RECORD))[1])]


def next_version(run: str) -> str:
    """The version a rebuild writes: the newest folder when it is incomplete and newer than the pointer (an
    interrupted rebuild: its published stages are reused), else a new number after every existing one."""
    names = _names(run)
    pointer = current(run)
    newer = pointer is None or (names and _number(names[-1]) > _number(pointer["version"]))
    if names and newer and names[-1] not in complete(run):
        return names[-1]
    return f"v{(_number(names[-1]) + 1) if names else 1:04d}"


def _number(version: str) -> int:
    return int(NAME.match(version).group(1))  # type: ignore[union-attr]


def finish(run: str, version: str, details: dict[str, Any]) -> dict[str, Any]:
    """Mark `version` complete by writing its record (call it when every stage is published)."""
    document = {"version": version, "completed": _now(), **details}
    io.write_atomic(io.join(root(run, version), RECORD), json.dumps(document, indent=2, sort_keys=True).encode())
    return document


def switch(run: str, version: str) -> dict[str, Any]:
    """Point readers at `version` (complete): the pointer is written whole, in one step. Returns its record."""
    record(run, version)
    previous = current(run)
    pointer = {"version": version, "switched": _now(), "previous": previous["version"] if previous else None}
    io.write_atomic(io.join(run, POINTER), json.dumps(pointer, indent=2).encode())
    return pointer


def rollback(run: str) -> dict[str, Any]:
    """Point readers back at the newest complete version older than the current one."""
    pointer = current(run)
    if pointer is None:
        raise VersionError(f"{run} has no {POINTER} pointer: nothing to roll back")
    older = [v for v in complete(run) if _number(v) < _number(pointer["version"])]
    if not older:
        raise VersionError(f"{run}: {pointer['version']} is the oldest complete version kept; nothing to roll back to")
    return switch(run, older[-1])


def prune(run: str, keep: int) -> list[str]:
    """Delete the complete versions older than the newest `keep` ones, never the current one, and incomplete
    folders older than the current version (rebuilds that were abandoned); returns the names removed."""
    pointer = current(run)
    in_use = _number(pointer["version"]) if pointer else 0
    kept = set(complete(run)[-keep:]) | ({pointer["version"]} if pointer else set())
    done = set(complete(run))
    removed = [v for v in _names(run)
               if (v in done and v not in kept) or (v not in done and _number(v) < in_use)]
    fs, _ = io.url_to_fs(run)
    for version in removed:
        fs.rm(io.url_to_fs(root(run, version))[1], recursive=True)
    return removed


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
