"""The query stage on a local 2-CPU Ray: raw query images finish (no CPU deadlock), stage folders are read as
stages or refused, and requests that can never be met fail at once."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gatrep import categorize, cli, io, schemas, stages

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def write_tree(root: Path, per_category: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        for i in range(per_category):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run root with a raw-feature index of 40 images (tiny-random backbone, with style vectors)."""
    root = tmp_path_factory.mktemp("q")
    images = write_tree(root / "images", 20, seed=0)
    run = str(root / "run")
    assert cli.run_job("embed", ["--input", str(images), "--run", run, "--backbone", "tiny-random",
                                 "--weights", "random", "--style", "true"]) == 0
    assert cli.run_job("index", ["--run", run, "--source", "embeddings", "--stage", "index-raw"]) == 0
    return run


@pytest.fixture
def deadline() -> Iterator[None]:
    """Turn a hang into a failure: SIGALRM after 240 s raises in the test."""
    def expire(*_: object) -> None:
        raise TimeoutError("the query job did not finish in 240 s: a resource deadlock?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_raw_query_images_are_embedded_then_queried_on_two_cpus(run: str, tmp_path: Path, deadline: None) -> None:
    queries = write_tree(tmp_path / "queries", 3, seed=1)
    (queries / "red" / "notes.png").write_text("not a picture")
    assert cli.run_job("query", ["--run", run, "--input", str(queries), "--index", "index-raw", "--k", "3"]) == 0
    table, manifest = io.read_table(io.join(run, "results"), schemas.RESULTS)
    assert table.num_rows == 7 and manifest["counts"] == {"not_an_image": 1, "ok": 6}
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert all(r["category"] == r["label"] for r in ok), "colour alone separates these"
    assert manifest["upstream"]["queries"]["stage"] == "results-embeddings"
    io.read_manifest(io.join(run, "results-embeddings"), schemas.EMBEDDINGS)  # published, reusable


def vectors_by_id(stage: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (content, style) of an embeddings stage's ok rows."""
    table, _ = io.read_table(stage, schemas.EMBEDDINGS)
    table = table.filter(pc.equal(table["status"], "ok"))
    return {i: (np.array(c, np.float32), np.array(s, np.float32)) for i, c, s in
            zip(table["image_id"].to_pylist(), table["embedding"].to_pylist(), table["style"].to_pylist(), strict=True)}


def test_retrieval_by_the_adaptive_score_or_by_style(run: str, deadline: None) -> None:
    query_stage = io.join(run, "embeddings")  # the indexed images themselves, with their style vectors
    argv = ["--run", run, "--index", "index-raw", "--k", "5", "--candidates", "8", "--input", query_stage]
    assert cli.run_job("query", [*argv, "--similarity", "adaptive", "--stage", "results-adaptive"]) == 0
    assert cli.run_job("query", [*argv, "--similarity", "style", "--stage", "results-style"]) == 0
    vectors = vectors_by_id(query_stage)
    for stage, similarity in (("results-adaptive", "adaptive"), ("results-style", "style")):
        table, manifest = io.read_table(io.join(run, stage), schemas.RESULTS)
        assert manifest["method"] == f"index-raw/knn/{similarity}-retrieval" and table.num_rows == 40
        for row in table.to_pylist():
            qc, qs = vectors[row["query_id"]]
            scores = [m["score"] for m in row["matches"]]
            assert len(scores) == 5 and scores == sorted(scores, reverse=True)
            for match in row["matches"]:
                c, s = vectors[match["image_id"]]
                expected = categorize.adaptive_score(qc @ c, qs @ s) if similarity == "adaptive" else qs @ s
                assert match["score"] == pytest.approx(float(expected), abs=1e-5)


def test_expanded_queries_weighted_vote_and_retrieval_over_the_whole_index(run: str, deadline: None) -> None:
    query_stage = io.join(run, "embeddings")
    argv = ["--run", run, "--index", "index-raw", "--k", "25", "--input", query_stage, "--stage", "results-all",
            "--scoring", "knn", "--vote-power", "2", "--expand", "3", "--expand-power", "2", "--scope", "all"]
    assert cli.run_job("query", argv) == 0
    table, manifest = io.read_table(io.join(run, "results-all"), schemas.RESULTS)
    assert manifest["method"] == "index-raw/knn^2/expand-3^2/all-retrieval"
    vectors = {i: c / np.linalg.norm(c) for i, (c, _) in vectors_by_id(query_stage).items()}
    embeddings, _ = io.read_table(query_stage, schemas.EMBEDDINGS)
    category_of = dict(zip(embeddings["image_id"].to_pylist(), embeddings["category"].to_pylist(), strict=True))
    ids = list(vectors)
    unit = np.stack([vectors[i] for i in ids])
    crossed = 0
    for row in table.to_pylist():
        q = vectors[row["query_id"]]
        sims = unit @ q
        top = np.argsort(-sims)[:3]
        expanded = q + (sims[top, None] ** 2 * unit[top]).sum(axis=0)  # the query expansion, by hand
        expanded /= np.linalg.norm(expanded)
        cosine = dict(zip(ids, (unit @ expanded).tolist(), strict=True))
        # The 25 best cosines of the expanded query over the whole index, each with its own image (near-ties
        # may swap places, so ranks are compared by score).
        assert [m["score"] for m in row["matches"]] == pytest.approx(sorted(cosine.values())[::-1][:25], abs=1e-5)
        assert all(m["score"] == pytest.approx(cosine[m["image_id"]], abs=1e-5) for m in row["matches"])
        crossed += any(category_of[m["image_id"]] != row["category"] for m in row["matches"])
    assert crossed == table.num_rows  # 25 matches, 20 images per category: every query's cross categories


def test_style_retrieval_needs_an_index_with_style_vectors(write_embeddings, clustered, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run = str(tmp_path / "run")
    stage = write_embeddings(run, clustered(5, 2), categories=["a"] * 5 + ["b"] * 5)
    assert cli.run_job("index", ["--run", run, "--source", "embeddings", "--stage", "index-raw"]) == 0
    capsys.readouterr()
    argv = ["--run", run, "--input", stage, "--index", "index-raw", "--similarity", "style"]
    assert cli.run_job("query", argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --similarity style: {run}/index-raw has no style vectors; embed the images with --style true and "
        "rebuild the stages after it")


def test_a_stage_folder_is_read_as_a_stage_or_refused(run: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "query-embeddings"
    (broken / "run-x").mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["a.png"]}), broken / "run-x" / "part-0.parquet")  # written, never published
    argv = ["--run", run, "--input", str(broken), "--index", "index-raw", "--stage", "results-broken"]
    assert cli.run_job("query", argv) == 2
    assert "no _manifest.json" in capsys.readouterr().err
    (broken / io.MANIFEST).write_text("{not json")
    assert cli.run_job("query", argv) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert not (Path(run) / "results-broken").exists()


def test_device_cuda_without_a_gpu_fails_at_once_on_a_local_instance(run: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    images = write_tree(tmp_path / "more", 1, seed=2)
    argv = ["--input", str(images), "--run", str(tmp_path / "r"), "--backbone", "tiny-random", "--device", "cuda"]
    assert cli.run_job("embed", argv) == 2
    assert "--device cuda: this local Ray instance has no GPU" in capsys.readouterr().err


@pytest.mark.parametrize(("cpus", "expected"), [
    (1, (0.4, 0.2)),     # 2 actors of 1 CPU and a 0.5 task do not fit: everything shrinks together
    (2, (0.8, 0.4)),
    (4, (1.0, 0.5)),     # room enough: unchanged
    (0, (1.0, 0.5)),     # an autoscaling cluster with no CPUs yet: ask for the real amount
])
def test_cpu_requests_fit_the_instance_that_exists(monkeypatch: pytest.MonkeyPatch, cpus: int,
                                                   expected: tuple[float, float]) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cpus)} if cpus else {})
    actor, task = stages.fit_cpus(2, 1.0, 0.5)
    assert (actor, task) == expected
    assert cpus == 0 or 2 * actor + task <= cpus


def test_query_follows_lineage_and_refuses_a_stale_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = write_tree(tmp_path / "images", 4, seed=3)
    run = str(tmp_path / "run")
    embed = ["--input", str(images), "--run", run, "--backbone", "tiny-random"]
    assert cli.run_job("embed", embed) == 0
    assert cli.run_job("index", ["--run", run, "--source", "embeddings", "--stage", "index-raw"]) == 0
    manifest = json.loads((Path(run) / "index-raw" / io.MANIFEST).read_text())
    assert manifest["upstream"]["source"]["stage"] == "embeddings"
    Image.new("RGB", (16, 16), (10, 200, 10)).save(images / "red" / "0.png")  # a changed image: new embeddings
    assert cli.run_job("embed", embed) == 0
    capsys.readouterr()
    query = ["--run", run, "--input", io.join(run, "embeddings"), "--index", "index-raw"]
    assert cli.run_job("query", query) == 2
    assert "rebuild the index stage" in capsys.readouterr().err


def test_missing_or_corrupt_stage_files_are_one_line_errors(run: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    queries = ["--run", str(copy), "--input", str(copy / "embeddings"), "--index", "index-raw"]
    catalog = next((copy / "index-raw").glob("run-*/ann/catalog.parquet"))
    catalog.rename(catalog.with_suffix(".bak"))
    assert cli.run_job("query", queries) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/ann/catalog.parquet; rebuild the index" in err
    catalog.with_suffix(".bak").rename(catalog)
    part = next((copy / "embeddings").glob("run-*/*.parquet"))
    part.write_bytes(part.read_bytes()[:100])  # truncated
    assert cli.run_job("query", queries) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is missing or not a readable Parquet file" in err


def test_a_second_job_on_a_stage_refuses_while_the_first_writes(run: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    images = write_tree(tmp_path / "images", 1, seed=4)
    with io.stage_lock(io.join(run, "embeddings")):
        code = cli.run_job("embed", ["--input", str(images), "--run", run, "--backbone", "tiny-random"])
    assert code == 2
    assert "is being written by another job (pid" in capsys.readouterr().err
