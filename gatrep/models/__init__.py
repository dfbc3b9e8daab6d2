"""Graph autoencoders (GAT-AE, GraphSAGE-AE): build from a ModelConfig, save/load, context-aware latents in batches."""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from gatrep import io, sampling, schemas
from gatrep.config import ModelConfig, from_dict, to_dict
from gatrep.errors import UserError
from gatrep.models.autoencoder import GraphAutoencoder, GraphEncoder, MLPDecoder, self_loops
from gatrep.models.encoders import ENCODERS

__all__ = [
    "ENCODERS", "GraphAutoencoder", "GraphEncoder", "ModelLoadError", "build_model", "context_aware_latents",
    "load_model", "model_config_from_dict", "save_model", "self_loops",
]

FORMAT = "gatrep.graph_autoencoder/1"
WEIGHTS_FILE, CONFIG_FILE = schemas.WEIGHTS_FILE, schemas.CONFIG_FILE


class ModelLoadError(UserError, ValueError):
    """Saved weights that are missing, unreadable, or do not fit the config stored beside them."""


def build_model(model_config: ModelConfig) -> GraphAutoencoder:
    """A freshly initialised GraphAutoencoder of `model_config` (seed torch first for reproducibility)."""
    c = model_config
    encoder = ENCODERS[c.encoder](c.in_dim, c.hidden, c.heads, c.latent_dim, c.dropout)
    return GraphAutoencoder(encoder, MLPDecoder(c.latent_dim, c.decoder_hidden, c.in_dim), c.in_dim)


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """ModelConfig from its JSON form (JSON lists become the tuples the dataclass holds)."""
    tuples = {f.name for f in dataclasses.fields(ModelConfig) if "tuple" in str(f.type)}
    return from_dict(ModelConfig, {k: tuple(v) if k in tuples and isinstance(v, list) else v
                                   for k, v in values.items()})


def save_model(model: torch.nn.Module, cfg: ModelConfig, dir_uri: str,
               extra: dict[str, Any] | None = None) -> list[str]:
    """Write `model.safetensors` and `config.json` (the ModelConfig + `extra`) into `dir_uri`; returns their URIs.

    A DDP-wrapped model is unwrapped; weights are copied to the CPU."""
    module = getattr(model, "module", model)
    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    document = {"format": FORMAT, "model": to_dict(cfg), **(extra or {})}
    fs, path = io.url_to_fs(dir_uri)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(posixpath.join(path, WEIGHTS_FILE), safetensors.torch.save(weights))
    fs.pipe_file(posixpath.join(path, CONFIG_FILE), json.dumps(document, indent=2, sort_keys=True).encode())
    return [io.join(dir_uri, WEIGHTS_FILE), io.join(dir_uri, CONFIG_FILE)]


def load_model(dir_uri: str) -> tuple[GraphAutoencoder, ModelConfig]:
    """(model in eval mode on the CPU, its ModelConfig) from a directory holding model.safetensors + config.json.

    Raises ModelLoadError when a file is missing or unreadable, and when the weights do not fit the model
    that config.json describes (a checkpoint from another config), naming the keys and shapes that differ."""
    weights_uri, config_uri = io.join(dir_uri, WEIGHTS_FILE), io.join(dir_uri, CONFIG_FILE)
    fs, _ = io.url_to_fs(dir_uri)
    for uri in (weights_uri, config_uri):
        if not fs.exists(io.url_to_fs(uri)[1]):
            raise ModelLoadError(f"{uri} does not exist; train a model first (python -m jobs.train)")
    document = _read_json(config_uri)
    try:
        cfg = model_config_from_dict(document["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(f"{config_uri}: not a gatrep model config ({err})") from err
    try:
        weights = safetensors.torch.load(fs.cat_file(io.url_to_fs(weights_uri)[1]))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ModelLoadError(f"{weights_uri}: cannot read safetensors weights ({err})") from err
    model = build_model(cfg)
    check_weights(model, weights, f"{weights_uri} vs {config_uri}")
    model.load_state_dict(weights)
    return model.eval(), cfg


def check_weights(model: torch.nn.Module, weights: dict[str, Tensor], where: str) -> None:
    """Refuse (ModelLoadError) weights whose names or shapes differ from `model`'s, listing the differences."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"{k}: saved {got[k]}, config gives {expected[k]}"
                 for k in sorted(expected.keys() & got.keys()) if expected[k] != got[k]]
    if problems:
        raise ModelLoadError(
            f"{where}: the weights were saved from another model config ({'; '.join(problems[:6])}"
            + (" ..." if len(problems) > 6 else "") + "); load them with the config.json saved beside them")


def _read_json(uri: str) -> dict[str, Any]:
    fs, path = io.url_to_fs(uri)
    try:
        document = json.loads(fs.cat_file(path))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{uri} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelLoadError(f"{uri} is not a gatrep model config (format {FORMAT!r} expected)")
    return document


@torch.no_grad()
def context_aware_latents(model: GraphAutoencoder, features: Tensor, neighbours: Tensor, batch_size: int,
                          device: torch.device | str | None = None) -> Tensor:
    """Context-aware latents [N, latent_dim] (on the CPU) of every node, computed layer by layer in batches.

    Each graph layer runs on `batch_size` target nodes at a time with their full neighbourhood from
    `neighbours` ([N, k], -1 padded), and its outputs are kept on the CPU for the next layer, so the
    device never holds more than one batch's subgraph: never the whole graph in one forward. The
    result equals `model.encode(features, edge_index)` on the full graph, up to float rounding."""
    model.eval()
    device = device or next(model.parameters()).device
    neighbours = neighbours.cpu()
    h = model.scale(features.float().cpu())
    for i in range(model.encoder.num_layers):
        outputs = []
        for start in range(0, len(h), batch_size):
            targets = torch.arange(start, min(start + batch_size, len(h)))
            sub = sampling.sample(neighbours, targets, [-1])
            edge_index = torch.stack([sub.row, sub.col]).to(device)
            out = model.encoder.layer(i, h[sub.node].to(device), edge_index)
            outputs.append(out[:len(targets)].cpu())
        h = torch.cat(outputs)
    return torch.cat([model.encoder.head(h[s:s + batch_size].to(device)).cpu() for s in range(0, len(h), batch_size)])
