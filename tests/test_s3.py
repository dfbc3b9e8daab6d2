"""The whole pipeline end to end (embed, graph, train, indexes, queries, evaluation, report) with its inputs and run
root at s3:// URIs on a real S3 server (moto, on loopback: the `s3_bucket` fixture), and no credential in anything
it writes or prints."""

from __future__ import annotations

import json
import pathlib
import posixpath
import uuid

import pytest

from gatrep import cli, datasets, io, pipeline, schemas
from gatrep.config import PipelineConfig
from gatrep.errors import UserError

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("s3_bucket", "local_ray")]  # S3 settings before Ray starts

INDEXES = ("index", "index-raw")  # the GAT-AE index and the raw-feature baseline (--hog false)
METHODS = ("index/knn/context-aware", "index-raw/knn")  # two of the six: each query stage is a Ray Data job
# --style: index-raw/knn is also queried by style and by the adaptive score, and evaluated beside the others.
# Query expansion (on by default) re-ranks retrieval by content, and the method's name says so.
EVALUATED = ("index/knn/context-aware/expand-2^1", "index-raw/knn/expand-2^1", "index-raw/knn/style-retrieval",
             "index-raw/knn/adaptive-retrieval")


def write_inputs(tmp_path, s3_bucket, prefix):
    """60 digits (48 indexed, 12 queries) uploaded to `<prefix>/digits` and `<prefix>/queries`; the queries are
    a CSV manifest that also lists a truncated PNG and a file that does not exist. Returns (input URI, queries
    URI, tree)."""
    tree = datasets.write_digits(str(tmp_path / "digits"), size=16, limit=60, holdout=0.2,
                                 query_root=str(tmp_path / "queries"))
    assert tree.query is not None
    (tmp_path / "queries" / "digit-1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = ["uri,listing,category", *(f"{f},,{f.split('/')[0]}" for f in tree.query.files),
             "digit-0/missing.png,,digit-0", "digit-1/broken.png,,digit-1"]
    (tmp_path / "queries" / "queries.csv").write_text("\n".join(lines) + "\n")
    source = s3_bucket.upload(tmp_path / "digits", io.join(prefix, "digits"))
    queries = s3_bucket.upload(tmp_path / "queries", io.join(prefix, "queries"))
    return source, io.join(queries, "queries.csv"), tree


def test_pipeline_on_s3_publishes_every_stage_and_leaks_no_secret(tmp_path, s3_bucket, capfd):
    prefix = io.join(s3_bucket.uri, "pipeline")
    source, queries, tree = write_inputs(tmp_path, s3_bucket, prefix)
    run = io.join(prefix, "run")
    result = pipeline.run(PipelineConfig(input=source, queries=queries, run=run, backbone="tiny-random", k=4,
                                         epochs=2, hog=False, methods=METHODS, style=True))
    printed = capfd.readouterr()
    assert not [line for line in printed.err.splitlines() if line.startswith("warning:")]  # the report read all

    embeddings, manifest = io.read_table(io.join(run, "embeddings"), schemas.EMBEDDINGS)
    assert manifest["counts"] == {"ok": 48} and embeddings.num_rows == 48 and manifest["style_dim"] == 48
    assert sorted(embeddings["uri"].to_pylist()) == sorted(io.join(source, f) for f in tree.files)
    latents, _ = io.read_table(io.join(run, "latents"), schemas.LATENTS)
    assert latents.num_rows == 48
    for index in INDEXES:
        io.read_manifest(io.join(run, index), schemas.INDEX)
    query_rows, _ = io.read_table(io.join(run, "query-embeddings"), schemas.EMBEDDINGS)
    missing = [r for r in query_rows.to_pylist() if r["status"] == schemas.UNREADABLE]
    assert len(missing) == 1
    gone = io.join(prefix, "queries", "digit-0", "missing.png")
    assert missing[0]["error"].startswith(f"could not read {gone}: FileNotFoundError")  # permanent: read once
    results, manifest = io.read_table(io.join(run, "results-index-knn-context-aware"), schemas.RESULTS)
    assert results.num_rows == 14 and manifest["counts"] == {"ok": 12, "truncated": 1, "unreadable": 1}
    schemas.validate(results.schema, schemas.results(), "results")
    bad = [r for r in results.to_pylist() if r["status"] != schemas.OK]
    assert all(r["category"] is None and r["matches"] is None for r in bad)
    good = [r for r in results.to_pylist() if r["status"] == schemas.OK]
    assert all(0 < len(r["matches"]) <= 4 and len(r["category_scores"]) == 10 for r in good)
    assert all(r["matches"][0]["score"] >= r["matches"][-1]["score"] for r in good)
    evaluation_uri = io.join(run, "evaluation")
    manifest = io.read_manifest(evaluation_uri, schemas.EVALUATION)
    assert result["evaluation"]["files"] == manifest["files"]
    methods = json.loads(io.read_text_file(evaluation_uri, manifest, schemas.EVALUATION_FILE) or "")["methods"]
    assert [m["name"] for m in methods] == list(EVALUATED)
    assert all(m["judged"] == 12 and m["left_out"] == 2 for m in methods)
    best = max(methods, key=lambda m: m["categorization"]["accuracy"])
    assert result["headline"].startswith(f"most accurate on the held-out queries: {best['name']} (")
    assert result["headline"] in pipeline.summary(result)

    objects = s3_bucket.objects(run)
    assert any(uri.endswith("_manifest.json") for uri in objects)
    page = objects[io.join(run, "report", "index.html")].decode()
    assert "<img" in page  # thumbnails read back from S3
    looks = page.split('<section id="looks">')[1].split("</section>")[0]
    assert looks.count('class="card query"') == 8 and "<h4>index-raw/knn/adaptive-retrieval</h4>" in looks
    assert_no_secret(s3_bucket.secret, {**objects, **ray_logs(), "stdout": printed.out.encode(),
                                        "stderr": printed.err.encode()})


# A first run on a fresh run root: the job's error, not a FileNotFoundError from removing the empty stage folder.
@pytest.mark.parametrize("published", [True, False], ids=["rerun", "first-run"])
@pytest.mark.parametrize("where", ["pipeline/no-such-prefix", "s3://no-such-bucket/images"])
def test_missing_s3_input_is_a_one_line_error_without_secret(s3_bucket, write_embeddings, clustered, capfd, where,
                                                              published):
    source = where if where.startswith("s3://") else io.join(s3_bucket.uri, where)
    run = io.join(s3_bucket.uri, f"missing-input-{uuid.uuid4().hex[:8]}")
    if published:
        write_embeddings(run, clustered(2, 2))
    with pytest.raises(UserError) as raised:
        pipeline.run(PipelineConfig(input=source, run=run, backbone="tiny-random", hog=False))
    assert str(raised.value) == f"input {source!r} does not exist"
    assert cli.run_job("embed", ["--input", source, "--run", run, "--backbone", "tiny-random"]) == 2
    printed = capfd.readouterr()
    assert printed.err.strip().splitlines() == [f"error: input {source!r} does not exist"]
    assert_no_secret(s3_bucket.secret, {"error": str(raised.value).encode(), "stdout": printed.out.encode(),
                                        "stderr": printed.err.encode()})


def ray_logs():
    """{path: bytes} of every file in this Ray instance's log folder: its workers' output, raylet and GCS logs."""
    import ray

    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API gives the folder
    files = {str(p): p.read_bytes() for p in logs.rglob("*") if p.is_file()}
    assert any(name.startswith("worker-") for name in map(posixpath.basename, files)), f"no worker logs in {logs}"
    return files


def assert_no_secret(secret, texts):
    """Fail naming every text (object URI, stream) that holds `secret`; checks there was something to scan."""
    assert secret and texts and any(texts.values())
    leaks = [name for name, data in texts.items() if secret.encode() in data]
    assert not leaks, f"the secret access key appears in {leaks}"
