"""The whole pipeline end to end on a few hundred generated images with a local Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gatrep import cli, io, schemas

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

CATEGORIES = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_tree(root, per_category, seed):
    """Noisy images around one colour per category, in two listings each."""
    rng = np.random.default_rng(seed)
    for name, colour in CATEGORIES.items():
        for i in range(per_category):
            path = root / name / f"listing-{i % 2}" / f"{seed}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)


def test_pipeline_indexes_queries_and_evaluates(tmp_path, capsys):
    write_tree(tmp_path / "index", 70, seed=0)
    write_tree(tmp_path / "queries", 10, seed=1)
    (tmp_path / "queries" / "red" / "listing-0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    run = tmp_path / "run"
    code = cli.run_job("pipeline", ["--input", str(tmp_path / "index"), "--queries", str(tmp_path / "queries"),
                                     "--run", str(run), "--backbone", "tiny-random", "--k", "5", "--epochs", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    kinds = {"embeddings": "embeddings", "graph": "graph", "model": "model", "latents": "latents", "index": "index",
             "index-raw": "index", "index-hog": "index", "query-embeddings": "embeddings", "evaluation": "evaluation"}
    for directory, kind in kinds.items():
        io.read_manifest(str(run / directory), kind)  # published, and of the right kind

    latents, _ = io.read_table(str(run / "latents"), "latents")
    assert latents.num_rows == 210 and schemas.vector_dim(latents.schema, "latent") == 256

    results, manifest = io.read_table(str(run / "results-index-single-category-aware"), "results")
    schemas.validate(results.schema, schemas.results(), "results")
    assert results.num_rows == 31 and manifest["counts"] == {"ok": 30, "truncated": 1}  # a PNG header and junk
    bad = results.filter(np.array(results["status"].to_pylist()) != "ok").to_pylist()[0]
    assert bad["uri"].endswith("broken.png") and bad["category"] is None and bad["matches"] is None
    good = [r for r in results.to_pylist() if r["status"] == "ok"]
    assert all(len(r["matches"]) == 5 and len(r["category_scores"]) == 3 for r in good)
    assert all(r["matches"][0]["score"] >= r["matches"][-1]["score"] for r in good)

    evaluation = json.loads((next((run / "evaluation").glob("run-*")) / "evaluation.json").read_text())
    names = [m["name"] for m in evaluation["methods"]]
    assert names == ["index/single/category-aware", "index/single/context-aware", "index/knn/context-aware",
                     "index-raw/single", "index-raw/max", "index-raw/knn", "index-hog/single"]
    by_name = {m["name"]: m for m in evaluation["methods"]}
    # Colour is all there is to these images: raw features of even a random backbone separate them.
    assert by_name["index-raw/single"]["categorization"]["accuracy"] >= 0.9
    assert all(m["judged"] == 30 and m["left_out"] == 1 for m in evaluation["methods"])
    assert "Categorization accuracy" in out and "pipeline finished" in out
