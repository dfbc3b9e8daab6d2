"""The graph encoders an autoencoder can take, by name: the paper's GAT and GraphSAGE."""

from __future__ import annotations

from collections.abc import Callable

from torch_geometric.nn import GATConv, SAGEConv

from gatrep.models.autoencoder import GraphEncoder


class GATEncoder(GraphEncoder):
    """GATConv(in -> hidden x heads, heads concatenated) -> ReLU -> GATConv(-> hidden, heads averaged) -> ReLU
    -> Linear(hidden -> latent_dim). GATConv adds each node's self-loop, so a node attends to itself and
    its neighbours; with no edges it attends to itself alone (the context-free mode)."""

    def __init__(self, in_dim: int, hidden: int, heads: int, latent_dim: int, dropout: float = 0.0) -> None:
        convs = [
            GATConv(in_dim, hidden, heads=heads, concat=True),
            GATConv(hidden * heads, hidden, heads=heads, concat=False),
        ]
        super().__init__(convs, hidden, latent_dim, dropout)


class SAGEEncoder(GraphEncoder):
    """SAGEConv(in -> hidden) -> ReLU -> SAGEConv(hidden -> hidden) -> ReLU -> Linear(hidden -> latent_dim).

    Mean aggregation, as in the GraphSAGE tutorial the project draws on. Each layer adds a transform of the
    node's own features (root weight) to the mean of its neighbours'; in the context-free mode (self-loops
    only) the mean is the node itself. `heads` is ignored."""

    def __init__(self, in_dim: int, hidden: int, heads: int, latent_dim: int, dropout: float = 0.0) -> None:
        convs = [SAGEConv(in_dim, hidden), SAGEConv(hidden, hidden)]
        super().__init__(convs, hidden, latent_dim, dropout)


# The registry config.py validates --encoder against: name -> (in_dim, hidden, heads, latent_dim, dropout) -> encoder.
ENCODERS: dict[str, Callable[..., GraphEncoder]] = {"gat": GATEncoder, "sage": SAGEEncoder}
