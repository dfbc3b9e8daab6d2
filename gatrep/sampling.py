"""Neighbour sampling over a padded k-NN table [N, k] in pure PyTorch, behind PyG's BaseSampler / NodeLoader.

PyG's own NeighborLoader needs pyg-lib or torch-sparse (native builds not always available). A k-NN
graph has a fixed in-degree, so its neighbours are a dense table and sampling one hop is tensor
indexing: this module does that, and `make_loader` uses PyG's NeighborLoader instead when pyg-lib is
installed. Edges point from neighbour to node (`edge_index[0]` = source = neighbour, `edge_index[1]` =
target), so a node aggregates its k nearest neighbours, as in PyG's samplers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_geometric.typing
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.loader import NeighborLoader, NodeLoader
from torch_geometric.sampler import BaseSampler, EdgeSamplerInput, NodeSamplerInput, SamplerOutput

from gatrep.vectors import PAD


def edge_index_of(neighbours: Tensor) -> Tensor:
    """The [2, E] edge_index of a padded neighbour table: one edge neighbour -> node per non-PAD slot."""
    valid = neighbours != PAD
    target = torch.arange(len(neighbours), device=neighbours.device).unsqueeze(1).expand_as(neighbours)
    return torch.stack([neighbours[valid], target[valid]])


def extend(nodes: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """(nodes with the unseen candidates appended, local id of every candidate).

    `nodes` are distinct global ids whose local ids are their positions; they keep them. Candidates not
    among `nodes` are appended once each, in increasing id order. Cost O((n + c) log(n + c)), no
    N-sized scratch array, so a batch costs the same whatever the size of the graph.
    """
    fresh = candidates[~torch.isin(candidates, nodes)]
    merged = torch.cat([nodes, torch.unique(fresh)])
    sorted_ids, position = merged.sort()
    return merged, position[torch.searchsorted(sorted_ids, candidates)]


def _pick(neighbours: Tensor, frontier: Tensor, fanout: int,
          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(global neighbour ids [F, s], slot of each in the table [F, s]) for each frontier node; PAD where none.

    `fanout` -1 or >= k takes every slot; otherwise `fanout` distinct non-PAD slots chosen uniformly.
    """
    rows = neighbours[frontier]
    k = rows.shape[1]
    if fanout < 0 or fanout >= k:
        return rows, torch.arange(k, device=rows.device).expand_as(rows)
    scores = torch.rand(rows.shape, generator=generator, device=rows.device)
    scores[rows == PAD] = 2.0  # padding goes last, chosen only when a row has fewer valid slots than fanout
    slots = scores.topk(fanout, dim=1, largest=False).indices
    return rows.gather(1, slots), slots


def sample(neighbours: Tensor, seeds: Tensor, num_neighbors: Sequence[int],
           generator: torch.Generator | None = None) -> SamplerOutput:
    """Sample len(num_neighbors) hops of in-neighbours around `seeds` (distinct global ids).

    Returns a SamplerOutput whose `node` starts with the seeds (local ids 0..B-1), then each hop's new
    nodes; `row` (source, the neighbour) and `col` (target) are local ids; `edge` is the flat slot id
    node * k + slot in the table; `num_sampled_nodes` / `num_sampled_edges` are per hop. Each hop
    expands only the nodes the previous hop added. Raises ValueError on repeated seeds.
    """
    seeds = seeds.to(neighbours.device, torch.long)
    if torch.unique(seeds).numel() != seeds.numel():
        raise ValueError("seed nodes must be distinct")
    k = neighbours.shape[1]
    nodes, frontier = seeds, torch.arange(len(seeds), device=neighbours.device)
    rows, cols, edges, sampled_nodes, sampled_edges = [], [], [], [len(seeds)], []
    for fanout in num_neighbors:
        picked, slots = _pick(neighbours, nodes[frontier], fanout, generator)
        valid = picked != PAD
        targets = frontier.unsqueeze(1).expand_as(picked)[valid]
        before = len(nodes)
        nodes, sources = extend(nodes, picked[valid])
        rows.append(sources)
        cols.append(targets)
        edges.append(nodes[targets] * k + slots[valid])
        sampled_nodes.append(len(nodes) - before)
        sampled_edges.append(int(valid.sum()))
        frontier = torch.arange(before, len(nodes), device=neighbours.device)
    return SamplerOutput(node=nodes, row=torch.cat(rows), col=torch.cat(cols), edge=torch.cat(edges),
                         num_sampled_nodes=sampled_nodes, num_sampled_edges=sampled_edges)


class KnnNeighbourSampler(BaseSampler):
    """PyG sampler over a padded k-NN table: `sample_from_nodes` gives the subgraph of `sample`.

    Holds only the table (shared, not copied) and a seeded generator. Edge-level sampling is refused.
    """

    def __init__(self, neighbours: Tensor, num_neighbors: Sequence[int], seed: int | None = None) -> None:
        if neighbours.dim() != 2:
            raise ValueError(f"neighbours must be a [N, k] table, not shape {tuple(neighbours.shape)}")
        self.neighbours = neighbours.long()
        self.num_neighbors = list(num_neighbors)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator(device=neighbours.device)
            self.generator.manual_seed(seed)

    def sample_from_nodes(self, index: NodeSamplerInput, **kwargs: Any) -> SamplerOutput:
        """The sampled subgraph around `index.node`; metadata is (input_id, time) as NodeLoader expects."""
        out = sample(self.neighbours, index.node, self.num_neighbors, self.generator)
        out.metadata = (index.input_id, index.time)
        return out

    def sample_from_edges(self, index: EdgeSamplerInput, neg_sampling: Any = None) -> SamplerOutput:
        """Not supported: gatrep trains on nodes."""
        raise NotImplementedError("KnnNeighbourSampler samples around nodes only")


def make_loader(features: Tensor, neighbours: Tensor, seeds: Tensor, num_neighbors: Sequence[int],
                batch_size: int, shuffle: bool = False, seed: int | None = None,
                use_pyg_lib: bool | None = None) -> NodeLoader:
    """A loader of mini-batches (Data with x, edge_index, n_id, batch_size; seeds first) around `seeds`.

    Uses PyG's NeighborLoader when pyg-lib is installed (or `use_pyg_lib` is True), else NodeLoader
    with KnnNeighbourSampler. `features` and `neighbours` are indexed per batch, never copied whole
    (the NeighborLoader path does build the full edge_index once).
    """
    if use_pyg_lib is None:
        use_pyg_lib = torch_geometric.typing.WITH_PYG_LIB
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    if use_pyg_lib:
        data = Data(x=features, edge_index=edge_index_of(neighbours))
        return NeighborLoader(data, num_neighbors=list(num_neighbors), input_nodes=seeds, batch_size=batch_size,
                              shuffle=shuffle, generator=generator)
    # An empty edge_index is a placeholder: NodeLoader's filter step replaces it with the sampled edges.
    data = Data(x=features, edge_index=torch.empty(2, 0, dtype=torch.long), num_nodes=len(features))
    sampler = KnnNeighbourSampler(neighbours, num_neighbors, seed)
    return NodeLoader(data, node_sampler=sampler, input_nodes=seeds, batch_size=batch_size, shuffle=shuffle,
                      generator=generator)
