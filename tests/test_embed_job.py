"""The embedding job end to end on a local Ray: rows, statuses, schema, manifest, reruns, crashes."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gatrep import cli, images, io, schemas
from gatrep.config import EmbedConfig
from gatrep.stages import embed

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

BAD = {  # file name -> expected status
    "cats/l1/empty.jpg": schemas.EMPTY,
    "cats/l1/notes.jpg": schemas.NOT_AN_IMAGE,
    "cats/l2/cut.jpg": schemas.TRUNCATED,
    "dogs/drawing.svg": schemas.UNSUPPORTED_FORMAT,
    "dogs/huge.png": schemas.TOO_LARGE,
}


def save(root, rel, image, fmt):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


@pytest.fixture
def tree(tmp_path):
    """36 good images in two categories (listings and none), plus one file of each bad kind."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(36):
        rel = f"cats/l{i % 2 + 1}/{i}.jpg" if i < 20 else f"dogs/{i}.png"
        save(root, rel, Image.fromarray(rng.integers(0, 255, (48, 40 + i, 3), np.uint8)),
             "JPEG" if i < 20 else "PNG")
    (root / "cats/l1/empty.jpg").write_bytes(b"")
    (root / "cats/l1/notes.jpg").write_text("not a picture")
    cut = (root / "cats/l1/0.jpg").read_bytes()
    (root / "cats/l2/cut.jpg").write_bytes(cut[: len(cut) // 2])
    (root / "dogs/drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    save(root, "dogs/huge.png", Image.new("L", (5000, 5000)), "PNG")
    return root


def config(tree, out, **overrides) -> EmbedConfig:
    values = dict(input=str(tree), run=str(out), backbone="tiny-random", batch_size=8, decode_batch_size=8,
                  max_pixels=20_000_000)
    return EmbedConfig(**{**values, **overrides})


def read(out):
    table, manifest = io.read_table(io.join(str(out), "embeddings"), "embeddings")
    return table.sort_by("uri"), manifest


def test_every_file_gets_one_row_and_a_rerun_reuses_them(tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.run_job("embed", ["--input", str(tree), "--run", str(out), "--backbone", "tiny-random",
                           "--batch-size", "8", "--decode-batch-size", "8", "--max-pixels", "20000000"]) == 0
    printed = capsys.readouterr().out
    assert "embeddings: 41 rows, 36 ok, 41 newly read, 0 reused" in printed
    assert "  too_large: 1" in printed and "  truncated: 1" in printed

    table, manifest = read(out)
    schemas.validate(table.schema, schemas.embeddings(32), "embeddings")
    assert table.num_rows == 41 and manifest["rows"] == 41
    by_name = {u.removeprefix(str(tree) + "/"): r for u, r in zip(table["uri"].to_pylist(), table.to_pylist(),
                                                                   strict=True)}
    for name, status in BAD.items():
        assert by_name[name]["status"] == status, name
        assert by_name[name]["error"] and by_name[name]["embedding"] is None
    good = [r for n, r in by_name.items() if n not in BAD]
    assert {r["status"] for r in good} == {schemas.OK} and all(r["error"] is None for r in good)
    assert all(np.isclose(np.linalg.norm(r["embedding"]), 1.0, atol=1e-5) for r in good)
    assert by_name["cats/l2/3.jpg"]["listing"] == "cats/l2" and by_name["dogs/25.png"]["listing"] == "dogs"
    assert by_name["dogs/25.png"]["width"] == 65 and by_name["dogs/25.png"]["height"] == 48
    assert by_name["dogs/25.png"]["image_id"] == images.content_id((tree / "dogs/25.png").read_bytes())
    assert manifest["counts"] == {"empty": 1, "not_an_image": 1, "ok": 36, "too_large": 1, "truncated": 1,
                                  "unsupported_format": 1}
    assert manifest["config"]["backbone"] == "tiny-random" and manifest["dim"] == 32

    # Rerun: only the file refused under a limit is read again (the others' size and modification time are
    # unchanged); nothing changed, so nothing is published.
    published = (out / "embeddings" / io.MANIFEST).read_bytes()
    again = embed.run(config(tree, out))
    assert again["unchanged"] is True and again["read"] == 1
    assert (out / "embeddings" / io.MANIFEST).read_bytes() == published
    assert read(out)[0].equals(table)
    os.utime(tree / "dogs/25.png", (1, 1))  # touched, same content: read and hashed, still unchanged
    assert embed.run(config(tree, out))["read"] == 2
    rehashed = embed.run(config(tree, out, rehash=True))
    assert rehashed["read"] == 41 and rehashed["unchanged"] is True
    # A larger pixel limit reconsiders the image refused as too large under the old one.
    bigger = embed.run(config(tree, out, max_pixels=30_000_000))
    assert bigger["embedded"] == 1 and bigger["counts"]["ok"] == 37 and "too_large" not in bigger["counts"]

    # A new image is the only one embedded; a changed one is re-embedded; a removed one disappears.
    save(tree, "dogs/new.png", Image.new("RGB", (30, 30), (1, 2, 3)), "PNG")
    save(tree, "dogs/20.png", Image.new("RGB", (30, 30), (9, 9, 9)), "PNG")
    (tree / "dogs/21.png").unlink()
    third = embed.run(config(tree, out, max_pixels=30_000_000))
    assert (third["embedded"], third["rows"]) == (2, 41)
    updated, _ = read(out)
    uris = updated["uri"].to_pylist()
    assert str(tree / "dogs/new.png") in uris and str(tree / "dogs/21.png") not in uris
    row = updated.filter(np.array(uris) == str(tree / "dogs/20.png")).to_pylist()[0]
    assert row["image_id"] == images.content_id((tree / "dogs/20.png").read_bytes()) and row["width"] == 30


def test_jpegs_decoded_in_the_actor_give_the_same_rows(tree, tmp_path):
    """--decode actor (nvJPEG on a GPU; torchvision's CPU decoder here) against Pillow in the tasks: the same
    statuses, errors and sizes for every file, and nearly the same vectors (the crop box is rounded to whole
    pixels)."""
    good = (tree / "cats/l1/0.jpg").read_bytes()
    scan = good.index(b"\xff\xda") + 4  # a damaged scan header behind an intact one: both decoders refuse it
    (tree / "cats/l2/scan.jpg").write_bytes(good[:scan] + b"\xff" * 8 + good[scan + 8:])
    embed.run(config(tree, tmp_path / "pillow"))
    embed.run(config(tree, tmp_path / "actor", decode="actor"))
    pillow, actor = read(tmp_path / "pillow")[0], read(tmp_path / "actor")[0]

    columns = ["uri", "status", "error", "width", "height", "image_id"]
    assert actor.select(columns).to_pylist() == pillow.select(columns).to_pylist()
    assert actor["status"].to_pylist().count(schemas.TRUNCATED) == 2
    ok = np.array(actor["status"].to_pylist()) == schemas.OK
    cosines = (np.stack(np.array(actor["embedding"].to_pylist(), dtype=object)[ok])
               * np.stack(np.array(pillow["embedding"].to_pylist(), dtype=object)[ok])).sum(axis=1)
    assert cosines.min() > 0.98, cosines.min()


def test_a_crash_leaves_the_published_stage_untouched(tree, tmp_path, monkeypatch):
    out = tmp_path / "run"
    embed.run(config(tree, out))
    stage = out / "embeddings"
    before = json.loads((stage / io.MANIFEST).read_text())
    save(tree, "dogs/new.png", Image.new("RGB", (30, 30)), "PNG")

    def crash(*args, **kwargs):
        raise RuntimeError("node lost")

    monkeypatch.setattr(embed, "_retain", crash)  # after the new rows are written, before publishing
    with pytest.raises(RuntimeError, match="node lost"):
        embed.run(config(tree, out))
    assert json.loads((stage / io.MANIFEST).read_text()) == before
    run_dirs = lambda: {p.name for p in stage.iterdir() if p.name.startswith("run-")}  # noqa: E731
    crashed = run_dirs() - {f.split("/")[0] for f in before["files"]}
    assert len(crashed) == 1  # the crashed run's files ...
    assert read(out)[0].num_rows == 41  # ... are not visible
    assert not (stage / io.LOCK).exists(), "the crashed job released the stage's lock"
    monkeypatch.undo()
    assert embed.run(config(tree, out))["rows"] == 42
    assert not crashed & run_dirs(), "the next publish removed the crashed run's folder"


def test_a_float16_stage_and_refused_reruns_that_write_nothing(tree, tmp_path, capsys):
    out = tmp_path / "run"
    manifest = embed.run(config(tree, out, dtype="float16"))
    assert read(out)[0].schema.field("embedding").type == schemas.vector_type(32, "float16")
    assert manifest["counts"]["ok"] == 36
    capsys.readouterr()  # drop Ray's own log lines
    code = cli.run_job("embed", ["--input", str(tree), "--run", str(out), "--backbone", "hog"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out}/embeddings was built with backbone='tiny-random', not 'hog'; "
        "write to another --run, or delete that stage to rebuild it")
    argv = ["--input", str(tree), "--run", str(out), "--backbone", "tiny-random", "--dtype", "float16"]
    assert cli.run_job("embed", [*argv, "--style", "true"]) == 2
    assert "was built with style=False, not True" in capsys.readouterr().err
    assert cli.run_job("embed", ["--input", str(tmp_path / "nowhere"), "--run", str(out), "--backbone", "hog"]) == 2
    assert "error: input" in capsys.readouterr().err
    # Nothing was written by the refused runs.
    assert [f.name for f in (out / "embeddings").iterdir()].count(io.MANIFEST) == 1
    assert pq.read_metadata(io.list_parquet(str(out / "embeddings"))[0]).num_rows > 0
    # An unreadable manifest is refused, not taken for no stage (which would rebuild and delete the old data).
    (out / "embeddings" / io.MANIFEST).write_text("{truncated")
    files = sorted(p.name for p in (out / "embeddings").iterdir())
    assert cli.run_job("embed", argv) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == files  # the old data is still there


def test_blank_images_get_their_own_status_and_stay_out_of_the_graph(tmp_path, capsys):
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i in range(4):
        save(root, f"a/{i}.png", Image.fromarray(rng.integers(0, 255, (32, 32), np.uint8)), "PNG")
    save(root, "a/blank.png", Image.new("L", (32, 32), 128), "PNG")  # HOG of a uniform image: all zeros
    run = tmp_path / "run"
    assert cli.run_job("embed", ["--input", str(root), "--run", str(run), "--backbone", "hog"]) == 0
    table, manifest = read(run)
    blank = table.filter(np.array(table["uri"].to_pylist()) == str(root / "a/blank.png")).to_pylist()[0]
    assert blank["status"] == schemas.BLANK and blank["embedding"] is None and "all-zero" in blank["error"]
    assert manifest["counts"] == {"blank": 1, "ok": 4}
    assert cli.run_job("graph", ["--run", str(run), "--k", "2"]) == 0
    assert io.read_table(str(run / "graph"), "graph")[0].num_rows == 4


def test_nothing_published_when_no_file_is_an_image(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "notes.jpg").write_text("not a picture")
    run = tmp_path / "run"
    assert cli.run_job("embed", ["--input", str(root), "--run", str(run), "--backbone", "tiny-random"]) == 2
    assert "none of the 1 files under" in capsys.readouterr().err
    assert not (run / "embeddings" / io.MANIFEST).exists()
