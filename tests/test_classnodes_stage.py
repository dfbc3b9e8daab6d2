"""`jobs.train --objective class-nodes` on a local Ray (2 CPUs) through index and query: category nodes trained
in the stages' Ray Train loop, stored with the model, used as the index's category representatives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import ray.train
import torch

from gatrep import cli, io, represent, schemas
from gatrep.config import EmbedConfig, ModelConfig, QueryConfig, TrainConfig, to_dict
from gatrep.models import build_model, classnodes
from gatrep.stages import query, train
from gatrep.stages.index import load_searcher

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

NAMES = ["boots", "coats", "hats"]
SMALL = ["--objective", "class-nodes", "--hidden", "8", "--heads", "2", "--latent-dim", "8", "--decoder-hidden", "16",
         "--batch-size", "32", "--lr", "0.02", "--workers", "2", "--inference-batch-size", "50", "--temperature",
         "0.2"]


def publish(root: Path, vectors: np.ndarray, categories: list[str | None], write_embeddings) -> str:
    """An embeddings stage of these vectors whose manifest holds a real EmbedConfig (the query stage reads it)."""
    stage = write_embeddings(str(root), vectors, categories=categories, publish=False)
    config = EmbedConfig(input=str(root), run=str(root), backbone="tiny-random", weights="random")
    io.publish(stage, schemas.EMBEDDINGS, io.list_parquet(stage), config=to_dict(config), rows=len(vectors))
    return stage


def labelled(clustered, per: int, seed: int) -> tuple[np.ndarray, list[str | None]]:
    """`per` images of each of the three categories (cluster-major): fixed cluster centres, noise drawn by `seed`."""
    x = clustered(per, 3, dim=16, seed=0)
    rng = np.random.default_rng(seed)
    x = x + 0.15 * rng.standard_normal(x.shape).astype(np.float32)
    return x, [NAMES[i // per] for i in range(len(x))]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, clustered, write_embeddings) -> str:
    """3 categories x 20 images and 6 images without a category; graph, 3 epochs of class nodes, index."""
    root = tmp_path_factory.mktemp("classnodes")
    x, categories = labelled(clustered, 20, seed=1)
    unlabelled = clustered(2, 3, dim=16, seed=0) + 0.2
    publish(root, np.concatenate([x, unlabelled]), categories + [None] * 6, write_embeddings)
    assert cli.run_job("graph", ["--run", str(root), "--k", "5"]) == 0
    assert cli.run_job("train", ["--run", str(root), "--epochs", "3", *SMALL]) == 0
    assert cli.run_job("index", ["--run", str(root)]) == 0
    return str(root)


def test_model_stage_stores_the_category_nodes_and_the_index_uses_them(run: str) -> None:
    manifest = io.read_manifest(io.join(run, "model"), "model")
    assert manifest["objective"] == "class-nodes" and manifest["category_nodes"] == 3
    assert manifest["image_edges"] is False and manifest["config"]["knn_edges"] is False
    nodes = train.load_category_nodes(io.join(run, "model"))
    assert nodes is not None and list(nodes.names) == NAMES and nodes.embeddings is not None
    assert nodes.embeddings.shape == (3, 8) and nodes.features.shape == (3, 16)
    metrics = [json.loads(line) for line in (Path(run) / "model" / next(
        f for f in manifest["files"] if f.endswith("metrics.jsonl"))).read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and all(m["seeds"] == 66 for m in metrics)
    assert metrics[-1]["contrastive"] < metrics[0]["contrastive"]
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["contrastive"] + 0.1 * metrics[0]["reconstruction"],
                                               rel=1e-4)

    latents, _ = io.read_table(io.join(run, "latents"), "latents")
    assert latents.num_rows == 66 and latents[schemas.CATEGORY].null_count == 6
    index_manifest = io.read_manifest(io.join(run, "index"), "index")
    assert index_manifest["category_representatives"] == "class-nodes" and index_manifest["skipped"] == 6
    searcher = load_searcher(io.join(run, "index"))
    assert list(searcher.names) == NAMES
    np.testing.assert_array_equal(searcher.representatives, nodes.embeddings)


def test_the_checkpoint_holds_the_category_nodes(run: str) -> None:
    kept = sorted((Path(train.checkpoint_storage(run)) / train.RUN_NAME).glob("checkpoint_epoch_*"))
    assert [p.name for p in kept] == ["checkpoint_epoch_000003"]  # the last epoch's (60 s between checkpoints)
    nodes = classnodes.load_category_nodes(str(kept[0]))
    assert list(nodes.names) == NAMES and nodes.features.shape == (3, 16) and nodes.embeddings is None
    published = train.load_category_nodes(io.join(run, "model"))
    assert published is not None and np.array_equal(published.features, nodes.features)


def test_query_categorizes_by_the_class_nodes_and_by_a_vote_in_their_latent_space(
        run: str, tmp_path: Path, clustered, write_embeddings) -> None:
    x, categories = labelled(clustered, 5, seed=2)
    queries = publish(tmp_path, x, categories, write_embeddings)
    assert cli.run_job("query", ["--run", run, "--input", queries, "--index", "index", "--scoring", "single",
                                 "--k", "3"]) == 0
    table, _ = io.read_table(io.join(run, "results"), schemas.RESULTS)
    single = np.mean([r["category"] == r["label"] for r in table.to_pylist()])
    # The knn scoring through the query stage's own mapper (what its actors run), without a second Ray Data job.
    cfg = QueryConfig(run=run, input=queries, index="index", scoring="knn", k=3)
    sources = query.resolve(cfg)
    assert sources.image_edges is False
    batch, _ = io.read_table(queries, schemas.EMBEDDINGS)
    found = ray.get(_map.remote(sources, cfg, [ray.put(query.graph_arrays(sources))], batch))
    knn = np.mean([r["category"] == r["label"] for r in found.to_pylist()])
    assert table.num_rows == 15 and single >= 0.8 and knn >= 0.8, (single, knn)  # chance: 1/3


def test_a_rerun_resumes_the_checkpoint_unless_a_class_node_setting_changed(run: str,
                                                                            capsys: pytest.CaptureFixture) -> None:
    # The second check removes the run's checkpoints: this test comes after those that read them.
    for argv, resumed_from in (([], 3), (["--reconstruction-weight", "1"], 0)):
        cfg = cli.parse(TrainConfig, ["--run", run, "--epochs", "5", *SMALL, *argv], "")
        storage = train.checkpoint_storage(cfg.run)
        lineage = train.lineage(cfg, train.load_inputs(cfg.run))
        assert train.check_checkpoints(storage, cfg.model_config(16), cfg.resume, lineage) == resumed_from
    assert "trained on other inputs or settings; training starts over" in capsys.readouterr().out


@ray.remote(num_cpus=1)
def _map(sources: query.IndexSources, cfg: QueryConfig, graph: list[ray.ObjectRef], batch: pa.Table) -> pa.Table:
    """The query stage's mapper on one batch, in a Ray worker as in the stage's actor pool."""
    return query.QueryMapper(sources, cfg, graph[0])(batch)


def test_no_categories_or_only_one_is_refused_before_anything_runs(tmp_path: Path, clustered, write_embeddings,
                                                                  capsys: pytest.CaptureFixture) -> None:
    x = clustered(4, 2)
    for root, categories in ((tmp_path / "none", [None] * 8), (tmp_path / "one", ["hats"] * 4 + [None] * 4)):
        publish(root, x, categories, write_embeddings)
        assert cli.run_job("graph", ["--run", str(root), "--k", "2"]) == 0
        assert cli.run_job("train", ["--run", str(root), *SMALL]) == 2
        err = capsys.readouterr().err
        assert ("needs categories, but no image" in err if categories[0] is None
                else "at least two categories" in err), err
        assert not (root / "model").exists() and not (root / "latents").exists()


def test_a_checkpoint_restores_the_category_features_and_the_optimizer(tmp_path: Path) -> None:
    model_cfg = ModelConfig(in_dim=4, hidden=4, heads=1, latent_dim=4, decoder_hidden=(4,))
    x = torch.randn(6, 4)
    graph = classnodes.build_class_graph(np.full((6, 2), -1), ["a", "b", "a", "b", None, "a"])
    torch.manual_seed(0)
    autoencoder = build_model(model_cfg)
    model = classnodes.ClassNodeModel(autoencoder, classnodes.mean_features(autoencoder, x, graph))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.class_features.sum().backward()
    optimizer.step()  # features moved from their initial mean, Adam has state
    train._save_checkpoint(str(tmp_path), model, model_cfg, graph, optimizer, 7, [{"epoch": 7, "loss": 1.0}])
    fresh = classnodes.ClassNodeModel(build_model(model_cfg), torch.zeros(2, 4))
    epoch, history, state = train._restore(ray.train.Checkpoint.from_directory(str(tmp_path)), fresh, model_cfg)
    assert epoch == 7 and history == [{"epoch": 7, "loss": 1.0}] and state is not None
    assert torch.equal(fresh.class_features, model.class_features)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    position = [p is model.class_features for p in model.parameters()].index(True)
    assert list(state["state"]) == [position] and state["state"][position]["step"] == 1  # the only one with a grad


def test_class_node_flags_are_validated() -> None:
    with pytest.raises(ValueError, match="objective must be one of autoencoder, class-nodes"):
        TrainConfig(run="r", objective="classes")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TrainConfig(run="r", objective="class-nodes", temperature=0)
    assert TrainConfig(run="r").image_edges and not TrainConfig(run="r", objective="class-nodes").image_edges


def test_the_representative_image_of_a_learned_embedding_is_its_nearest_member() -> None:
    vectors = np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], dtype=np.float32)
    groups = np.array(["b", "a", "a", "b"], dtype=object)
    rows = represent.nearest_members(vectors, groups, np.array([[0.1, 1], [-1, 0.2]], dtype=np.float32))
    assert rows.tolist() == [2, 3]  # a: rows 1, 2 (row 2 nearer [0.1, 1]); b: rows 0, 3
    with pytest.raises(ValueError, match="2 groups of 2-d vectors"):
        represent.nearest_members(vectors, groups, np.ones((3, 2), dtype=np.float32))
