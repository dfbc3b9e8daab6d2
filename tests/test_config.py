"""Stage configs: defaults < YAML file < flags, and clear refusals."""

from __future__ import annotations

import pytest

from gatrep import config
from gatrep.config import EmbedConfig
from jobs import __main__ as cli


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "embed.yaml"
    path.write_text("input: /data/in\nrun: /data/out\nbatch-size: 8\ndtype: float16\n")
    cfg = config.parse(EmbedConfig, ["--config", str(path), "--batch-size", "16"], "test")
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
    ],
)
def test_bad_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse(EmbedConfig, argv, "test")
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
