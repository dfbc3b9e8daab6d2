"""The graph stage (`python -m jobs.graph`) end to end on small hand-made embeddings stages: table, manifest,
mutual k-NN, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gatrep import cli, io, schemas
from gatrep.vectors import PAD, exact_knn


def _graph_rows(run: str) -> tuple[list[dict], dict]:
    table, manifest = io.read_table(io.join(run, "graph"), "graph")
    return table.sort_by(schemas.NODE).to_pylist(), manifest


def test_graph_job_writes_exact_neighbours_and_manifest(clustered, write_embeddings, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    run = str(tmp_path)
    vectors = clustered(4, 3)
    write_embeddings(run, vectors)
    assert cli.run_job("graph", ["--run", run, "--k", "3"]) == 0
    rows, manifest = _graph_rows(run)
    expected, _ = exact_knn(vectors, 3)
    assert [r[schemas.NODE] for r in rows] == list(range(12))
    assert [r[schemas.NEIGHBOURS] for r in rows] == expected.tolist()
    assert all(set(r[schemas.NEIGHBOURS]) == set(range(4 * (i // 4), 4 * (i // 4) + 4)) - {i}
               for i, r in enumerate(rows)), "each node's 3 neighbours are the rest of its cluster"
    assert rows[5][schemas.IMAGE_ID] == "id-5"
    assert manifest["k"] == 3 and manifest["metric"] == "cosine" and manifest["mutual"] is False
    assert manifest["recall"]["value"] == 1.0 and manifest["counts"]["edges"] == 36
    assert manifest["upstream"]["embeddings"]["rows"] == 12
    assert "recall@3: 1.0" in capsys.readouterr().out


def test_graph_job_mutual_filter_drops_one_way_edges(clustered, write_embeddings, tmp_path: Path) -> None:
    # Three points on a line at 0, 1 and 3 degrees plus a far one at 90: with k=1, 3 lists 1 (its nearest)
    # but 1 lists 0, so only 0<->1 survives; 90 lists 3 one-way.
    degrees = np.deg2rad([0.0, 1.0, 3.0, 90.0])
    vectors = np.stack([np.cos(degrees), np.sin(degrees)], axis=1).astype(np.float32)
    run = str(tmp_path)
    write_embeddings(run, vectors)
    assert cli.run_job("graph", ["--run", run, "--k", "1", "--mutual", "true"]) == 0
    rows, manifest = _graph_rows(run)
    assert [r[schemas.NEIGHBOURS] for r in rows] == [[1], [0], [PAD], [PAD]]
    assert np.isnan([r[schemas.SIMILARITIES][0] for r in rows][2:]).all(), "padded slots have no similarity"
    assert manifest["counts"]["edges_knn"] == 4 and manifest["counts"]["edges"] == 2
    assert manifest["counts"]["nodes_without_neighbours"] == 2
    assert manifest["recall"]["measured"] == "before the mutual filter"


def test_graph_job_per_listing_and_only_one_listing(clustered, write_embeddings, tmp_path: Path) -> None:
    vectors = clustered(5, 2)
    listings = ["shirts/a"] * 5 + ["shoes/b"] * 5
    run = str(tmp_path)
    write_embeddings(run, vectors, listings=listings, categories=[s.split("/")[0] for s in listings])
    assert cli.run_job("graph", ["--run", run, "--k", "2", "--group-by", "listing"]) == 0
    rows, manifest = _graph_rows(run)
    assert all(all(j // 5 == i // 5 for j in r[schemas.NEIGHBOURS]) for i, r in enumerate(rows))
    assert manifest["counts"]["groups"] == 2
    assert cli.run_job("graph", ["--run", run, "--k", "2", "--group-by", "category", "--only", "shoes"]) == 0
    rows, manifest = _graph_rows(run)
    assert [r[schemas.NODE] for r in rows] == [5, 6, 7, 8, 9]  # node ids stay global
    assert all(5 <= j <= 9 for r in rows for j in r[schemas.NEIGHBOURS])
    assert manifest["only"] == "shoes" and manifest["rows"] == 5


def test_graph_job_uses_ok_rows_only_sorted_by_uri(clustered, write_embeddings, tmp_path: Path) -> None:
    vectors = clustered(3, 2)
    status = [schemas.OK] * 6
    status[1] = schemas.TRUNCATED
    run = str(tmp_path)
    write_embeddings(run, vectors, status=status, dtype="float16")
    assert cli.run_job("graph", ["--run", run, "--k", "1"]) == 0
    rows, _ = _graph_rows(run)
    assert [r[schemas.IMAGE_ID] for r in rows] == ["id-0", "id-2", "id-3", "id-4", "id-5"]
    assert rows[0][schemas.NEIGHBOURS] == [1]  # node 1 is id-2, the other ok member of cluster 0


def test_graph_job_with_pynndescent_reaches_high_recall(clustered, write_embeddings, tmp_path: Path) -> None:
    run = str(tmp_path)
    write_embeddings(run, clustered(30, 10, dim=16))
    assert cli.run_job("graph", ["--run", run, "--k", "5", "--exact-below", "0", "--n-jobs", "1"]) == 0
    rows, manifest = _graph_rows(run)
    assert manifest["counts"]["approximate_groups"] == 1
    assert manifest["recall"]["value"] >= 0.95
    assert all(i not in r[schemas.NEIGHBOURS] and PAD not in r[schemas.NEIGHBOURS] for i, r in enumerate(rows))
    assert all(j // 30 == i // 30 for i, r in enumerate(rows) for j in r[schemas.NEIGHBOURS])


def test_graph_job_rerun_reuses_published_stage(clustered, write_embeddings, tmp_path: Path) -> None:
    run = str(tmp_path)
    write_embeddings(run, clustered(4, 2))
    assert cli.run_job("graph", ["--run", run, "--k", "2"]) == 0
    first = json.loads((tmp_path / "graph" / io.MANIFEST).read_text())
    assert cli.run_job("graph", ["--run", run, "--k", "2"]) == 0
    assert json.loads((tmp_path / "graph" / io.MANIFEST).read_text()) == first
    assert cli.run_job("graph", ["--run", run, "--k", "3"]) == 0
    assert json.loads((tmp_path / "graph" / io.MANIFEST).read_text())["k"] == 3


@pytest.mark.parametrize("case, message", [
    ("no_manifest", "no _manifest.json"),
    ("nan", "NaN or infinite"),
    ("zero", "all-zero vectors"),
    ("too_few", "4 nodes, but k=4"),
    ("wrong_schema", "missing column 'status'"),
    ("unknown_group", "no ok rows with listing 'nope'"),
])
def test_graph_job_refuses_bad_input_and_writes_nothing(clustered, write_embeddings, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, case: str,
                                                         message: str) -> None:
    run = str(tmp_path)
    vectors = clustered(2, 2)
    argv = ["--run", run, "--k", "4" if case == "too_few" else "1"]
    if case == "no_manifest":
        write_embeddings(run, vectors, publish=False)
    elif case in ("nan", "zero"):
        vectors[2] = np.nan if case == "nan" else 0.0
        write_embeddings(run, vectors)
    elif case == "wrong_schema":
        table = pa.table({schemas.URI: ["a"], schemas.EMBEDDING: pa.array([[1.0, 0.0]], schemas.vector_type(2))})
        stage = io.join(run, "embeddings")
        io.publish(stage, "embeddings", [io.write_table(table, io.new_run_dir(stage))], config={})
    else:
        write_embeddings(run, vectors, listings=["x"] * 4)
        if case == "unknown_group":
            argv += ["--group-by", "listing", "--only", "nope"]
    assert cli.run_job("graph", argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "graph").exists()


def test_a_truncated_embeddings_file_is_a_one_line_error(clustered, write_embeddings, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run = str(tmp_path)
    stage = write_embeddings(run, clustered(3, 2))
    part = next(Path(stage).glob("run-*/*.parquet"))
    part.write_bytes(part.read_bytes()[:50])
    assert cli.run_job("graph", ["--run", run, "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a readable Parquet file" in err
    assert not (tmp_path / "graph").exists()
