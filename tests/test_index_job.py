"""The index stage (`python -m jobs.index`) end to end on tiny published latents / embeddings stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gatrep import cli, io, represent, schemas
from gatrep.stages.index import load_searcher

DIM = 8
CATEGORIES = ("pants", "shirt", "shoes")


def tiny_images(seed: int = 0) -> dict[str, list]:
    """3 categories x 2 listings x 5 images around well separated category centres."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, DIM) * 4
    rows: dict[str, list] = {"image_id": [], "listing": [], "category": [], "vector": []}
    for c, category in enumerate(CATEGORIES):
        for listing in range(2):
            for image in range(5):
                rows["image_id"].append(f"{category}-{listing}-{image}")
                rows["listing"].append(f"{category}/l{listing}")
                rows["category"].append(category)
                rows["vector"].append(centres[c] + rng.normal(scale=0.5, size=DIM))
    return rows


def vector_column(vectors: list) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors, np.float32).reshape(-1)), DIM)


def publish_latents(run: str, rows: dict[str, list]) -> None:
    table = pa.table({
        schemas.NODE: np.arange(len(rows["image_id"]), dtype=np.int64),
        schemas.IMAGE_ID: rows["image_id"],
        schemas.LISTING: rows["listing"],
        schemas.CATEGORY: rows["category"],
        schemas.LATENT: vector_column(rows["vector"]),
    }, schema=schemas.latents(DIM))
    stage = io.join(run, "latents")
    io.publish(stage, "latents", [io.write_table(table, io.new_run_dir(stage))], config={}, rows=table.num_rows)


@pytest.fixture
def run(tmp_path) -> str:
    root = str(tmp_path / "run")
    publish_latents(root, tiny_images())
    return root


def read(run: str, table: str, stage: str = "index") -> pa.Table:
    return io.read_table(io.join(run, stage), "index", table)[0]


def brute_most_central(vectors: np.ndarray) -> int:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    return int(np.argmax(sims.sum(axis=1) - np.diag(sims)))


def test_given_categories_end_to_end(run, capsys):
    assert cli.run_job("index", ["--run", run, "--top-k", "3"]) == 0
    assert "30 images (0 skipped), 6 listings, 3 categories" in capsys.readouterr().out
    rows = tiny_images()
    listings = read(run, "listings").to_pylist()
    assert [r["listing"] for r in listings] == [f"{c}/l{i}" for c in CATEGORIES for i in range(2)]
    for r in listings:
        members = [i for i, name in enumerate(rows["listing"]) if name == r["listing"]]
        chosen = members[brute_most_central(np.asarray(rows["vector"])[members])]
        assert r["representative_image_id"] == rows["image_id"][chosen]
        assert r["central_image_ids"][0] == r["representative_image_id"] and len(r["central_image_ids"]) == 3
        assert r["category"] == r["listing"].split("/")[0]
    categories = read(run, "categories")
    assert categories.schema.equals(schemas.categories(DIM))
    assert categories["category"].to_pylist() == list(CATEGORIES) == categories["label"].to_pylist()
    assert categories["size"].to_pylist() == [10, 10, 10] and categories["listings"].to_pylist() == [2, 2, 2]
    # the two listings of a category are near each other, listings of different categories are not
    merges = read(run, "merge_suggestions").to_pylist()
    assert merges and all(m["category_a"] == m["category_b"] for m in merges)
    assert read(run, "listing_similarity").num_rows == 15  # all pairs of 6 listings


def test_kmeans_central_images_are_cluster_centres(run):
    assert cli.run_job("index", ["--run", run, "--central", "kmeans", "--top-m", "2"]) == 0
    rows = tiny_images()
    vectors = np.asarray(rows["vector"], np.float32)
    for category in read(run, "categories").to_pylist():
        members = [i for i, c in enumerate(rows["category"]) if c == category["category"]]
        centres = represent.cluster_centres(vectors[members], 2, seed=0)
        assert category["central_image_ids"] == [rows["image_id"][members[i]] for i in centres]
        np.testing.assert_allclose(category["central_vectors"], vectors[[members[i] for i in centres]], rtol=1e-6)


def test_query_identical_to_an_indexed_image_retrieves_it_first(run):
    assert cli.run_job("index", ["--run", run, "--method", "centroid"]) == 0
    searcher = load_searcher(io.join(run, "index"))
    rows = tiny_images()
    picks = [0, 13, 27]
    for scoring in ("single", "max", "knn"):
        results = searcher.search(np.asarray(rows["vector"], np.float32)[picks], k=3, scoring=scoring)
        assert results.category.tolist() == [rows["category"][i] for i in picks]
        assert results.match_ids[:, 0].tolist() == [rows["image_id"][i] for i in picks]
        np.testing.assert_allclose(results.match_scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("flags", [
    ["--categories", "kmeans", "--n-clusters", "3"],
    ["--categories", "threshold", "--category-threshold", "0.7"],
    ["--categories", "dbscan", "--dbscan-eps", "0.2"],
    ["--categories", "threshold", "--category-threshold", "0.7", "--method", "degree", "--degree-threshold", "0.5"],
])
def test_discovered_categories_follow_the_true_ones(run, flags):
    assert cli.run_job("index", ["--run", run, *flags]) == 0
    listings = read(run, "listings").to_pylist()
    truth = {r["listing"]: r["listing"].split("/")[0] for r in listings}
    found = {r["listing"]: r["category"] for r in listings}
    assert len(set(found.values())) == 3
    assert all((found[a] == found[b]) == (truth[a] == truth[b]) for a in found for b in found)
    categories = read(run, "categories").to_pylist()
    assert sorted(c["label"] for c in categories) == list(CATEGORIES)
    for c in categories:  # the representative listing belongs to its category
        assert found[c["representative_listing"]] == c["category"]
        assert c["representative"] == next(r["representative"] for r in listings
                                           if r["listing"] == c["representative_listing"])


def test_rerun_with_the_same_config_keeps_the_published_index(run, capsys):
    assert cli.run_job("index", ["--run", run]) == 0
    first = io.read_manifest(io.join(run, "index"), "index")
    assert cli.run_job("index", ["--run", run]) == 0
    assert "[already published: reused]" in capsys.readouterr().out
    assert io.read_manifest(io.join(run, "index"), "index")["tables"] == first["tables"]
    publish_latents(run, tiny_images())  # the same latents published again: a new source, so a new index
    assert cli.run_job("index", ["--run", run]) == 0
    assert io.read_manifest(io.join(run, "index"), "index")["tables"] != first["tables"]
    first = io.read_manifest(io.join(run, "index"), "index")
    assert cli.run_job("index", ["--run", run, "--top-k", "2"]) == 0
    assert io.read_manifest(io.join(run, "index"), "index")["tables"] != first["tables"]


def test_embeddings_baseline_skips_bad_rows(tmp_path, capsys):
    run = str(tmp_path / "run")
    rows = tiny_images()
    n = len(rows["image_id"])
    status = [schemas.OK] * n
    status[4] = schemas.TRUNCATED
    vectors = vector_column(rows["vector"])
    embedding = pa.array([v if s == schemas.OK else None for v, s in zip(vectors.to_pylist(), status, strict=True)],
                         schemas.vector_type(DIM))
    table = pa.table({
        schemas.IMAGE_ID: rows["image_id"], schemas.URI: [f"/x/{i}.jpg" for i in range(n)],
        schemas.LISTING: rows["listing"], schemas.CATEGORY: rows["category"],
        schemas.WIDTH: pa.array([8] * n, pa.int32()), schemas.HEIGHT: pa.array([8] * n, pa.int32()),
        schemas.STATUS: status, schemas.ERROR: [None] * n, schemas.EMBEDDING: embedding,
        schemas.FINGERPRINT: [None] * n,
    }, schema=schemas.embeddings(DIM))
    stage = io.join(run, "embeddings-hog")
    io.publish(stage, "embeddings", [io.write_table(table, io.new_run_dir(stage))], config={})
    flags = ["--run", run, "--source", "embeddings", "--input-stage", "embeddings-hog", "--stage", "index-hog"]
    assert cli.run_job("index", flags) == 0
    assert "29 images (1 skipped)" in capsys.readouterr().out
    assert read(run, "categories", "index-hog")["size"].to_pylist() == [9, 10, 10]


def test_listing_without_a_category_is_refused_with_advice(tmp_path, capsys):
    run = str(tmp_path / "run")
    rows = tiny_images()
    rows["category"][3] = None
    publish_latents(run, rows)
    assert cli.run_job("index", ["--run", run]) == 2
    err = capsys.readouterr().err
    assert "listing 'pants/l0' has no category" in err and "--categories threshold" in err
    assert cli.run_job("index", ["--run", run, "--categories", "kmeans", "--n-clusters", "3"]) == 0


def test_more_clusters_than_listings_is_a_user_error(run, capsys):
    assert cli.run_job("index", ["--run", run, "--categories", "kmeans", "--n-clusters", "7"]) == 2
    assert "--n-clusters 7 is more than the 6 listings" in capsys.readouterr().err


def test_missing_source_stage_is_a_clear_error(tmp_path, capsys):
    assert cli.run_job("index", ["--run", str(tmp_path)]) == 2
    assert "latents" in capsys.readouterr().err


def test_a_truncated_latents_file_is_a_one_line_error(run, capsys):
    part = next((Path(run) / "latents").glob("run-*/*.parquet"))
    part.write_bytes(part.read_bytes()[:50])
    assert cli.run_job("index", ["--run", run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a readable Parquet file" in err
