"""A GraphSAGE encoder (mean aggregation, as in the GraphSAGE tutorial the project draws on), same shape as GAT's."""

from __future__ import annotations

from torch_geometric.nn import SAGEConv

from gatrep.models.autoencoder import GraphEncoder


class SAGEEncoder(GraphEncoder):
    """SAGEConv(in -> hidden) -> ReLU -> SAGEConv(hidden -> hidden) -> ReLU -> Linear(hidden -> latent_dim).

    Each layer adds a transform of the node's own features (root weight) to the mean of its neighbours';
    in the context-free mode (self-loops only) the mean is the node itself."""

    def __init__(self, in_dim: int, hidden: int, latent_dim: int, dropout: float = 0.0) -> None:
        convs = [SAGEConv(in_dim, hidden), SAGEConv(hidden, hidden)]
        super().__init__(convs, hidden, latent_dim, dropout)
