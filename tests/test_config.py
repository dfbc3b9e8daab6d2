"""Stage configs (defaults < YAML file < flags, clear refusals, one source per setting) and the command line's
error boundary."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gatrep import cli, config, pipeline
from gatrep.config import EmbedConfig, ModelConfig, ModelSettings, TrainConfig


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "embed.yaml"
    path.write_text("input: /data/in\nrun: /data/out\nbatch-size: 8\ndtype: float16\n")
    cfg = cli.parse(EmbedConfig, ["--config", str(path), "--batch-size", "16"], "test")
    assert (cfg.input, cfg.run, cfg.batch_size, cfg.dtype, cfg.backbone) == (
        "/data/in", "/data/out", 16, "float16", "mobilenet_v2")
    assert config.from_dict(EmbedConfig, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "x"], "missing required flags: --run"),
        (["--input", "x", "--run", "y", "--dtype", "int8"], "dtype must be float32 or float16, not 'int8'"),
        (["--input", "x", "--run", "y", "--batch-size", "0"], "batch_size must be positive, not 0"),
        (["--input", "x", "--run", "y", "--device", "tpu"], "device must be auto, cuda or cpu, not 'tpu'"),
        (["--input", "x", "--run", "y", "--backbone", "vgg"], "backbone must be one of clip-vit-b32, hog, "),
        (["--config", "/nonexistent/embed.yaml"], "--config /nonexistent/embed.yaml: cannot be read as YAML"),
    ],
)
def test_bad_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(EmbedConfig, argv, "test")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_keys_are_named():
    with pytest.raises(config.ConfigError, match="unknown EmbedConfig keys: colour"):
        config.from_dict(EmbedConfig, {"input": "a", "run": "b", "colour": "red"})


def test_console_script_dispatches_and_lists_jobs(capsys):
    assert cli.main(["embed", "--list"]) == 0
    assert "clip-vit-b32" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "usage: gatrep {embed," in capsys.readouterr().out


def test_a_config_file_that_is_not_yaml_or_not_a_mapping_is_refused(tmp_path, capsys):
    for text, message in (("input: [unclosed", "cannot be read as YAML"), ("- a list", "expected a mapping")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            cli.parse(EmbedConfig, ["--config", str(path)], "test")
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_model_settings_are_declared_once_with_one_default():
    shared = {f.name for f in dataclasses.fields(ModelSettings)}
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert TrainConfig(run="r").model_config(512) == ModelConfig(in_dim=512)
    assert ModelConfig(in_dim=512).standardise is True


@pytest.mark.parametrize(("build", "message"), [
    (lambda: TrainConfig(run="r", encoder="gcn"), "encoder must be one of gat, sage, not 'gcn'"),
    (lambda: config.IndexConfig(run="r", method="medoid"), "method must be one of centroid, degree, most_central"),
    (lambda: config.IndexConfig(run="r", categories="hdbscan"), "categories must be one of given, dbscan, kmeans"),
    (lambda: config.QueryConfig(run="r", input="i", scoring="vote"), "scoring must be one of single, max, mean, knn"),
    (lambda: config.QueryConfig(run="r", input="i", query_latent="x"), "query_latent must be one of context-aware"),
    (lambda: config.ReportConfig(run="r", map_method="umap"), "map_method must be one of tsne, pca"),
    (lambda: config.QueryConfig(run="r", input="i", scope="world"), "scope must be one of category, all"),
    (lambda: config.QueryConfig(run="r", input="i", vote_power=-1), "vote_power must be >= 0, not -1"),
    (lambda: config.QueryConfig(run="r", input="i", similarity="adaptive", scope="all"), "use it with --scope cat"),
    (lambda: config.IndexConfig(run="r", central="medoids"), "central must be one of top, kmeans"),
])
def test_method_names_are_checked_against_the_registries_that_dispatch_on_them(build, message):
    with pytest.raises(config.ConfigError, match=message):
        build()


def test_a_user_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    assert cli.run_job("index", ["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "latents" in err


def test_a_bug_is_not_disguised_as_a_user_error(tmp_path):
    """A KeyError (or anything not a UserError) inside a stage shows its traceback and exits 1."""
    code = ("import gatrep.stages.index as stage\n"
            "def broken(cfg):\n    return {}['no such key']\n"
            "stage.run = broken\n"
            "from gatrep.cli import run_job\n"
            f"raise SystemExit(run_job('index', ['--run', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'no such key'" in done.stderr


def test_pipeline_methods_are_checked_before_any_work(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["--input", "x", "--queries", "q", "--run", run, "--methods", "index-raw/knn,index/knn/nearest"]
    assert cli.run_job("pipeline", argv) == 2
    assert "unknown --methods index/knn/nearest; known: index/single/category-aware," in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(config.ConfigError, match="--methods .* needs --queries"):
        config.PipelineConfig(input="x", methods=("index-raw/knn",))
    cfg = cli.parse(config.PipelineConfig, ["--input", "x", "--queries", "q", "--methods", "index-raw/knn"], "t")
    assert pipeline.chosen(cfg, pipeline.all_methods(cfg)) == [("index-raw", "knn", "")]
