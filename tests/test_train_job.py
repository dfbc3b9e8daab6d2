"""The train stage (`python -m jobs.train`) end to end on a local Ray (2 CPUs): two DDP workers, a killed
worker, resume, reuse, latents."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import numpy as np
import pytest
import torch
from test_s3 import ray_logs

from gatrep import cli, io, models, schemas
from gatrep.config import TrainConfig
from gatrep.stages import train

pytestmark = pytest.mark.ray

SMALL = ["--hidden", "8", "--heads", "2", "--latent-dim", "16", "--decoder-hidden", "16", "--batch-size", "64",
         "--lr", "0.01", "--workers", "2", "--inference-batch-size", "100"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, clustered, write_embeddings) -> str:
    root = str(tmp_path_factory.mktemp("run"))
    listings = [f"shirts/{i // 30}" for i in range(300)]
    write_embeddings(root, clustered(30, 10, dim=16), listings=listings, categories=["shirts"] * 300)
    assert cli.run_job("graph", ["--run", root, "--k", "5"]) == 0
    return root


def _metrics(run: str) -> list[dict]:
    model_dir = Path(run) / "model"
    manifest = json.loads((model_dir / io.MANIFEST).read_text())
    metrics_file = next(f for f in manifest["files"] if f.endswith("metrics.jsonl"))
    return [json.loads(line) for line in (model_dir / metrics_file).read_text().splitlines()]


def test_two_workers_survive_a_killed_worker_and_write_latents(local_ray: None, run: str, tmp_path: Path) -> None:
    cfg = TrainConfig(run=run, epochs=3, hidden=8, heads=2, latent_dim=16, decoder_hidden=(16,), batch_size=64,
                      lr=0.01, workers=2, max_failures=1, inference_batch_size=100, checkpoint_every_s=0)
    marker = tmp_path / "killed"
    manifests = train.run(cfg, fail_once={"epoch": 2, "rank": 1, "marker": str(marker)})
    assert marker.exists(), "the fault injection must have killed rank 1"
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["resumed"] for m in metrics] == [False, True, False], "epoch 2 reran from the epoch-1 checkpoint"
    assert all(m["seeds"] == 300 and m["batches_per_worker"] == 3 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    table, latents_manifest = io.read_table(io.join(run, "latents"), "latents")
    schemas.validate(table.schema, schemas.latents(16), "latents")
    assert table[schemas.NODE].to_pylist() == list(range(300))
    assert table[schemas.LISTING].to_pylist()[31] == "shirts/1"
    model, model_cfg = train.load_model_stage(io.join(run, "model"))
    assert model_cfg.heads == 2 and manifests["model"]["epochs"] == 3
    inputs = train.load_inputs(run)
    expected = models.context_aware_latents(model, torch.from_numpy(inputs.features),
                                            torch.from_numpy(inputs.neighbours), batch_size=64)
    got = np.array(table[schemas.LATENT].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert latents_manifest["upstream"]["model"]["created"] == manifests["model"]["created"]


def _checkpointed_epochs(run: str) -> list[int]:
    kept = (Path(train.checkpoint_storage(run)) / train.RUN_NAME).glob("checkpoint_epoch_*")
    return sorted(int(p.name.rsplit("_", 1)[1]) for p in kept)


def test_rerun_with_more_epochs_resumes_from_the_last_checkpoint(local_ray: None, run: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert _checkpointed_epochs(run) == [2, 3]  # every epoch (--checkpoint-every-s 0), the last two kept
    assert cli.run_job("train", ["--run", run, "--epochs", "5", *SMALL]) == 0
    assert "resumed from epoch 3" in capsys.readouterr().out
    printed = [line for name, data in ray_logs().items() if posixpath.basename(name).startswith("worker-")
               for line in data.decode(errors="replace").splitlines() if "Epoch 5/5 Loss" in line]
    assert len(printed) == 1, printed  # once, not twice (Ray Train's print also logs)
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["resumed"] is False and metrics[-2]["resumed"] is True
    assert _checkpointed_epochs(run) == [3, 5]  # the default 60 s between checkpoints: only the last epoch's


def test_rerun_with_the_same_config_and_inputs_reuses_model_and_latents(local_ray: None, run: str,
                                                                        capsys: pytest.CaptureFixture) -> None:
    before = {stage: (Path(run) / stage / io.MANIFEST).read_text() for stage in ("model", "latents")}
    assert cli.run_job("train", ["--run", run, "--epochs", "5", *SMALL]) == 0
    assert "[already published: reused]" in capsys.readouterr().out
    assert {stage: (Path(run) / stage / io.MANIFEST).read_text() for stage in ("model", "latents")} == before


def test_checkpoint_of_another_config_is_refused_before_anything_runs(local_ray: None, run: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    before = (Path(run) / "model" / io.MANIFEST).read_text()
    argv = ["--run", run, "--epochs", "6", *SMALL]
    argv[argv.index("--heads") + 1] = "3"
    assert cli.run_job("train", argv) == 2
    err = capsys.readouterr().err
    assert "trained with another model config" in err and "heads: checkpoint 2, asked 3" in err
    assert (Path(run) / "model" / io.MANIFEST).read_text() == before


def test_bad_graph_stages_are_refused_and_nothing_is_written(local_ray: None, clustered, write_embeddings,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path)
    write_embeddings(root, clustered(5, 2))
    assert cli.run_job("train", ["--run", root, *SMALL]) == 2
    assert "graph stage was never published" in capsys.readouterr().err
    assert cli.run_job("graph", ["--run", root, "--k", "2"]) == 0
    write_embeddings(root, clustered(5, 2, seed=1))  # new embeddings published after the graph was built
    assert cli.run_job("train", ["--run", root, *SMALL]) == 2
    assert "rebuild the graph" in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "latents").exists()


def test_checkpoint_storage_is_absolute_for_a_relative_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.checkpoint_storage("runs/demo") == str(tmp_path / "runs/demo/model/_checkpoints")
