"""The index stage's per-category work in Ray tasks: batched groups, the same results as in process, nothing of it in
the driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gatrep import categorize, io, represent, schemas, vectors
from gatrep.config import IndexConfig
from gatrep.stages import index

DIM, STYLE_DIM = 8, 4
SIZES = {"bags": 9, "pants": 30, "shirt": 12, "shoes": 1, "socks": 5}  # sorted: the categories' order


def test_small_categories_are_batched_and_a_large_one_is_a_task_of_its_own():
    plan = index.plan_groups(np.array([5, 30_000, 5, 5, 19_990, 5, 7]), group_rows=20_000)
    assert [p.tolist() for p in plan] == [[0], [1], [2, 3, 4], [5, 6]]
    tiny = index.plan_groups(np.full(10_000, 10), group_rows=20_000)  # 10,000 categories of 10 images
    assert len(tiny) == 5 and np.array_equal(np.concatenate(tiny), np.arange(10_000))


def publish(run: str) -> dict[str, np.ndarray]:
    """<run>/embeddings: SIZES images per category in two listings each, with style vectors."""
    rng = np.random.default_rng(3)
    names = np.repeat(list(SIZES), list(SIZES.values())).astype(object)
    centres = {name: rng.normal(size=DIM) * 3 for name in SIZES}
    x = np.stack([centres[c] for c in names]) + rng.normal(size=(names.size, DIM))
    style = rng.normal(size=(names.size, STYLE_DIM))
    n = names.size
    rows = {"image_id": np.array([f"i{i:03d}" for i in range(n)], dtype=object), "category": names,
            "vector": x.astype(np.float32)}
    table = pa.table({
        schemas.IMAGE_ID: rows["image_id"].tolist(), schemas.URI: [f"/x/{i}.png" for i in range(n)],
        schemas.LISTING: [f"{c}/l{i % 2}" for i, c in enumerate(names)], schemas.CATEGORY: names.tolist(),
        schemas.WIDTH: pa.array([8] * n, pa.int32()), schemas.HEIGHT: pa.array([8] * n, pa.int32()),
        schemas.STATUS: [schemas.OK] * n, schemas.ERROR: [None] * n,
        schemas.EMBEDDING: vectors.to_arrow(rows["vector"]), schemas.FINGERPRINT: [None] * n,
        schemas.STYLE: vectors.to_arrow(style.astype(np.float32)),
    }, schema=schemas.embeddings(DIM, style_dim=STYLE_DIM))
    stage = io.join(run, schemas.EMBEDDINGS)
    io.publish(stage, schemas.EMBEDDINGS, [io.write_table(table, io.new_run_dir(stage))], config={}, rows=n)
    return rows


def read(run: str, stage: str, table: str) -> pa.Table:
    out = io.read_table(io.join(run, stage), "index", table)[0]
    return out.drop([schemas.ANN_SHA256]) if table.endswith("catalog") else out


def refuse(*_, **__):
    raise AssertionError("per-category work ran in the driver")


def driver_reads_no_vector(patch: pytest.MonkeyPatch) -> None:
    """Make the driver fail on any read of a vector column: the tasks, in Ray workers, read their own images."""
    read_table = io.read_table

    def read_without_vectors(*args, columns=None, **kwargs):
        assert columns is not None and not {schemas.EMBEDDING, schemas.LATENT, schemas.STYLE} & set(columns), columns
        return read_table(*args, columns=columns, **kwargs)

    patch.setattr(io, "read_table", read_without_vectors)
    patch.setattr(io, "take_rows", refuse)


def assert_same_tables(run: str, local: dict, tasks: dict) -> None:
    """The two index stages index-local and index-tasks (their manifests: `local`, `tasks`) publish equal tables."""
    assert sorted(local["tables"]) == sorted(tasks["tables"]) and len(local["files"]) == len(tasks["files"])
    for table in local["tables"]:
        assert read(run, "index-tasks", table).equals(read(run, "index-local", table)), table


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_tasks_publish_what_the_driver_computes_in_process_and_the_driver_builds_no_index(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    rows = publish(run)
    monkeypatch.setattr(index, "GROUP_ROWS", 10)  # groups [bags], [pants], [shirt], [shoes, socks]

    def cfg(stage: str) -> IndexConfig:
        return IndexConfig(run=run, source=schemas.EMBEDDINGS, stage=stage, top_m=3)

    local = index.run(cfg("index-local"), tasks=False)
    # The whole source at once, as the stage computed it before its per-category work was split into groups.
    reps = represent.represent_groups(rows["vector"], rows["category"], "most_central", 1)
    central = represent.central_images(rows["vector"], rows["category"], 3)
    whole = categorize.CategoryIndex.build(rows["vector"], rows["image_id"], rows["category"], rows["category"])
    monkeypatch.setattr(categorize.CategoryIndex, "build", classmethod(refuse))
    for name in ("central_images", "nearest_members"):
        monkeypatch.setattr(represent, name, refuse)
    monkeypatch.setattr(categorize, "_build_ann", refuse)
    with monkeypatch.context() as patch:
        patch.setattr(represent, "represent_groups", refuse)  # listing representatives too
        driver_reads_no_vector(patch)
        tasks = index.run(cfg("index-tasks"), tasks=True)
    assert (local["category_groups"], local["category_tasks"]) == (4, False)
    assert (tasks["category_groups"], tasks["category_tasks"]) == (4, True) and tasks["style_dim"] == STYLE_DIM
    assert len(tasks["tables"]["ann_vectors"]) == len(tasks["tables"]["style_ann_vectors"]) == 4  # one per group
    assert_same_tables(run, local, tasks)
    categories = read(run, "index-tasks", "categories")
    assert categories["category"].to_pylist() == list(SIZES) and categories["size"].to_pylist() == list(SIZES.values())
    np.testing.assert_array_equal(vectors.from_arrow(categories["representative"]), reps.vectors)
    assert categories["central_image_ids"].to_pylist() == [rows["image_id"][c].tolist() for c in central]
    ann = read(run, "index-tasks", "ann_vectors")
    assert ann["image_id"].to_pylist() == np.concatenate([whole.parts[c].ids for c in SIZES]).tolist()
    np.testing.assert_array_equal(vectors.from_arrow(ann["vector"]),
                                  np.concatenate([whole.parts[c].vectors for c in SIZES]))


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_discovered_categories_in_tasks_publish_what_the_driver_computes_in_process(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    publish(run)
    monkeypatch.setattr(index, "GROUP_ROWS", 10)

    def cfg(stage: str) -> IndexConfig:
        return IndexConfig(run=run, source=schemas.EMBEDDINGS, stage=stage, categories="kmeans", n_clusters=4)

    local = index.run(cfg("index-local"), tasks=False)
    with monkeypatch.context() as patch:
        driver_reads_no_vector(patch)
        tasks = index.run(cfg("index-tasks"), tasks=True)
    assert tasks["category_tasks"] and tasks["categories"] == 4 and tasks["listings"] == 9  # shoes: one image
    assert_same_tables(run, local, tasks)
