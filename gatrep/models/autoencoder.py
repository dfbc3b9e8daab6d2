"""The graph autoencoder: any graph encoder (GAT, GraphSAGE) + a fully connected decoder of the input features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GraphEncoder(nn.Module):
    """Graph layers (each followed by ReLU) and a linear latent layer; subclasses fill `convs`.

    `layer(i, x, edge_index)` runs one graph layer alone, so latents can be computed layer by layer
    over batches of nodes (see gatrep.models.context_aware_latents) instead of on the whole graph.
    """

    def __init__(self, convs: Sequence[nn.Module], out_channels: int, latent_dim: int, dropout: float) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.latent = nn.Linear(out_channels, latent_dim)
        self.dropout = dropout

    @property
    def num_layers(self) -> int:
        """Number of graph layers (hops a node's latent depends on)."""
        return len(self.convs)

    def layer(self, i: int, x: Tensor, edge_index: Tensor) -> Tensor:
        """Graph layer i with its ReLU; returns one row per row of x."""
        x = F.dropout(x, p=self.dropout, training=self.training)
        return F.relu(self.convs[i](x, edge_index))

    def head(self, h: Tensor) -> Tensor:
        """The latent layer applied to the last graph layer's output."""
        return self.latent(h)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Latents [n, latent_dim] of all n rows of x, over the edges of edge_index (source -> target)."""
        for i in range(self.num_layers):
            x = self.layer(i, x, edge_index)
        return self.head(x)


class MLPDecoder(nn.Sequential):
    """Fully connected layers latent -> hidden (ReLU) ... -> the input features (no output activation)."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        sizes = [latent_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_dim))
        super().__init__(*layers)


class GraphAutoencoder(nn.Module):
    """GAT-AE (the paper's Fig. 4) or any encoder: features -> graph encoder -> latent -> decoder -> features.

    Features are first scaled per dimension by the `feature_mean` / `feature_std` buffers (identity
    until `fit_scaling` sets them), so the statistics travel with the weights; the decoder
    reconstructs the scaled features.
    """

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, encoder: GraphEncoder, decoder: nn.Module, in_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def fit_scaling(self, features: Tensor) -> None:
        """Scale each input dimension to mean 0 and standard deviation 1 over `features` [N, in_dim]."""
        features = features.float()
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp(min=1e-6))

    def scale(self, x: Tensor) -> Tensor:
        """x with each dimension standardised (unchanged for a model whose scaling was never fitted)."""
        return (x - self.feature_mean.to(x.device)) / self.feature_std.to(x.device)

    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """(latents z, reconstruction of the scaled features), one row per row of x."""
        z = self.encoder(self.scale(x), edge_index)
        return z, self.decoder(z)

    def encode(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Context-aware latents: each node attends to its neighbours in edge_index."""
        return self.encoder(self.scale(x), edge_index)

    def context_free(self, x: Tensor) -> Tensor:
        """Context-free latents: every node sees itself only (a graph of self-loops), as the paper
        categorizes a query before it is inserted into a category's graph."""
        return self.encoder(self.scale(x), self_loops(len(x), x.device))


def self_loops(n: int, device: torch.device | str | None = None) -> Tensor:
    """The edge_index [2, n] of n self-loops."""
    ids = torch.arange(n, device=device)
    return torch.stack([ids, ids])
