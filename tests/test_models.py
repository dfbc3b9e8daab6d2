"""Graph autoencoders on a tiny graph: shapes, training, context-free vs self-loops, batched latents, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

from gatrep import sampling
from gatrep.config import ModelConfig
from gatrep.models import (
    GraphAutoencoder,
    ModelLoadError,
    build_model,
    context_aware_latents,
    load_model,
    save_model,
    self_loops,
)
from gatrep.models.autoencoder import MLPDecoder
from gatrep.models.encoders import SAGEEncoder
from gatrep.models.epoch import train_epoch
from gatrep.vectors import PAD

TABLE = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, PAD], [3, 4]])  # two triangles, one padded slot
SMALL = {"in_dim": 8, "hidden": 4, "heads": 2, "latent_dim": 6, "decoder_hidden": (5,)}


def _features(n: int = 6, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("encoder", ["gat", "sage"])
def test_forward_shapes(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, **SMALL))
    z, x_hat = model(_features(), sampling.edge_index_of(TABLE))
    assert z.shape == (6, 6) and x_hat.shape == (6, 8)
    assert model.context_free(_features()).shape == (6, 6)


def test_paper_model_is_two_gat_layers_and_a_256_latent() -> None:
    model = build_model(ModelConfig(in_dim=512, standardise=False))
    convs = model.encoder.convs
    assert [type(c).__name__ for c in convs] == ["GATConv", "GATConv"]
    assert (convs[0].heads, convs[0].out_channels, convs[0].concat) == (4, 256, True)
    assert model.encoder.latent.out_features == 256
    z, x_hat = model(torch.randn(3, 512), self_loops(3))
    assert z.shape == (3, 256) and x_hat.shape == (3, 512)


def test_sage_encoder_plugs_into_the_same_autoencoder() -> None:
    model = GraphAutoencoder(SAGEEncoder(8, 4, 1, 6), MLPDecoder(6, [5], 8), in_dim=8)
    z, x_hat = model(_features(), sampling.edge_index_of(TABLE))
    assert z.shape == (6, 6) and x_hat.shape == (6, 8)


@pytest.mark.parametrize("encoder", ["gat", "sage"])
def test_full_batch_training_lowers_the_loss(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, **SMALL))
    batch = Data(x=_features(), edge_index=sampling.edge_index_of(TABLE))
    batch.batch_size = 6
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = train_epoch(model, optimizer, [batch], "cpu").loss
    for _ in range(100):
        last = train_epoch(model, optimizer, [batch], "cpu").loss
    assert last < 0.5 * first


def test_sampled_training_runs_over_all_seeds_and_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = sampling.make_loader(_features(), TABLE, torch.arange(6), [2, 2], batch_size=4, seed=0,
                                  use_pyg_lib=False)
    first = train_epoch(model, optimizer, loader, "cpu")
    assert (first.batches, first.seeds) == (2, 6)
    for _ in range(60):
        last = train_epoch(model, optimizer, loader, "cpu")
    assert last.loss < 0.5 * first.loss
    assert train_epoch(model, optimizer, loader, "cpu", max_batches=1).batches == 1


@pytest.mark.parametrize("encoder", ["gat", "sage"])
def test_context_free_equals_a_graph_of_self_loops_only(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, **SMALL)).eval()
    x = _features()
    free = model.context_free(x)
    assert torch.allclose(free, model.encode(x, self_loops(6)), atol=1e-6)
    alone = model.context_free(x[2:3])
    assert torch.allclose(free[2:3], alone, atol=1e-6), "a node's context-free latent ignores the others"
    assert not torch.allclose(free, model.encode(x, sampling.edge_index_of(TABLE)), atol=1e-3)
    if encoder == "gat":  # GATConv adds the self-loops itself: no edges at all is the same graph
        assert torch.allclose(free, model.encode(x, torch.empty(2, 0, dtype=torch.long)), atol=1e-6)


@pytest.mark.parametrize("encoder", ["gat", "sage"])
def test_batched_layer_wise_latents_equal_the_full_graph_forward(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, **SMALL)).eval()
    x = _features()
    full = model.encode(x, sampling.edge_index_of(TABLE))
    batched = context_aware_latents(model, x, TABLE, batch_size=2)
    assert torch.allclose(batched, full, atol=1e-5)


def test_save_then_load_rebuilds_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    save_model(model, cfg, str(tmp_path), extra={"epoch": 3})
    loaded, loaded_cfg = load_model(str(tmp_path))
    assert loaded_cfg == cfg
    x = _features()
    assert torch.equal(loaded.context_free(x), model.eval().context_free(x))
    assert json.loads((tmp_path / "config.json").read_text())["epoch"] == 3


def test_load_refuses_weights_from_another_config(tmp_path: Path) -> None:
    cfg = ModelConfig(**SMALL)
    save_model(build_model(cfg), cfg, str(tmp_path))
    document = json.loads((tmp_path / "config.json").read_text())
    document["model"]["heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelLoadError, match="saved from another model config.*att_src"):
        load_model(str(tmp_path))


def test_load_refuses_a_missing_or_foreign_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist; train a model first"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    (tmp_path / "config.json").write_text(json.dumps({"format": "gatrep.graph_autoencoder/1", "model": SMALL}))
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_model(str(tmp_path))


def test_standardised_features_scale_inside_the_model_and_travel_with_its_weights(tmp_path):
    torch.manual_seed(0)
    features = torch.randn(20, 6) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0]) + 7.0
    plain = build_model(ModelConfig(in_dim=6, hidden=4, heads=2, latent_dim=3, decoder_hidden=(5,)))
    assert torch.equal(plain.scale(features), features)  # unfitted: identity, the paper's model
    cfg = ModelConfig(in_dim=6, hidden=4, heads=2, latent_dim=3, decoder_hidden=(5,), standardise=True)
    model = build_model(cfg)
    model.fit_scaling(features)
    scaled = model.scale(features)
    assert torch.allclose(scaled.mean(dim=0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(scaled.std(dim=0), torch.ones(6), atol=1e-5)
    # The encoder sees the scaled features: the same as an unscaled model fed pre-scaled input.
    plain.load_state_dict({**model.state_dict(), "feature_mean": torch.zeros(6), "feature_std": torch.ones(6)})
    assert torch.allclose(model.context_free(features), plain.context_free(scaled), atol=1e-5)
    save_model(model, cfg, str(tmp_path / "m"))
    loaded, loaded_cfg = load_model(str(tmp_path / "m"))
    assert loaded_cfg.standardise and torch.allclose(loaded.context_free(features), model.context_free(features))
