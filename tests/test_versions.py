"""Versioned run roots: the CURRENT pointer, resolving, switching, rolling back and pruning (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatrep import versions


def build(run: Path, *names: str, complete: bool = True) -> None:
    """Version folders with a stage file in each; `_version.json` written when `complete`."""
    for name in names:
        folder = run / "versions" / name
        (folder / "index").mkdir(parents=True)
        (folder / "index" / "_manifest.json").write_text("{}")
        if complete:
            versions.finish(str(run), name, {"inputs": 10})


def test_a_root_without_a_pointer_is_read_as_it_is(tmp_path: Path) -> None:
    assert versions.current(str(tmp_path)) is None
    assert versions.resolve(str(tmp_path)) == str(tmp_path)
    assert versions.next_version(str(tmp_path)) == "v0001"


def test_switch_resolve_and_rollback(tmp_path: Path) -> None:
    run = str(tmp_path)
    build(tmp_path, "v0001", "v0002")
    versions.switch(run, "v0001")
    reader = versions.resolve(run)  # a reader that starts now keeps this root
    pointer = versions.switch(run, "v0002")
    assert pointer["previous"] == "v0001"
    assert reader == versions.root(run, "v0001") and versions.resolve(run) == versions.root(run, "v0002")
    assert versions.resolve(run, "v0001") == versions.root(run, "v0001")
    assert json.loads((tmp_path / "CURRENT").read_text())["version"] == "v0002"
    assert versions.rollback(run)["version"] == "v0001"
    with pytest.raises(versions.VersionError, match="v0001 is the oldest complete version kept"):
        versions.rollback(run)


def test_incomplete_versions_are_refused_to_readers_and_resumed_by_a_rebuild(tmp_path: Path) -> None:
    run = str(tmp_path)
    build(tmp_path, "v0001")
    versions.switch(run, "v0001")
    build(tmp_path, "v0002", complete=False)  # an interrupted rebuild
    with pytest.raises(versions.VersionError, match=r"no complete version 'v0002' \(complete versions: v0001\)"):
        versions.resolve(run, "v0002")
    with pytest.raises(versions.VersionError):
        versions.switch(run, "v0002")
    assert versions.next_version(run) == "v0002"  # the rebuild finishes it
    versions.finish(run, "v0002", {})
    assert versions.next_version(run) == "v0003"


def test_prune_keeps_the_newest_and_the_current(tmp_path: Path) -> None:
    run = str(tmp_path)
    build(tmp_path, "v0001", "v0002", "v0003", "v0004")
    build(tmp_path, "v0005", complete=False)  # being built: never pruned
    versions.switch(run, "v0002")  # rolled back
    assert versions.prune(run, keep=2) == ["v0001"]
    assert versions.complete(run) == ["v0002", "v0003", "v0004"]
    versions.switch(run, "v0004")
    assert versions.prune(run, keep=1) == ["v0002", "v0003"]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["v0004", "v0005"]


def test_a_damaged_pointer_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "CURRENT").write_text("v0001")
    with pytest.raises(versions.VersionError, match="CURRENT is not a version pointer"):
        versions.resolve(str(tmp_path))
