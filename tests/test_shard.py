"""The sharded k-NN build (gatrep.shard): cell assignment, merging by hand, recall against exact search, one
partition as the single build, the graph job with --partitions, whose driver reads no vector, --probe and
--refine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from gatrep import cli, io, knn, schemas, shard
from gatrep.config import ConfigError, GraphConfig
from gatrep.stages import graph as graph_stage
from gatrep.vectors import PAD, exact_knn, normalise

pytestmark = pytest.mark.usefixtures("local_ray")


def _unit(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_assign_cells_puts_each_row_in_its_nearest_cells_nearest_first() -> None:
    # Three tight clusters at 0, 100 and 220 degrees: with 3 cells each cluster is one cell; a row's second cell
    # is the next nearest cluster: 0 -> 100, 100 -> 0, 220 -> 100 (120 degrees away, against 140 to 0).
    vectors = _unit([0, 1, 2, 100, 101, 102, 220, 221, 222])
    cells = shard.assign_cells(vectors, 3, overlap=2, seed=0)
    first = cells[:, 0]
    assert len(set(first[:3])) == len(set(first[3:6])) == len(set(first[6:])) == 1
    assert len({first[0], first[3], first[6]}) == 3, "each cluster is its own cell"
    assert cells[:, 1].tolist() == [first[3]] * 3 + [first[0]] * 3 + [first[3]] * 3
    members = shard.cell_members(cells, 3)
    assert members[first[0]].tolist() == [0, 1, 2, 3, 4, 5]
    assert members[first[3]].tolist() == list(range(9))
    assert members[first[6]].tolist() == [6, 7, 8]
    assert shard.assign_cells(vectors, 3, overlap=1, seed=0).tolist() == first[:, None].tolist()
    with pytest.raises(ValueError, match="overlap 3"):
        shard.assign_cells(vectors, 2, overlap=3)


def test_merge_candidates_keeps_k_best_distinct_and_drops_self_by_hand() -> None:
    # Node 0 is in both cells: cell A offers 1 (0.9), 2 (0.5); cell B offers 1 again (0.9), 3 (0.7), itself.
    cell_a = (np.array([0, 1]), np.array([[1, 2], [0, PAD]]),
              np.array([[0.9, 0.5], [0.9, np.nan]], dtype=np.float32))
    cell_b = (np.array([0, 3]), np.array([[1, 3], [0, 0]]),
              np.array([[0.9, 0.7], [0.7, 0.7]], dtype=np.float32))
    cell_c = (np.array([0]), np.array([[0, PAD]]), np.array([[1.0, np.nan]], dtype=np.float32))
    neighbours, sims = shard.merge_candidates(4, 3, [cell_a, cell_b, cell_c])
    assert neighbours.tolist() == [[1, 3, 2], [0, PAD, PAD], [PAD, PAD, PAD], [0, PAD, PAD]]
    np.testing.assert_allclose(sims[0], [0.9, 0.7, 0.5], rtol=1e-6)
    assert np.isnan(sims[1:, 1:]).all() and np.isnan(sims[2, 0]), "missing neighbours have no similarity"


def test_a_refinement_task_ranks_the_same_candidates_block_by_block() -> None:
    # A cell's home nodes are refined a block at a time (memory); blocks of 7 give what one block gives: each node's
    # best of its neighbours and their neighbours, by exact cosine.
    import ray

    vectors = normalise(np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32))
    graph = np.roll(np.arange(60), -1)[:, None] + np.array([0, 5, 11])  # arbitrary neighbours, ids wrap below
    graph = np.where(graph >= 60, graph - 60, graph)
    graph[3] = PAD  # a node without neighbours keeps none
    home = np.zeros(60, dtype=np.int64)
    homes = {0: ray.put((np.arange(60), vectors))}
    mine = np.arange(0, 60, 3)
    whole = ray.get(shard._refine_cell.remote((mine, vectors[mine]), graph, home, homes, block=1_000))
    blocked = ray.get(shard._refine_cell.remote((mine, vectors[mine]), graph, home, homes, block=7))
    for a, b in zip(whole[:3], blocked[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    for node, found in zip(mine, whole[1], strict=True):
        first = graph[node][graph[node] != PAD]
        candidates = (set(first) | set(graph[first].ravel())) - {PAD, node}
        best = sorted(candidates, key=lambda c: -float(vectors[c] @ vectors[node]))[:3]
        assert list(found[found != PAD]) == best, node


def test_one_partition_is_the_single_build(clustered) -> None:
    vectors = clustered(50, 6, dim=16)
    single = knn.grouped_knn(vectors, np.zeros(len(vectors)), 5, exact_below=4096, n_jobs=1, seed=3)
    sharded = shard.sharded_knn(vectors, 5, 1, exact_below=4096, n_jobs=1, seed=3)
    np.testing.assert_array_equal(sharded[0], single[0])
    np.testing.assert_array_equal(sharded[1], single[1])
    assert sharded[2] == single[2]


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def test_sharded_build_reaches_exact_recall_on_clustered_data() -> None:
    # 30 loose clusters that overlap: 4 cells must cut some of them, and the second cell of each row is what
    # finds the neighbours across the cut. Cells are searched exactly (below exact_below), so every miss is a
    # neighbour across a cell boundary.
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 32))
    vectors = normalise(np.repeat(centres, 100, axis=0) + rng.standard_normal((3_000, 32)))
    exact, _ = exact_knn(vectors, 10)
    neighbours, sims, counts = shard.sharded_knn(vectors, 10, 4, exact_below=4096, seed=0, n_jobs=1)
    one_cell_each, _, _ = shard.sharded_knn(vectors, 10, 4, exact_below=4096, overlap=1, seed=0, n_jobs=1)
    assert _recall(neighbours, exact) >= 0.95
    assert _recall(one_cell_each, exact) < 0.9, "without overlap the boundaries lose neighbours"
    assert counts["partitions"] == 4 and counts["overlap"] == 2 and counts["largest_cell"] < 3_000
    assert (neighbours != np.arange(3_000)[:, None]).all() and (neighbours != PAD).all()
    assert all(len(set(row)) == 10 for row in neighbours), "neighbours are distinct"
    assert (np.diff(sims, axis=1) <= 1e-6).all(), "best first"
    picked = rng.choice(3_000, 50, replace=False)
    np.testing.assert_allclose(sims[picked], np.einsum("nkd,nd->nk", vectors[neighbours[picked]], vectors[picked]),
                               atol=1e-5)


def test_choose_partitions_grows_with_data_and_shrinks_with_memory() -> None:
    assert shard.choose_partitions(10_000, 64, memory_bytes=8e9, cpus=2) == 1
    few = shard.choose_partitions(10_000_000, 512, memory_bytes=64e9, cpus=8)
    many = shard.choose_partitions(10_000_000, 512, memory_bytes=16e9, cpus=8)
    assert 2 <= few < many
    # A cell of n * overlap / p rows fits in half a CPU's share of memory.
    assert 10_000_000 * 2 / many * (4 * 512 + shard.ROW_OVERHEAD) <= 0.5 * 16e9 / 8
    assert shard.cluster_partitions(1_000, 8) == 1
    with pytest.raises(ValueError, match="positive"):
        shard.choose_partitions(0, 8, 1e9, 1)


def test_graph_config_refuses_partitions_with_groups_or_updates() -> None:
    with pytest.raises(ConfigError, match="--group-by none"):
        GraphConfig(run="r", partitions=2, group_by="listing")
    with pytest.raises(ConfigError, match="no --update-from"):
        GraphConfig(run="r", partitions=0, update_from="r/old-graph")
    with pytest.raises(ConfigError, match=">= 0"):
        GraphConfig(run="r", partitions=-1)
    assert GraphConfig(run="r", partitions=1, group_by="listing").partitions == 1
    with pytest.raises(ConfigError, match="probe 0 or >= overlap"):
        GraphConfig(run="r", partitions=4, overlap=3, probe=2)
    with pytest.raises(ConfigError, match="refine must be >= 0"):
        GraphConfig(run="r", partitions=4, refine=-1)


def test_graph_job_with_two_partitions_finds_each_cluster(clustered, write_embeddings, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = str(tmp_path)
    vectors = clustered(20, 6, dim=16)
    write_embeddings(run, vectors)
    assert cli.run_job("graph", ["--run", run, "--k", "5", "--partitions", "2"]) == 0
    table, manifest = io.read_table(io.join(run, "graph"), "graph")
    rows = table.sort_by(schemas.NODE).to_pylist()
    assert [r[schemas.NODE] for r in rows] == list(range(120))
    assert all(j // 20 == i // 20 and j != i for i, r in enumerate(rows) for j in r[schemas.NEIGHBOURS])
    assert manifest["config"]["partitions"] == 2 and manifest["counts"]["partitions"] == 2
    assert manifest["recall"]["value"] == 1.0 and manifest["counts"]["edges"] == 600
    assert "2 cells of" in capsys.readouterr().out


def _three_file_stage(run: str, vectors: np.ndarray, write_embeddings) -> list[str]:
    """Publish `vectors` as an embeddings stage of three files whose rows are not in uri order, with a failed row
    (no vector) before every 50th; returns the image ids of the ok rows by uri, which are in the order of
    `vectors`: node i is vectors[i]."""
    failed = np.arange(len(vectors)) % 50 == 0
    padded = np.insert(vectors, np.flatnonzero(failed), 0.0, axis=0)
    status = np.full(len(padded), schemas.OK, dtype=object)
    status[np.flatnonzero(failed) + np.arange(failed.sum())] = schemas.UNREADABLE
    stage = write_embeddings(run, padded, status=status.tolist(), publish=False)
    table, = [pq.read_table(f) for f in Path(stage).glob("run-*/*.parquet")]
    order = np.random.default_rng(1).permutation(table.num_rows)
    run_dir = io.new_run_dir(stage)
    files = [io.write_table(table.take(part), run_dir, f"part-{i}.parquet")
             for i, part in enumerate(np.array_split(order, 3))]
    io.publish(stage, schemas.EMBEDDINGS, files, config={"test": True}, rows=table.num_rows)
    return [f"id-{i}" for i in np.flatnonzero(status == schemas.OK)]


def test_sharded_graph_stage_reads_no_vector_in_the_driver(write_embeddings, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The loose clusters of the test above, in three files with failed rows between them; the driver may read
    # ids and uris but never a vector: read_nodes and any read of the embedding column fail the test.
    rng = np.random.default_rng(0)
    vectors = normalise(np.repeat(rng.standard_normal((30, 32)), 100, axis=0) + rng.standard_normal((3_000, 32)))
    run = str(tmp_path)
    image_ids = _three_file_stage(run, vectors, write_embeddings)
    read_table = io.read_table

    def ids_only(stage_uri: str, stage: str, table: str | None = None, columns: list[str] | None = None) -> Any:
        assert stage != schemas.EMBEDDINGS or (columns and schemas.EMBEDDING not in columns), "driver read vectors"
        return read_table(stage_uri, stage, table, columns)

    monkeypatch.setattr(graph_stage, "read_nodes", lambda *a: pytest.fail("the sharded driver called read_nodes"))
    monkeypatch.setattr(io, "read_table", ids_only)
    manifest = graph_stage.run(GraphConfig(run=run, k=10, partitions=4, n_jobs=1, recall_sample=300))
    monkeypatch.undo()
    built = graph_stage.read_graph(io.join(run, "graph"))
    assert built.image_id.tolist() == image_ids and built.node.tolist() == list(range(3_000))
    exact, _ = exact_knn(vectors, 10)
    assert _recall(built.neighbours, exact) >= 0.95
    assert manifest["counts"]["partitions"] == 4 and manifest["rows"] == 3_000
    groups = np.zeros(3_000, dtype=object)
    assert manifest["recall"]["value"] == pytest.approx(knn.recall_at_k(vectors, built.neighbours, groups, 300))
    np.testing.assert_allclose(built.similarities, np.einsum("nkd,nd->nk", vectors[built.neighbours], vectors),
                               atol=1e-5)
    published = Path(manifest["files"][0]).parent.name
    assert [p.name for p in (tmp_path / "graph").glob("run-*")] == [published], "the cells' scratch folder is gone"


def test_sharded_graph_stage_refuses_bad_vectors_before_building(clustered, write_embeddings,
                                                                  tmp_path: Path) -> None:
    vectors = clustered(20, 6, dim=16)
    vectors[[7, 90]] = np.nan
    run = str(tmp_path)
    write_embeddings(run, vectors)
    with pytest.raises(knn.GraphInputError, match=r"2 ok rows have NaN or infinite values, e\.g\. "
                                                  r"\['mem://imgs/img-0007.png', 'mem://imgs/img-0090.png'\]"):
        graph_stage.run(GraphConfig(run=run, k=5, partitions=3, n_jobs=1))
    assert not (tmp_path / "graph" / "_manifest.json").exists()
    assert not list((tmp_path / "graph").glob("run-*/cell-*")), "the cells' scratch folder is removed"


def test_probing_and_refinement_find_neighbours_across_cells(write_embeddings, tmp_path: Path) -> None:
    # Six cells, each node built in its nearest one only: its neighbours across the boundary are lost, unless it
    # is also searched in its next two cells (as a visitor there: 2 visits per node). Refinement finds them
    # through the neighbours they share, so it needs an overlap (with one cell per node, no edge leaves a cell).
    rng = np.random.default_rng(0)
    vectors = normalise(np.repeat(rng.standard_normal((30, 32)), 60, axis=0) + rng.standard_normal((1_800, 32)))
    run = str(tmp_path)
    write_embeddings(run, vectors)
    exact, _ = exact_knn(vectors, 10)
    recall, sampled = {}, {}
    for overlap, probe, refine in ((1, 1, 0), (1, 3, 0), (2, 2, 0), (2, 2, 1)):
        manifest = graph_stage.run(GraphConfig(run=run, k=10, partitions=6, overlap=overlap, probe=probe,
                                               refine=refine, n_jobs=1))
        built = graph_stage.read_graph(io.join(run, "graph"))
        recall[overlap, probe, refine] = found = _recall(built.neighbours, exact)
        assert manifest["counts"]["visitors"] == 1_800 * (probe - overlap)
        assert manifest["counts"]["refine"] == refine
        assert manifest["recall"]["value"] == pytest.approx(found, abs=0.05), "sampled recall agrees"
        sampled[overlap, probe, refine] = manifest["recall"]["value"]
        np.testing.assert_allclose(built.similarities, np.einsum("nkd,nd->nk", vectors[built.neighbours], vectors),
                                   atol=1e-5)
    assert recall[1, 3, 0] >= recall[1, 1, 0] + 0.1 and recall[1, 3, 0] >= 0.9, recall
    # Built in two cells each (0.971 here), one round of refinement over 2k-long lists misses at most a fifth as
    # many neighbours (0.996; over k-long lists it missed a third as many, 0.990).
    assert 1 - recall[2, 2, 1] <= (1 - recall[2, 2, 0]) / 5 and recall[2, 2, 1] >= 0.99, recall
    assert manifest["counts"]["recall_before_refine"] == sampled[2, 2, 0], "the same cells, before the round"
