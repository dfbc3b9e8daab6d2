"""The HTML report: escaping, bounded sampling, placeholders, SVG charts, and a tiny run's page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gatrep import cli, io, schemas
from gatrep.config import EvaluateConfig, IndexConfig, ReportConfig
from gatrep.report import charts, html, sections, thumbnails
from gatrep.stages import evaluate as evaluate_stage
from gatrep.stages import index as index_stage
from gatrep.stages import report

HOSTILE = '<script>alert("x")</script>&co'  # a category name that must reach the page only as text
REPO = Path(__file__).resolve().parents[1]
DIM = 8
RESULTS = "results-index-single"  # named as jobs.pipeline names them: the report finds it through the evaluation


# ----------------------------------------------------------------------------------------------
# A tiny run: 3 categories, 4 listings, 14 images (one deleted after embedding), 2 bad inputs


def _png(path: Path, colour: tuple[int, int, int], mark: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((24, 24, 3), colour, dtype=np.uint8)
    pixels[mark % 20:mark % 20 + 4, :, :] = 255  # a white bar so that images of a category differ
    Image.fromarray(pixels).save(path)


def _vector_rows(images: Path) -> list[dict]:
    """One ok row per image; vectors cluster by category (and listing) so the index is predictable."""
    rng = np.random.default_rng(0)
    layout = [("shirts", "shirts/l1", (200, 40, 40), 4), ("shirts", "shirts/l2", (220, 80, 40), 3),
              ("shoes", "shoes", (40, 160, 40), 4), (HOSTILE, HOSTILE, (40, 40, 200), 3)]
    bases = {"shirts": np.eye(DIM)[0], "shoes": np.eye(DIM)[1], HOSTILE: np.eye(DIM)[2]}
    rows = []
    for category, listing, colour, count in layout:
        for i in range(count):
            path = images / f"{len(rows):02d}.png"
            _png(path, colour, 4 * i)
            shift = 0.2 * np.eye(DIM)[3] if listing == "shirts/l2" else 0.0
            vec = bases[category] + 0.15 * rng.normal(size=DIM) + shift
            rows.append({"image_id": f"id{len(rows):02d}", "uri": str(path), "listing": listing, "category": category,
                         "vector": (vec / np.linalg.norm(vec)).astype(np.float32)})
    return rows


def _publish(run: Path, directory: str, table: pa.Table, config: dict | None = None, stage: str = "",
             **extra) -> None:
    stage_uri = str(run / directory)
    run_dir = io.new_run_dir(stage_uri)
    io.publish(stage_uri, stage or directory, [io.write_table(table, run_dir)], config or {"test": True}, **extra)


def _embeddings(run: Path, rows: list[dict], images: Path) -> None:
    (images / "notes.jpg").write_text("not an image")
    bad = [("idbad1", str(images / "notes.jpg"), "not_an_image", "no image format recognised; file starts b'not'"),
           (None, str(images / "gone.png"), "unreadable", 'could not read <gone.png>: FileNotFoundError "x"')]
    columns = {
        "image_id": [r["image_id"] for r in rows] + [b[0] for b in bad],
        "uri": [r["uri"] for r in rows] + [b[1] for b in bad],
        "listing": [r["listing"] for r in rows] + [None, None],
        "category": [r["category"] for r in rows] + [None, None],
        "width": [24] * len(rows) + [None, None], "height": [24] * len(rows) + [None, None],
        "status": ["ok"] * len(rows) + [b[2] for b in bad],
        "error": [None] * len(rows) + [b[3] for b in bad],
        "embedding": [r["vector"].tolist() for r in rows] + [None, None],
        "fingerprint": [None] * (len(rows) + 2),
    }
    _publish(run, "embeddings", pa.table(columns, schema=schemas.embeddings(DIM)))


def _latents(run: Path, rows: list[dict]) -> None:
    table = pa.table({"node": list(range(len(rows))), "image_id": [r["image_id"] for r in rows],
                      "listing": [r["listing"] for r in rows], "category": [r["category"] for r in rows],
                      "latent": [r["vector"].tolist() for r in rows]}, schema=schemas.latents(DIM))
    _publish(run, "latents", table)


def _model(run: Path) -> None:
    stage_uri = str(run / "model")
    run_dir = Path(io.new_run_dir(stage_uri))
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "loss": 1.0 / e}) for e in range(1, 6)] + ["{broken", ""]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    io.publish(stage_uri, "model", [str(run_dir / "metrics.jsonl")], {"test": True},
               model={"encoder": "gat", "hidden": 16, "heads": 2, "latent_dim": DIM})


def _results(run: Path, rows: list[dict]) -> None:
    index_uri = str(run / "index")
    searcher = index_stage.load_searcher(index_uri)
    picked = [rows[0], rows[4], rows[8], rows[12]]
    vectors = np.stack([r["vector"] for r in picked])
    vectors[1] = rows[8]["vector"]  # a shirts-labelled query that looks like shoes: misclassified
    columns = searcher.search(vectors, k=3).columns()
    table = pa.table({"query_id": [f"q{i}" for i in range(4)], "uri": [r["uri"] for r in picked],
                      "label": [r["category"] for r in picked], "status": ["ok"] * 4, "error": [None] * 4,
                      **columns}, schema=schemas.results())
    upstream = {"index": io.upstream_of(io.read_manifest(index_uri), index_uri)}
    _publish(run, RESULTS, table, {"index": "index"}, "results", method="tiny/single", upstream=upstream)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root with every stage the report reads; index, results and evaluation come from the real jobs."""
    base = tmp_path_factory.mktemp("report")
    run, images = base / "run", base / "images"
    rows = _vector_rows(images)
    _embeddings(run, rows, images)
    _latents(run, rows)
    _model(run)
    index_stage.run(IndexConfig(run=str(run), merge_threshold=0.5))
    _results(run, rows)
    evaluate_stage.run(EvaluateConfig(run=str(run), results=(RESULTS,), k=3))
    Path(rows[-1]["uri"]).unlink()  # indexed, then deleted: its thumbnail must become a placeholder
    return run


def _cfg(run: Path, **overrides) -> ReportConfig:
    return ReportConfig(run=str(run), map_method="pca", threads=2, **overrides)


@pytest.fixture(scope="module")
def tiny_page(tiny_run: Path) -> tuple[str, dict]:
    return report.build(_cfg(tiny_run))


# ----------------------------------------------------------------------------------------------
# Pure pieces


def test_escape_turns_markup_into_text():
    assert html.esc('<b a="1">&\'') == "&lt;b a=&quot;1&quot;&gt;&amp;&#x27;"
    assert html.esc(None) == "\u2014"
    assert html.cut("x" * 10, 5) == "xxxx\u2026" and html.cut(None) == ""


def test_page_shows_data_strings_only_escaped(tiny_page):
    html_text, _ = tiny_page
    assert HOSTILE not in html_text and "<script>alert" not in html_text
    assert html.esc(HOSTILE) in html_text
    # The only scripts are the page's own two inline ones.
    assert html_text.count("<script>") == 2


def test_sample_positions_is_bounded_distinct_and_seeded():
    assert io.sample_positions(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    drawn = io.sample_positions(1000, 20, 3)
    assert drawn.size == 20 and np.unique(drawn).size == 20 and (np.diff(drawn) > 0).all() and drawn.max() < 1000
    assert (io.sample_positions(1000, 20, 3) == drawn).all()
    assert not (io.sample_positions(1000, 20, 4) == drawn).all()


def test_take_rows_reads_global_rows_across_files_and_row_groups(tmp_path):
    stage = tmp_path / "latents"
    run_dir = io.new_run_dir(str(stage))
    Path(run_dir).mkdir(parents=True)
    files = []
    for part, values in enumerate((range(0, 7), range(7, 12))):
        path = f"{run_dir}/part-{part}.parquet"
        pq.write_table(pa.table({"v": list(values)}), path, row_group_size=3)  # groups of 3 rows
        files.append(path)
    manifest = io.publish(str(stage), "latents", files, {})
    assert io.count_rows(str(stage), manifest) == 12
    taken = io.take_rows(str(stage), manifest, np.array([11, 0, 4, 7, 4]), ["v"])
    assert taken["v"].to_pylist() == [0, 4, 7, 11]
    with pytest.raises(ValueError, match="at least one row"):
        io.take_rows(str(stage), manifest, np.array([], dtype=np.int64), ["v"])
    with pytest.raises(schemas.SchemaError, match="no column.*'w'"):  # pyarrow alone would yield empty batches
        list(io.scan(str(stage), manifest, ["v", "w"]))


def test_thumbnail_of_an_image_and_refusals(tmp_path):
    _png(tmp_path / "a.png", (10, 200, 10), 0)
    jpeg, why = thumbnails.thumbnail_jpeg(str(tmp_path / "a.png"), 32, 75, 10**6, 10**6)
    assert why == "" and jpeg is not None
    with Image.open(__import__("io").BytesIO(jpeg)) as decoded:
        assert decoded.format == "JPEG" and decoded.size == (32, 32)
    (tmp_path / "t.jpg").write_text("hello")
    assert thumbnails.thumbnail_jpeg(str(tmp_path / "t.jpg"), 32, 75, 10**6, 10**6) == (None, "not_an_image")
    assert thumbnails.thumbnail_jpeg(str(tmp_path / "none.png"), 32, 75, 10**6, 10**6) == (None, "unreadable")
    assert thumbnails.thumbnail_jpeg(str(tmp_path / "a.png"), 32, 75, 10, 10**6) == (None, "too_large")
    assert thumbnails.thumbnail_jpeg(str(tmp_path / "a.png"), 32, 75, 10**6, 100) == (None, "too_large")


def test_thumbnails_fill_placeholders_and_budget(tmp_path):
    _png(tmp_path / "a.png", (10, 200, 10), 0)
    thumbs = thumbnails.Thumbnails(32, 75, budget_bytes=10**6, max_bytes=10**6, max_pixels=10**6, threads=2)
    page = "".join([thumbs.img(str(tmp_path / "a.png"), 'a "quoted" <alt>'), thumbs.img(str(tmp_path / "x.png"), "x"),
                    thumbs.img(None, "none", "URI unknown")])
    filled = thumbs.fill(page)
    assert filled.count("<img ") == 1 and filled.count('class="ph"') == 2
    assert "unreadable" in filled and "URI unknown" in filled and "<!--thumb:" not in filled
    assert 'alt="a &quot;quoted&quot; &lt;alt&gt;"' in filled
    tight = thumbnails.Thumbnails(32, 75, budget_bytes=1, max_bytes=10**6, max_pixels=10**6)
    filled = tight.fill(tight.img(str(tmp_path / "a.png"), "a"))
    assert "<img" not in filled and "over budget" in filled and tight.stats["over_budget"] == 1


def test_svg_line_draws_finite_points_and_downsamples():
    svg = charts.svg_line([1, 2, 3, 4], [4.0, float("nan"), 2.0, 1.0])
    root = ET.fromstring(svg)  # well-formed XML
    points = root.find("{http://www.w3.org/2000/svg}polyline").get("points").split()
    assert len(points) == 3
    many = ET.fromstring(charts.svg_line(list(range(5000)), list(range(5000)), max_points=100))
    assert len(many.find("{http://www.w3.org/2000/svg}polyline").get("points").split()) == 100
    assert "no finite points" in charts.svg_line([1.0], [float("inf")])
    with pytest.raises(ValueError, match="as many xs as ys"):
        charts.svg_line([1, 2], [1])


def test_nice_ticks_and_the_log_scale_of_a_falling_loss():
    assert charts.nice_ticks(1, 200) == [50, 100, 150, 200]
    assert charts.nice_ticks(0, 0.9) == [0, 0.25, 0.5, 0.75]
    assert charts.nice_ticks(3, 3) == [3]
    falling = charts.svg_line(list(range(1, 201)), [1 / e for e in range(1, 201)])
    labels = [t.text for t in ET.fromstring(falling).iter("{http://www.w3.org/2000/svg}text")]
    assert "loss, log scale" in labels and {"1", "0.1", "0.01"} <= set(labels)
    flat = charts.svg_line([1, 2, 3], [0.5, 0.4, 0.3])
    assert "log scale" not in flat


def test_map_draws_from_the_largest_categories_when_there_are_too_many(tmp_path):
    sizes = list(range(1, len(charts.PALETTE) + 3))  # group g{i} has i rows: two more groups than colours
    groups = [f"g{size:02d}" for size in sizes for _ in range(size)]
    vectors = np.random.default_rng(0).normal(size=(len(groups), 4)).astype(np.float32)
    table = pa.table({"node": list(range(len(groups))), "image_id": [f"i{n}" for n in range(len(groups))],
                      "listing": groups, "category": groups, "latent": vectors.tolist()}, schema=schemas.latents(4))
    _publish(tmp_path, "latents", table)
    mapped = report.load_map(_cfg(tmp_path, map_points=1000), str(tmp_path / "latents"), "latents", "latent")
    largest = {f"g{size:02d}" for size in sizes[2:]}
    assert set(mapped.groups) == largest and len(mapped.groups) == mapped.candidates == sum(sizes[2:])
    assert mapped.total == len(groups) and mapped.group_count == len(sizes) and mapped.xy.shape == (len(groups) - 3, 2)


def test_svg_scatter_colours_frequent_groups_and_escapes():
    groups = ["a"] * 3 + ["<b>"] * 2 + [f"g{i}" for i in range(len(charts.PALETTE))]
    xy = np.arange(2 * len(groups), dtype=float).reshape(-1, 2)
    root = ET.fromstring(charts.svg_scatter(xy, groups))
    circles = root.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == len(groups)
    colour = charts.colours(groups)
    assert colour["a"] == charts.PALETTE[0] and colour["<b>"] == charts.PALETTE[1]
    assert sum(c == charts.OTHER_COLOUR for c in colour.values()) == 2  # 14 groups, 12 colours
    titles = [c.find("{http://www.w3.org/2000/svg}title").text for c in circles]
    assert "<b>" in titles  # escaped in the markup, the original text once parsed
    assert "2 other groups" in charts.legend(groups)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        charts.svg_scatter(np.zeros((3, 3)), ["a"] * 3)


def test_parse_metrics_skips_what_it_cannot_read():
    text = '{"epoch": 1, "loss": 0.5}\n\n{"loss": 0.25}\nnot json\n{"epoch": 3, "loss": NaN}\n[1, 2]\n{"epoch": 4}\n'
    epochs, losses, skipped = report.parse_metrics(text)
    assert epochs == [1.0, 2.0] and losses == [0.5, 0.25] and skipped == 4


def test_confusion_is_a_matrix_when_small_and_top_pairs_when_large():
    ctx = sections.Context(_cfg(Path("/nowhere"), classes=3, pairs=2), thumbnails.Thumbnails(16, 75, 0, 1, 1))
    small = {"labels": ["a", "b"], "matrix": [[3, 1], [0, 2]]}
    assert sections.confusion(ctx, small).count("<td") == 4
    large = {"labels": ["a", "b", "c", "d"], "matrix": [[5, 3, 0, 0], [0, 5, 1, 0], [0, 0, 5, 0], [2, 0, 0, 5]]}
    text = sections.confusion(ctx, large)
    assert "the 2 largest confusions" in text
    assert re.search(r"<td>a</td><td>b</td><td class='n'>3</td>", text) and "<td>d</td><td>a</td>" in text


def test_similarity_matrix_shades_off_diagonal_cells_from_lowest_to_highest():
    matrix = np.array([[1.0, 0.9, 0.95], [0.9, 1.0, 0.99], [0.95, 0.99, 1.0]])
    cells = re.findall(r"<td([^>]*)>([^<]*)</td>", sections.similarity_matrix(["a", "b", "<c>"], matrix))
    assert len(cells) == 9 and [value for _, value in cells[:3]] == ["1.000", "0.900", "0.950"]
    assert cells[0][0] == ' class="n"'  # the diagonal is not shaded
    assert "rgba(37,99,235,0.00)" in cells[1][0] and "rgba(37,99,235,1.00)" in cells[5][0]


def test_project_tsne_and_pca_give_two_columns():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (8, 5)) + 3, rng.normal(0, 0.1, (8, 5)) - 3])
    for method in ("tsne", "pca"):
        xy = charts.project(x, method, 0)
        assert xy.shape == (16, 2) and np.isfinite(xy).all()
        # The two clusters stay apart along some axis.
        gap = np.abs(xy[:8].mean(axis=0) - xy[8:].mean(axis=0)).max()
        assert gap > xy[:8].std(axis=0).max()
    assert charts.project(x[:2], "tsne", 0).shape == (2, 2)


# ----------------------------------------------------------------------------------------------
# The tiny run's page


def test_page_has_every_section_with_the_run_data(tiny_page):
    html_text, summary = tiny_page
    assert summary["sections"] == {"index": "ok", "results": "ok", "inputs": "ok", "map": "ok", "evaluation": "ok",
                                   "training": "ok"}
    for anchor, _, _ in sections.SECTIONS:
        assert f'<section id="{anchor}">' in html_text
    assert "Not run" not in html_text and "Could not read" not in html_text
    assert "5 epochs, final loss 0.20000" in html_text and "1 malformed line(s)" in html_text
    assert "tiny/single" in html_text and "Confusion matrix" in html_text
    assert "shirts/l1" in html_text and "listing representatives" in html_text
    assert "could not read &lt;gone.png&gt;" in html_text and "not_an_image" in html_text
    assert "1 of them from the 1 misclassified" in html_text


def test_page_thumbnails_are_bounded_and_missing_files_are_placeholders(tiny_page):
    html_text, summary = tiny_page
    thumbs = summary["thumbnails"]
    assert thumbs["embedded"] == html_text.count("<img ") > 10
    assert thumbs["placeholders"] >= 1 and "unreadable" in html_text  # the deleted image
    assert all(src.startswith("data:image/jpeg;base64,") for src in re.findall(r'<img [^>]*src="([^"]+)"', html_text))


def test_missing_and_broken_stages_are_shown_not_raised(tmp_path, tiny_run):
    run = tmp_path / "partial"
    shutil.copytree(tiny_run / "embeddings", run / "embeddings")
    (run / "evaluation").mkdir()
    (run / "evaluation" / io.MANIFEST).write_text("{not json")
    html_text, summary = report.build(_cfg(run))
    assert summary["sections"]["index"] == "not run" and summary["sections"]["evaluation"] == "error"
    assert summary["sections"]["map"] == "ok"  # no latents: the map falls back to the embeddings
    assert html_text.count('class="notrun"') == 4  # categories, queries, training, similarity
    assert "Could not read" in html_text and "backbone embeddings instead" in html_text


def test_a_stage_with_a_missing_or_corrupt_file_shows_as_could_not_read(tmp_path, tiny_run):
    run = tmp_path / "damaged"
    shutil.copytree(tiny_run, run)
    next((run / "model").glob("run-*/metrics.jsonl")).unlink()  # listed in the manifest, gone from the disk
    next((run / "latents").glob("run-*/*.parquet")).write_bytes(b"not parquet at all")
    html_text, summary = report.build(_cfg(run))
    assert summary["sections"]["training"] == "error" and summary["sections"]["map"] == "error"
    assert summary["errors"]["training"].startswith("FileNotFoundError")
    map_error = summary["errors"]["map"]
    assert map_error.startswith("StageError") and "not a readable Parquet file" in map_error
    assert {k for k, v in summary["sections"].items() if v == "ok"} == {"index", "results", "inputs", "evaluation"}
    assert html_text.count('class="failed"') == 2


@pytest.mark.parametrize("bug", [TypeError, KeyError, ValueError])
def test_a_bug_in_a_loader_raises_instead_of_showing_as_unreadable(tiny_run, monkeypatch, bug):
    def broken(stage_uri: str) -> None:
        raise bug("a bug in the loader")

    monkeypatch.setattr(report, "load_training", broken)
    with pytest.raises(bug, match="a bug in the loader"):
        report.build(_cfg(tiny_run))


def test_sections_past_their_bounds_say_how_they_were_sampled(tiny_run):
    html_text, _ = report.build(_cfg(tiny_run, categories=1, queries=2, similarity_listings=2, pairs=1, map_points=5))
    assert "1 of 3 shown in full" in html_text
    assert "2 of 4 drawn at random" in html_text
    assert "5 of 14 rows of <code>latents.latent</code>" in html_text
    assert "4 listings are more than 2" in html_text and 'class="matrix"' in html_text  # confusion only
    assert html_text.count('class="card merge"') == 1


def test_the_sampled_results_stage_is_found_through_the_evaluation(tiny_run):
    assert report.results_stage(_cfg(tiny_run)) == RESULTS
    assert report.results_stage(_cfg(tiny_run, results="results-other")) == "results-other"
    html_text, summary = report.build(_cfg(tiny_run, results="results-other"))
    assert summary["sections"]["results"] == "not run" and "results-other</code> has no published stage" in html_text


def test_job_writes_the_page_and_refuses_a_missing_run(tmp_path, tiny_run, capsys):
    out = tmp_path / "out" / "report.html"
    assert cli.run_job("report", ["--run", str(tiny_run), "--out", str(out), "--map-method", "pca"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and "report:" in capsys.readouterr().out
    assert cli.run_job("report", ["--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_of_an_object_store_run(tiny_run, capsys):
    """Every read and the write go through fsspec: the same run copied to an in-memory filesystem reports the same."""
    fs = fsspec.filesystem("memory")
    root = f"/report-test-{os.getpid()}"
    try:
        for path in tiny_run.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{root}/run/{path.relative_to(tiny_run)}", path.read_bytes())
        assert cli.run_job("report", ["--run", f"memory://{root}/run", "--map-method", "pca"]) == 0
        page = fs.cat_file(f"{root}/run/report/index.html").decode()
        assert "stages: index ok, results ok, inputs ok, map ok, evaluation ok, training ok" in capsys.readouterr().out
        assert page.count("<img ") > 10 and "Not run" not in page
    finally:
        fs.rm(root, recursive=True)


# ----------------------------------------------------------------------------------------------
# Headless Chromium


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed; CI needs it for the report test (./dev.sh test installs it as root)")
    pytest.skip("chromium is not installed (apt-get install chromium); the report's browser check did not run")


def _browse(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium in its own process group, killed whole when it overruns."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-extensions", "--no-first-run", "--mute-audio", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _check_in_browser(chromium: str, page: Path, work: Path) -> Path:
    """Load `page` in headless Chromium: every <img> decoded, no script or resource error, nothing on the console;
    then screenshot it. Returns the screenshot's path."""
    expected_images = page.read_text().count("<img ")
    dom = _browse(chromium, work / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    assert f'data-images="{expected_images}"' in body.group(0) and expected_images > 10
    assert 'data-broken-images="0"' in body.group(0)
    assert "data-errors" not in re.search(r"<html[^>]*>", dom.stdout).group(0)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = work / f"{page.parent.name}.png"
    taken = _browse(chromium, work / "profile", "--hide-scrollbars", "--window-size=1280,1600",
                    f"--screenshot={shot}", page.as_uri())
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        assert len(set(image.convert("L").resize((64, 80)).getdata())) > 20  # a page, not a blank frame
    return shot


def test_report_loads_in_headless_chromium(tmp_path, tiny_run):
    """The tiny run's page; with GATREP_UPDATE_SCREENSHOT=1 also the demo's (./dev.sh demo first), whose screenshot
    replaces docs/report-screenshot.png for the README."""
    chromium = _chromium()
    page = tmp_path / "report" / "index.html"
    assert cli.run_job("report", ["--run", str(tiny_run), "--out", str(page), "--map-method", "pca"]) == 0
    _check_in_browser(chromium, page, tmp_path)
    if os.environ.get("GATREP_UPDATE_SCREENSHOT") == "1":
        demo = REPO / "runs" / "demo"
        assert io.stage_exists(str(demo / "index")), f"{demo} has no index stage: run ./dev.sh demo first"
        demo_page = tmp_path / "demo" / "index.html"
        assert cli.run_job("report", ["--run", str(demo), "--out", str(demo_page)]) == 0
        shot = _check_in_browser(chromium, demo_page, tmp_path)
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report-screenshot.png")


def test_the_browser_check_catches_broken_images_and_errors(tmp_path):
    """The checks above can fail: a page with a missing image and a script error trips both."""
    chromium = _chromium()
    page = tmp_path / "bad.html"
    page.write_text(html.page("bad", "bad", '<img src="missing.png" alt="x"><script>undefinedFunction();</script>'))
    dom = _browse(chromium, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    assert 'data-broken-images="1"' in dom.stdout
    assert "data-errors=" in re.search(r"<html[^>]*>", dom.stdout).group(0)
    assert any("Uncaught" in line for line in dom.stderr.splitlines())


def test_looks_show_the_same_queries_matches_from_each_results_stage_side_by_side(tmp_path, tiny_run):
    run = tmp_path / "looks"
    shutil.copytree(tiny_run, run)
    table, _ = io.read_table(str(run / RESULTS), "results")
    # Another ranking of the same queries (as --similarity style would give): each query's matches reversed.
    other = table.set_column(table.schema.get_field_index("matches"), "matches",
                             pa.array([list(reversed(m)) for m in table["matches"].to_pylist()],
                                      table.schema.field("matches").type))
    _publish(run, "results-style", other, {"index": "index"}, "results", method="tiny/single/style-retrieval")
    html_text, summary = report.build(_cfg(run, looks=(RESULTS, "results-style"), look_queries=4))
    assert summary["sections"]["looks"] == "ok"
    looks = html_text.split('<section id="looks">')[1].split("</section>")[0]
    assert looks.count('class="card query"') == 4 and looks.count("<h4>tiny/single/style-retrieval</h4>") == 4
    first = table.to_pylist()[0]["matches"]
    assert "#1 " + html.num(first[0]["score"], 3) in looks and "#1 " + html.num(first[-1]["score"], 3) in looks
    # A stage of other queries is refused in its section, not in the whole report.
    _publish(run, "results-other", table.slice(0, 1), {"index": "index"}, "results")
    html_text, summary = report.build(_cfg(run, looks=("results-other", RESULTS), look_queries=2))
    assert summary["sections"]["looks"] == "ok"
    html_text, summary = report.build(_cfg(run, looks=(RESULTS, "results-other"), look_queries=2))
    assert summary["sections"]["looks"] == "error"
    assert re.search(r"results-other does not hold \d of the queries sampled from results-index-single", html_text)
