"""`jobs.train --objective grad-net` on a local Ray (2 CPUs) through index and query: GRAD-Net trained in the
stages' Ray Train loop, stored with its PCA and anchors, its diffused latents indexed, unseen queries by QFE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gatrep import cli, io, models, schemas
from gatrep.config import ConfigError, EmbedConfig, QueryConfig, TrainConfig, to_dict
from gatrep.models import diffusion, query_latents
from gatrep.models.diffusion import DiffusionConfig
from gatrep.stages import query, train
from gatrep.vectors import normalise

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

NAMES = ["boots", "coats", "hats"]
SMALL = ["--objective", "grad-net", "--anchors", "6", "--reduce", "8", "--sextets", "16", "--workers", "2",
         "--lr", "0.01", "--inference-batch-size", "25"]


def publish(root: Path, vectors: np.ndarray, categories: list[str], write_embeddings) -> str:
    """An embeddings stage of these vectors whose manifest holds a real EmbedConfig (the query stage reads it)."""
    stage = write_embeddings(str(root), vectors, categories=categories, publish=False)
    config = EmbedConfig(input=str(root), run=str(root), backbone="tiny-random", weights="random")
    io.publish(stage, schemas.EMBEDDINGS, io.list_parquet(stage), config=to_dict(config), rows=len(vectors))
    return stage


def labelled(clustered, per: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`per` images of each of the three categories (cluster-major): fixed cluster centres, noise drawn by `seed`."""
    x = clustered(per, 3, dim=16, seed=0)
    x = x + 0.15 * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    return x, [NAMES[i // per] for i in range(len(x))]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, clustered, write_embeddings) -> str:
    """3 categories x 20 images; graph, 3 epochs of GRAD-Net (a checkpoint every epoch), index of its latents."""
    root = tmp_path_factory.mktemp("gradnet")
    x, categories = labelled(clustered, 20, seed=1)
    publish(root, x, categories, write_embeddings)
    assert cli.run_job("graph", ["--run", str(root), "--k", "5"]) == 0
    assert cli.run_job("train", ["--run", str(root), "--epochs", "3", "--checkpoint-every-s", "0", *SMALL]) == 0
    assert cli.run_job("index", ["--run", str(root)]) == 0
    return str(root)


def _latents(run: str) -> np.ndarray:
    table, _ = io.read_table(io.join(run, "latents"), schemas.LATENTS)
    assert table[schemas.NODE].to_pylist() == list(range(table.num_rows))
    return np.array(table[schemas.LATENT].to_pylist(), dtype=np.float32)


def test_the_model_stage_rebuilds_the_diffused_latents(run: str) -> None:
    manifest = io.read_manifest(io.join(run, "model"), schemas.MODEL)
    assert manifest["objective"] == "grad-net" and manifest["epochs"] == 3
    saved = train.load_grad_net_stage(io.join(run, "model"))
    assert saved.config == DiffusionConfig(k=5, anchors=6, reduce=8, sextets=16, lr=0.01, epochs=3, qfe_rounds=2)
    assert saved.fitted.projection is not None and saved.fitted.projection.components.shape == (8, 16)
    assert saved.fitted.anchors.shape == (6, 8)
    metrics = [json.loads(line) for line in (Path(run) / "model" / next(
        f for f in manifest["files"] if f.endswith("metrics.jsonl"))).read_text().splitlines()]
    # 60 images, 2 workers x 16 sextets: 2 steps each, 64 sextets an epoch
    assert [(m["epoch"], m["batches_per_worker"], m["sextets"]) for m in metrics] == [(1, 2, 64), (2, 2, 64),
                                                                                     (3, 2, 64)]
    # The stored PCA, anchors and weights over the graph stage give the published latents: the model is complete.
    inputs = train.load_inputs(run)
    _, graph = diffusion.prepare(inputs.features, inputs.neighbours, inputs.similarities, saved.config, saved.fitted)
    latents = _latents(run)
    assert latents.shape == (60, 8 + 6 + 128)  # concat: H(0) = PCA (8) + codes (6), then one layer of 128
    np.testing.assert_allclose(latents, normalise(diffusion.diffuse(saved.net, graph).numpy()), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(latents, axis=1), 1.0, atol=1e-5)
    with pytest.raises(models.ModelLoadError, match="holds a GRAD-Net model"):
        train.load_model_stage(io.join(run, "model"))


def test_query_latents_are_the_qfe_of_the_indexed_images(run: str, tmp_path: Path, clustered,
                                                          write_embeddings) -> None:
    x, categories = labelled(clustered, 5, seed=2)
    queries = publish(tmp_path, x, categories, write_embeddings)
    assert cli.run_job("query", ["--run", run, "--input", queries, "--index", "index", "--scope", "all",
                                 "--expand", "0", "--k", "5"]) == 0
    table, manifest = io.read_table(io.join(run, "results"), schemas.RESULTS)
    assert manifest["method"] == "index/knn/qfe/all-retrieval"
    rows = sorted(table.to_pylist(), key=lambda r: int(r[schemas.QUERY_ID].split("-")[1]))
    accuracy = np.mean([r["category"] == r["label"] for r in rows])
    assert len(rows) == 15 and accuracy >= 0.8, accuracy  # chance: 1/3

    # QFE by hand, twice (k=10): raw cosines to the indexed embeddings, then latent cosines to the latents.
    raw, latents = normalise(train.load_inputs(run).features), _latents(run)

    def expand(q: np.ndarray, index: np.ndarray) -> np.ndarray:
        s = normalise(q) @ index.T
        top = np.argsort(-s, axis=1, kind="stable")[:, :10]
        weights = np.clip(np.take_along_axis(s, top, axis=1), 0, None)
        return normalise(np.einsum("qk,qkd->qd", weights, latents[top]))

    expected = expand(expand(x, raw), latents)
    scores = expected @ latents.T
    for b, row in enumerate(rows):
        ids = [int(m["image_id"].split("-")[1]) for m in row["matches"]]
        np.testing.assert_allclose([m["score"] for m in row["matches"]], scores[b, ids], atol=1e-5)
        np.testing.assert_allclose(sorted(scores[b], reverse=True)[:5], scores[b, ids], atol=1e-5)
    # jobs.evaluate judges whole-index retrieval like any other results: precision@5 is the share of each query's
    # 5 matches that carry its category.
    assert cli.run_job("evaluate", ["--run", run, "--k", "5"]) == 0
    evaluation = io.join(run, "evaluation")
    document = json.loads(io.read_text_file(evaluation, io.read_manifest(evaluation, schemas.EVALUATION),
                                            schemas.EVALUATION_FILE) or "")
    (method,) = document["methods"]
    category_of = train.load_inputs(run).category
    precision = np.mean([np.mean([category_of[int(m["image_id"].split("-")[1])] == row["label"]
                                  for m in row["matches"]]) for row in rows])
    assert method["categorization"]["accuracy"] == pytest.approx(accuracy)
    assert method["retrieval"]["precision"] == pytest.approx(precision) and precision > 0.5
    # The query stage's encoder, over what it reads (raw embeddings, latents) and the stored QFE settings, gives
    # exactly that latent.
    cfg = QueryConfig(run=run, input=queries, index="index")
    sources = query.resolve(cfg)
    assert sources.objective == "grad-net" and sources.latents == io.join(run, "latents")
    qfe = train.load_grad_net_stage(io.join(run, "model")).config
    encoder = query_latents.ExpansionEncoder(*query.expansion_arrays(sources), qfe.qfe_k, qfe.qfe_rounds)
    np.testing.assert_allclose(encoder.encode(x), expected, atol=1e-5)
    with pytest.raises(io.StageError, match="query feature expansion"):
        query.resolve(QueryConfig(run=run, input=queries, index="index", query_latent="context-free"))


def test_a_rerun_resumes_and_other_anchors_are_refused(run: str) -> None:
    kept = sorted((Path(train.checkpoint_storage(run)) / train.RUN_NAME).glob("checkpoint_epoch_*"))
    assert [p.name for p in kept] == ["checkpoint_epoch_000002", "checkpoint_epoch_000003"]
    published = train.load_grad_net_stage(io.join(run, "model")).fitted
    checkpointed = diffusion.load_grad_net(str(kept[-1])).fitted
    assert published.projection is not None and checkpointed.projection is not None
    assert np.array_equal(published.anchors, checkpointed.anchors)
    assert np.array_equal(published.projection.components, checkpointed.projection.components)
    storage, inputs = train.checkpoint_storage(run), train.load_inputs(run)

    def check(*argv: str) -> int:
        cfg = cli.parse(TrainConfig, ["--run", run, "--epochs", "5", *SMALL, *argv], "")
        return train.check_checkpoints(storage, cfg.diffusion_config(5), cfg.resume, train.lineage(cfg, inputs))

    assert check() == 3  # more epochs: training resumes from the last checkpoint
    with pytest.raises(train.CheckpointMismatch, match="anchors: checkpoint 6, asked 7"):
        check("--anchors", "7")
    assert check("--sextets", "8") == 0  # another training setting: the checkpoints are removed, training starts over


def test_grad_net_flags_are_validated() -> None:
    assert TrainConfig(run="r", objective="grad-net").diffusion_config(15) == DiffusionConfig(qfe_rounds=2, epochs=200)
    for values, message in (({"anchors": 3}, "anchor_neighbours <= anchors"),
                            ({"diffusion_output": "first"}, "diffusion_output must be one of concat, last"),
                            ({"init_from": "runs/old/model"}, "grad-net trains from scratch"),
                            ({"reduce": -1}, "reduce >= 0"), ({"sextets": 0}, "sextets must be positive")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(run="r", objective="grad-net", **values)
    TrainConfig(run="r", anchors=3)  # grad-net flags are not checked for the other objectives
    with pytest.raises(ValueError, match="objective must be one of autoencoder, class-nodes, grad-net"):
        TrainConfig(run="r", objective="diffusion")


def test_more_anchors_than_images_is_refused_before_training(tmp_path: Path, clustered, write_embeddings,
                                                             capsys: pytest.CaptureFixture) -> None:
    write_embeddings(str(tmp_path), clustered(2, 2))
    assert cli.run_job("graph", ["--run", str(tmp_path), "--k", "2"]) == 0
    assert cli.run_job("train", ["--run", str(tmp_path), *SMALL]) == 2
    assert "6 anchors need at least as many images" in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "latents").exists()
