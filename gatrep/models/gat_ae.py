"""The paper's GAT encoder: two GATConv layers with ReLU, then a linear latent layer."""

from __future__ import annotations

from torch_geometric.nn import GATConv

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
