"""The nightly re-index and bulk categorization with the images, the uploads and the run root on a real S3 server
(moto, on loopback: the `s3_bucket` fixture), and no credential in anything they write or print."""

from __future__ import annotations

import pathlib

import pytest
from test_s3 import assert_no_secret, ray_logs

from gatrep import datasets, io, reindex, schemas, versions
from gatrep.config import CategorizeConfig, ReindexConfig
from gatrep.stages import categorize

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("s3_bucket", "local_ray")]  # S3 settings before Ray starts


def test_reindex_and_categorize_on_s3(tmp_path: pathlib.Path, s3_bucket, capfd) -> None:
    import s3fs

    prefix = io.join(s3_bucket.uri, "reindex")
    tree = datasets.write_digits(str(tmp_path / "digits"), size=16, limit=60)
    source = s3_bucket.upload(tmp_path / "digits", io.join(prefix, "digits"))
    run = io.join(prefix, "run")
    cfg = ReindexConfig(input=source, run=run, backbone="tiny-random", k=4, epochs=2, fine_tune_epochs=2)
    assert reindex.run(cfg)["version"] == "v0001"

    extra = datasets.write_digits(str(tmp_path / "extra"), size=16, limit=120)
    fs = s3fs.S3FileSystem()
    for name in [f for f in extra.files if f not in tree.files][:2]:
        fs.pipe_file(io.join(source, name), (tmp_path / "extra" / name).read_bytes())
    fs.rm_file(io.join(source, tree.files[0]))
    fs.invalidate_cache()
    second = reindex.run(cfg)
    assert (second["version"], second["graph"], second["model"]) == ("v0002", "updated", "fine-tuned")
    assert second["change"]["added"] == 2 and second["change"]["removed"] == 1
    assert versions.current(run)["version"] == "v0002" and versions.complete(run) == ["v0001", "v0002"]
    embeddings = io.read_manifest(io.join(versions.resolve(run), schemas.EMBEDDINGS), schemas.EMBEDDINGS)
    assert embeddings["read"] == 2  # unchanged objects (same size and ETag) were not read again

    uploads_dir = tmp_path / "uploads"
    datasets.write_digits(str(uploads_dir), size=16, limit=12)
    (uploads_dir / "digit-0" / "empty.png").write_bytes(b"")
    uploads = s3_bucket.upload(uploads_dir, io.join(prefix, "uploads", "2026-11-25"))
    manifest = categorize.run(CategorizeConfig(input=uploads, run=run))
    assert manifest["version"] == "v0002" and manifest["counts"] == {"empty": 1, "ok": 12}
    output = io.join(run, "categorized", "2026-11-25", schemas.CATEGORIZED)
    table, _ = io.read_table(output, schemas.CATEGORIZED)
    assert sorted(table[schemas.URI].to_pylist()) == sorted(fs.unstrip_protocol(p) for p in fs.find(uploads))

    printed = capfd.readouterr()
    assert_no_secret(s3_bucket.secret, {**s3_bucket.objects(prefix), **ray_logs(), "stdout": printed.out.encode(),
                                        "stderr": printed.err.encode()})
