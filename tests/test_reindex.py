"""The nightly re-index and bulk categorization on a small digits tree, with the images, the uploads and the run
root on a real S3 server (moto on loopback: the `s3_bucket` fixture): versions, the CURRENT pointer, what a re-index
reuses, the shrink guard, rollback, faults (a killed driver, killed Ray Data actors), and no credential in anything
they write or print."""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
import s3fs
from test_s3 import assert_no_secret, ray_logs

from gatrep import cli, datasets, io, reindex, schemas, versions
from gatrep.config import CategorizeConfig, EmbedConfig, ReindexConfig
from gatrep.stages import categorize, embed
from gatrep.stages.graph import read_graph
from gatrep.stages.index import load_searcher
from gatrep.stages.train import load_model_stage

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("s3_bucket", "local_ray")]  # S3 settings before Ray starts
REPO = Path(__file__).resolve().parents[1]
FLAGS = {"backbone": "tiny-random", "k": 4, "epochs": 2, "fine_tune_epochs": 2}


def config(tree: str, run: str, **changes: Any) -> ReindexConfig:
    return ReindexConfig(input=tree, run=run, **{**FLAGS, **changes})


def change_images(source: str, tree: datasets.Tree, extra: datasets.Tree) -> None:
    """Three images added to the uploaded tree, one removed."""
    fs = s3fs.S3FileSystem()
    for name in [f for f in extra.files if f not in tree.files][:3]:
        fs.pipe_file(io.join(source, name), Path(extra.root, name).read_bytes())
    fs.rm_file(io.join(source, tree.files[0]))
    fs.invalidate_cache()


def folders(uri: str) -> list[str]:
    """The names of the folders and files inside an s3:// prefix (not the prefix's own marker, not a lock)."""
    fs, path = io.url_to_fs(uri)
    fs.invalidate_cache()
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if p.rstrip("/") != path)
    return sorted(n for n in names if not n.startswith("_"))


@pytest.fixture(scope="module")
def built(s3_bucket, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run root on S3 re-indexed twice: v0001 from 120 digits, v0002 after three were added and one removed.
    Also a copy of the root as it was after v0001, and the root a reader resolved before v0002 was built."""
    base = tmp_path_factory.mktemp("reindex")
    prefix = io.join(s3_bucket.uri, "reindex")
    tree = datasets.write_digits(str(base / "images"), size=16, limit=120)
    extra = datasets.write_digits(str(base / "extra"), size=16, limit=240)
    source = s3_bucket.upload(tree.root, io.join(prefix, "images"))
    run, copy = io.join(prefix, "run"), io.join(prefix, "copy")
    first = reindex.run(config(source, run))
    s3fs.S3FileSystem().copy(io.url_to_fs(run)[1], io.url_to_fs(copy)[1], recursive=True)
    reader = versions.resolve(run)
    change_images(source, tree, extra)
    second = reindex.run(config(source, run))
    return {"tree": tree, "source": source, "run": run, "copy": copy, "reader": reader, "first": first,
            "second": second, "prefix": prefix}


def test_a_reindex_publishes_a_new_version_and_switches_the_pointer_last(built: dict[str, Any]) -> None:
    run, first, second = built["run"], built["first"], built["second"]
    assert (first["version"], first["graph"], first["model"]) == ("v0001", "rebuilt", "trained")
    assert (second["version"], second["graph"], second["model"]) == ("v0002", "updated", "fine-tuned")
    assert second["change"] == {"added": 3, "removed": 1, "changed": 0, "total": 4, "fraction": round(4 / 120, 6)}
    assert versions.current(run)["version"] == "v0002" and versions.complete(run) == ["v0001", "v0002"]
    root = versions.resolve(run)
    embeddings = io.read_manifest(io.join(root, schemas.EMBEDDINGS), schemas.EMBEDDINGS)
    assert (embeddings["rows"], embeddings["embedded"], embeddings["reused"]) == (122, 3, 119)
    assert embeddings["read"] == 3  # unchanged objects (same size and ETag) were not read again
    assert all(not f.startswith("..") for f in embeddings["files"])  # the version holds its own copy
    graph = read_graph(io.join(root, schemas.GRAPH))
    assert graph.manifest["counts"]["new_nodes"] == 3 and graph.manifest["recall"]["value"] == 1.0
    model = io.read_manifest(io.join(root, schemas.MODEL), schemas.MODEL)
    assert model["config"]["init_from"] == io.join(versions.root(run, "v0001"), schemas.MODEL)
    assert model["epochs"] == FLAGS["fine_tune_epochs"] and model["config"]["lr"] == ReindexConfig.fine_tune_lr
    assert "fine-tuned" in reindex.summary(second) and "3 added, 0 changed, 1 removed" in reindex.summary(second)


def test_no_change_publishes_nothing(built: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    result = reindex.run(config(built["source"], built["run"], device="cpu"))  # an operational flag only
    assert result == {"run": built["run"], "version": "v0002", "published": False}
    assert "nothing published" in reindex.summary(result)
    assert versions.current(built["run"])["version"] == "v0002"
    assert folders(io.join(built["run"], "versions")) == ["v0001", "v0002"]


def test_a_shrunken_input_is_refused_before_any_work(built: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    few = datasets.write_digits(str(tmp_path / "few"), size=16, limit=20)
    argv = ["--input", few.root, "--run", built["run"], "--backbone", "tiny-random", "--k", "4"]
    assert cli.run_job("reindex", argv) == 2
    error = capsys.readouterr().err
    assert f"{few.root} holds 20 files, 102 fewer than the 122 of version v0002 (84% > --max-shrink 20%)" in error
    assert "pass --allow-shrink" in error
    assert folders(io.join(built["run"], "versions")) == ["v0001", "v0002"]
    base = versions.record(built["run"], "v0002")
    reindex.check_shrink(config(few.root, built["run"], allow_shrink=True), 20, base)  # passes the guard
    reindex.check_shrink(config(few.root, built["run"], max_shrink=0.9), 20, base)


def test_rollback_points_back_and_forth(built: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    run = built["run"]
    assert cli.run_job("reindex", ["--run", run, "--rollback", "true"]) == 0
    assert "rolled back" in capsys.readouterr().out and versions.resolve(run) == versions.root(run, "v0001")
    assert cli.run_job("reindex", ["--run", run, "--rollback", "true"]) == 2
    assert "v0001 is the oldest complete version kept" in capsys.readouterr().err
    versions.switch(run, "v0002")


def test_categorize_uploads_against_an_older_version_with_a_killed_actor(built: dict[str, Any], tmp_path: Path,
                                                                        s3_bucket) -> None:
    uploads = datasets.write_digits(str(tmp_path / "uploads"), size=16, limit=30)
    (Path(uploads.root) / "digit-0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = s3_bucket.upload(uploads.root, io.join(built["prefix"], "uploads", "2026-11-25"))
    cfg = CategorizeConfig(input=source, run=built["run"], version="v0001", batch_size=8)
    manifest = categorize.run(cfg, fail_once=str(tmp_path / "killed"))
    assert (tmp_path / "killed").exists()  # an actor died mid-batch; Ray Data ran its batch again
    output = io.join(built["run"], "categorized", "2026-11-25")
    assert categorize.output_uri(cfg) == output
    table, _ = io.read_table(io.join(output, schemas.CATEGORIZED), schemas.CATEGORIZED)
    uris = table[schemas.URI].to_pylist()
    assert len(uris) == len(set(uris)) == 31  # exactly one row per upload
    assert manifest["version"] == "v0001" and manifest["counts"] == {"ok": 30, "truncated": 1}
    assert sum(manifest["categories"].values()) == 30
    assert manifest["needs_review"] == int(pc.sum(table[schemas.NEEDS_REVIEW]).as_py())
    broken = table.filter(pc.equal(table[schemas.STATUS], "truncated")).to_pylist()[0]
    assert broken[schemas.NEEDS_REVIEW] and broken[schemas.REVIEW_REASON] == "truncated"
    ok = table.filter(pc.equal(table[schemas.STATUS], schemas.OK))
    assert ok[schemas.CATEGORY].null_count == 0
    confidence = ok[schemas.CONFIDENCE].to_numpy()
    assert ((confidence >= 0) & (confidence <= 1)).all()
    low = confidence < cfg.min_confidence - 1e-6
    flagged = np.array([r is not None and "low_confidence" in r for r in ok[schemas.REVIEW_REASON].to_pylist()])
    np.testing.assert_array_equal(low, flagged)
    assert "need review" in categorize.summary(manifest)


def test_an_embedding_actor_killed_mid_batch_loses_and_repeats_no_row(built: dict[str, Any], tmp_path: Path) -> None:
    cfg = EmbedConfig(input=built["tree"].root, run=str(tmp_path / "run"), backbone="tiny-random", batch_size=16)
    manifest = embed.run(cfg, fail_once=str(tmp_path / "killed"))
    assert (tmp_path / "killed").exists()
    table, _ = io.read_table(io.join(cfg.run, schemas.EMBEDDINGS), schemas.EMBEDDINGS)
    uris = table[schemas.URI].to_pylist()
    assert len(uris) == len(set(uris)) == 120 and manifest["counts"] == {schemas.OK: 120}


def test_a_killed_reindex_leaves_the_old_version_current_and_a_rerun_finishes_it(built: dict[str, Any]) -> None:
    """SIGKILL the driver of a re-index once it has published embed and graph and is training: the pointer still
    names v0001 and queries work; the same command again reuses what was published and gives what the
    uninterrupted run gave."""
    import ray

    run, source = built["copy"], built["source"]
    # Written when the training stage has checked its checkpoints, just before Ray Train starts.
    training = io.join(versions.root(run, "v0002"), schemas.MODEL, "_checkpoints", "_lineage.json")
    fs, path = io.url_to_fs(training)
    argv = [f"--{k.replace('_', '-')}" if i == 0 else str(v) for k, v in FLAGS.items() for i in (0, 1)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.reindex", "--input", source, "--run", run, *argv],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(path) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            fs.invalidate_cache()
        assert fs.exists(path), "the re-index never reached training"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    published = {stage: io.read_manifest(io.join(versions.root(run, "v0002"), stage))["files"]
                 for stage in (schemas.EMBEDDINGS, schemas.GRAPH)}
    assert versions.current(run)["version"] == "v0001" and versions.complete(run) == ["v0001"]
    nodes, _ = embed.read_nodes(io.join(versions.resolve(run), schemas.EMBEDDINGS))
    searcher = load_searcher(io.join(versions.resolve(run), "index-raw"))
    answers = searcher.search(nodes.vectors[:5], k=3, scoring="knn")  # the old version still answers queries
    assert answers.ok.all() and set(answers.category) <= set(nodes.category)

    result = reindex.run(config(source, run))
    assert result["version"] == "v0002" and versions.current(run)["version"] == "v0002"
    resumed, uninterrupted = versions.root(run, "v0002"), versions.root(built["run"], "v0002")
    for stage, files in published.items():  # what the killed run had published was reused, not rebuilt
        assert io.read_manifest(io.join(resumed, stage))["files"] == files, stage
    assert read_graph(io.join(resumed, schemas.GRAPH)).neighbours.tolist() == \
        read_graph(io.join(uninterrupted, schemas.GRAPH)).neighbours.tolist()
    weights = [load_model_stage(io.join(root, schemas.MODEL))[0].state_dict() for root in (resumed, uninterrupted)]
    for name, value in weights[0].items():
        np.testing.assert_allclose(value.numpy(), weights[1][name].numpy(), atol=1e-5, err_msg=name)
    categories = [io.read_table(io.join(root, "index-raw"), schemas.INDEX, "categories")[0][schemas.CATEGORY]
                  for root in (resumed, uninterrupted)]
    assert categories[0].to_pylist() == categories[1].to_pylist()


def test_no_secret_in_anything_written_or_printed(built: dict[str, Any], s3_bucket, capfd) -> None:
    assert cli.run_job("reindex", ["--input", built["source"], "--run", built["run"], "--backbone", "tiny-random",
                                   "--k", "4", "--epochs", "2", "--fine-tune-epochs", "2"]) == 0
    printed = capfd.readouterr()
    assert "nothing published" in printed.out
    assert_no_secret(s3_bucket.secret, {**s3_bucket.objects(built["prefix"]), **ray_logs(),
                                        "stdout": printed.out.encode(), "stderr": printed.err.encode()})
