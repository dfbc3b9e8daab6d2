"""Input discovery, input manifests and stage manifests."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gatrep import images, io, schemas


def touch(root, *paths):
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")


def test_tree_with_and_without_listings(tmp_path):
    touch(tmp_path, "shirts/l1/a.jpg", "shirts/l1/b.jpg", "shirts/l2/c.jpg", "pants/d.jpg", ".DS_Store",
          "pants/.hidden.jpg", ".git/HEAD", "notes.txt", "pants/_DSC0001.JPG", "_drafts/e.jpg")
    table = io.discover_inputs(str(tmp_path))
    rows = {r["uri"].removeprefix(str(tmp_path) + "/"): (r["listing"], r["category"]) for r in table.to_pylist()}
    assert all(f.startswith("1:") for f in table["fingerprint"].to_pylist()), "size 1, then the mtime"
    assert rows == {
        "notes.txt": (None, None),
        "_drafts/e.jpg": ("_drafts", "_drafts"),  # only hidden (dot) files are skipped
        "pants/_DSC0001.JPG": ("pants", "pants"),
        "pants/d.jpg": ("pants", "pants"),  # <root>/<category>/<image>: the category is the listing
        "shirts/l1/a.jpg": ("shirts/l1", "shirts"),
        "shirts/l1/b.jpg": ("shirts/l1", "shirts"),
        "shirts/l2/c.jpg": ("shirts/l2", "shirts"),
    }
    assert table.schema.equals(schemas.INPUTS)


def test_odd_file_names_each_get_a_row_that_can_be_read(tmp_path):
    """`::` is not URL chaining in a local name, and a name that is not UTF-8 is escaped, not a crash."""
    odd = [b"cats/a::b.jpg", b"cats/caf\xe9.jpg", b"cats/plain.jpg"]
    for name in odd:
        path = os.path.join(os.fsencode(tmp_path), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(name)
    uris = io.discover_inputs(str(tmp_path))["uri"].to_pylist()
    assert [u.removeprefix(str(tmp_path) + "/") for u in uris] == ["cats/a::b.jpg", "cats/caf\\xe9.jpg",
                                                                    "cats/plain.jpg"]
    assert [images.read_file(u, 100)[0] for u in uris] == odd


def test_a_stage_directory_is_not_an_image_tree(tmp_path):
    stage = tmp_path / "embeddings"
    io.publish(str(stage), "embeddings", [], {})
    with pytest.raises(io.InputError, match="is a gatrep stage directory, not an image tree"):
        io.discover_inputs(str(stage))


def test_file_uri_is_accepted(tmp_path):
    touch(tmp_path, "cat/a.png")
    assert io.discover_inputs(f"file://{tmp_path}")["uri"].to_pylist() == [str(tmp_path / "cat/a.png")]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_relative_and_absolute_uris(tmp_path, fmt):
    table = pa.table({"uri": ["imgs/a.jpg", "/data/b.jpg"], "category": ["x", "y"], "listing": ["x/1", None]})
    path = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        path.write_text("uri,category,listing\nimgs/a.jpg,x,x/1\n/data/b.jpg,y,\n")
    else:
        pq.write_table(table, path)
    rows = io.discover_inputs(str(path)).to_pylist()
    assert rows == [
        # an empty listing falls back to the category; a manifest gives no size or time: no fingerprint
        {"uri": "/data/b.jpg", "listing": "y", "category": "y", "fingerprint": None},
        {"uri": str(tmp_path / "imgs/a.jpg"), "listing": "x/1", "category": "x", "fingerprint": None},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,category\na.jpg,x\n", "has no 'uri' column (columns: path, category)"),
        ("uri,category\n", "has no rows"),
        ("uri\na.jpg\na.jpg\n", "lists the same uri more than once"),
    ],
)
def test_bad_manifests(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(io.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        io.discover_inputs(str(path))


def test_missing_empty_and_unknown_inputs(tmp_path):
    with pytest.raises(io.InputError, match="does not exist"):
        io.discover_inputs(str(tmp_path / "nope"))
    with pytest.raises(io.InputError, match="holds no files"):
        io.discover_inputs(str(tmp_path))
    (tmp_path / "list.txt").write_text("a.jpg")
    with pytest.raises(io.InputError, match="is a file but not a .parquet or .csv manifest"):
        io.discover_inputs(str(tmp_path / "list.txt"))


def _graph(nodes: list[int]) -> pa.Table:
    """A graph table (k=1) whose nodes each list node 0."""
    return pa.table({schemas.NODE: nodes, schemas.IMAGE_ID: [f"id-{n}" for n in nodes],
                     schemas.NEIGHBOURS: [[0]] * len(nodes), schemas.SIMILARITIES: [[1.0]] * len(nodes)},
                    schema=schemas.graph(1))


def test_stage_is_invisible_until_published_and_old_runs_are_retired_then_removed(tmp_path):
    stage = str(tmp_path / "graph")

    def run_dirs() -> list[str]:
        return sorted(p.name for p in (tmp_path / "graph").iterdir() if p.name.startswith("run-"))

    first = io.write_table(_graph([1, 2]), io.new_run_dir(stage))
    with pytest.raises(io.StageError, match="has no _manifest.json"):
        io.read_table(stage, "graph")
    io.publish(stage, "graph", [first], {"k": 1}, rows=2)
    assert io.read_table(stage, "graph")[0][schemas.NODE].to_pylist() == [1, 2]
    second = io.write_table(_graph([3]), io.new_run_dir(stage))
    orphan = io.write_table(_graph([9]), io.new_run_dir(stage))  # a crashed run's files
    manifest = io.publish(stage, "graph", [second], {"k": 1}, rows=1)
    table, _ = io.read_table(stage, "graph")
    assert table[schemas.NODE].to_pylist() == [3] and manifest["rows"] == 1
    name = lambda uri: uri.split("/")[-2]  # noqa: E731
    # The first version stays for readers that started on it; the crashed run's folder is gone.
    assert manifest["retired"] == [name(first)] and run_dirs() == sorted([name(first), name(second)])
    assert orphan not in io.list_parquet(stage)
    third = io.write_table(_graph([4]), io.new_run_dir(stage))
    io.publish(stage, "graph", [third], {"k": 1}, rows=1)
    assert run_dirs() == sorted([name(second), name(third)])


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    stage = str(tmp_path / "embeddings")
    refused = pytest.raises(io.StageError, match=r"is being written by another job \(pid \d+ on ")
    with io.stage_lock(stage), refused, io.stage_lock(stage):
        pass
    assert not (tmp_path / "embeddings").exists(), "a lock that published nothing leaves no folder"
    (tmp_path / "embeddings").mkdir()
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "since": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "embeddings" / io.LOCK).write_text(json.dumps(dead))
    with io.stage_lock(stage):
        assert json.loads((tmp_path / "embeddings" / io.LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "embeddings" / io.LOCK).exists()


def test_readers_check_every_table_against_the_data_contract(tmp_path):
    stage = str(tmp_path / "graph")
    wrong = pa.table({schemas.NODE: [1], schemas.IMAGE_ID: ["a"]})
    io.publish(stage, "graph", [io.write_table(wrong, io.new_run_dir(stage))], {})
    with pytest.raises(schemas.SchemaError, match="no column 'neighbours'"):
        io.read_table(stage, "graph")
    with pytest.raises(io.StageError, match="holds the 'graph' stage, not 'embeddings'"):
        io.read_table(stage, "embeddings")
    broken = io.write_table(_graph([1]), io.new_run_dir(stage))
    Path(io.url_to_fs(broken)[1]).write_bytes(b"PAR1 not really")
    io.publish(stage, "graph", [broken], {})
    with pytest.raises(io.StageError, match="not a readable Parquet file"):
        io.read_table(stage, "graph")


def test_up_to_date_compares_config_and_the_upstream_files(tmp_path):
    upstream_uri, stage = str(tmp_path / "embeddings"), str(tmp_path / "graph")
    io.publish(upstream_uri, "embeddings", [], {})
    record = {"embeddings": io.upstream_of(io.read_manifest(upstream_uri), upstream_uri)}
    assert io.up_to_date(stage, "graph", {"k": 1}, record) is None  # never published
    io.publish(stage, "graph", [io.write_table(_graph([0]), io.new_run_dir(stage))], {"k": (1, 2)}, record)
    assert io.up_to_date(stage, "graph", {"k": (1, 2)}, record)["reused"] is True
    assert io.up_to_date(stage, "graph", {"k": (1, 3)}, record) is None
    io.publish(upstream_uri, "embeddings", [io.write_table(_graph([0]), io.new_run_dir(upstream_uri))], {})
    again = io.read_manifest(upstream_uri)
    assert not io.is_current(record["embeddings"], again)
    assert io.up_to_date(stage, "graph", {"k": (1, 2)},
                         {"embeddings": io.upstream_of(again, upstream_uri)}) is None


def test_manifest_checks(tmp_path):
    stage = tmp_path / "embeddings"
    io.publish(str(stage), "embeddings", [], {})
    with pytest.raises(io.StageError, match="holds the 'embeddings' stage, not 'graph'"):
        io.read_manifest(str(stage), "graph")
    manifest = json.loads((stage / io.MANIFEST).read_text())
    (stage / io.MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(io.StageError, match="has schema version 99; this gatrep reads version 1"):
        io.read_manifest(str(stage))
    (stage / io.MANIFEST).write_text("{not json")
    with pytest.raises(io.StageError, match="is not valid JSON"):
        io.read_manifest(str(stage))


def test_schema_validate_names_every_problem():
    actual = pa.schema([("image_id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    with pytest.raises(schemas.SchemaError) as err:
        schemas.validate(actual, schemas.embeddings(4), "x.parquet")
    message = str(err.value)
    assert message.startswith("x.parquet: ")
    assert "missing column 'uri' (string)" in message
    assert "column 'embedding' is list<item: float>, expected fixed_size_list<item: float>[4]" in message
    assert schemas.vector_dim(schemas.embeddings(7), "embedding") == 7


def test_an_embeddings_table_from_before_fingerprints_is_still_valid(tmp_path):
    table = pa.table({f.name: pa.nulls(1, f.type) for f in schemas.embeddings(4) if f.name != "fingerprint"})
    stage = str(tmp_path / "embeddings")
    io.publish(stage, "embeddings", [io.write_table(table, io.new_run_dir(stage))], {})
    assert io.read_table(stage, "embeddings")[0].num_rows == 1
