"""The pure-PyTorch neighbour sampler against a hand-built 6-node k-NN table: neighbours, relabelling, directions."""

from __future__ import annotations

import pytest
import torch

from gatrep import sampling
from gatrep.sampling import PAD

# Node i's k=2 nearest neighbours; edges point neighbour -> node.
TABLE = torch.tensor([
    [1, 2],
    [0, 3],
    [4, PAD],
    [5, 0],
    [PAD, PAD],
    [3, 1],
])


def _global_edges(out: sampling.SamplerOutput) -> list[tuple[int, int]]:
    return list(zip(out.node[out.row].tolist(), out.node[out.col].tolist(), strict=True))


def test_edge_index_points_from_neighbour_to_node_and_skips_padding() -> None:
    edge_index = sampling.edge_index_of(TABLE)
    assert edge_index.tolist() == [[1, 2, 0, 3, 4, 5, 0, 3, 1], [0, 0, 1, 1, 2, 3, 3, 5, 5]]


def test_extend_keeps_existing_ids_and_appends_new_ones_once() -> None:
    nodes, local = sampling.extend(torch.tensor([7, 3]), torch.tensor([9, 3, 1, 9, 7]))
    assert nodes.tolist() == [7, 3, 1, 9]
    assert local.tolist() == [3, 1, 2, 3, 0]


def test_two_full_hops_give_exact_neighbours_relabelled_seeds_first() -> None:
    out = sampling.sample(TABLE, torch.tensor([2, 0]), [-1, -1])
    assert out.node.tolist() == [2, 0, 1, 4, 3]
    # hop 1: 4->2, 1->0, 2->0 ; hop 2 expands only the new nodes 1 and 4: 0->1, 3->1 (4 has no neighbours)
    assert out.row.tolist() == [3, 2, 0, 1, 4]
    assert out.col.tolist() == [0, 1, 1, 2, 2]
    assert _global_edges(out) == [(4, 2), (1, 0), (2, 0), (0, 1), (3, 1)]
    assert out.edge.tolist() == [4, 0, 1, 2, 3]  # node * k + slot in the table
    assert out.num_sampled_nodes == [2, 2, 1]
    assert out.num_sampled_edges == [3, 2]


def test_every_sampled_edge_is_a_table_edge_into_its_target() -> None:
    out = sampling.sample(TABLE, torch.tensor([5, 3, 1]), [-1, -1])
    for source, target in _global_edges(out):
        assert source in TABLE[target].tolist()
    slots = out.edge % 2
    assert (TABLE[out.node[out.col], slots] == out.node[out.row]).all()


def test_fanout_samples_distinct_valid_neighbours() -> None:
    generator = torch.Generator().manual_seed(0)
    chosen: set[int] = set()
    for _ in range(50):
        out = sampling.sample(TABLE, torch.tensor([0, 2, 4]), [1], generator)
        edges = _global_edges(out)
        assert sorted(t for _, t in edges) == [0, 2]  # one edge per node with neighbours, none for node 4
        assert (4, 2) in edges  # node 2's only valid neighbour, never its padding
        chosen |= {s for s, t in edges if t == 0}
    assert chosen == {1, 2}, "both neighbours of node 0 get sampled over repeated draws"


def test_repeated_seeds_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        sampling.sample(TABLE, torch.tensor([1, 1]), [-1])


def test_node_loader_batches_carry_features_of_sampled_nodes() -> None:
    features = torch.arange(6, dtype=torch.float32).unsqueeze(1) * torch.ones(1, 3)
    loader = sampling.make_loader(features, TABLE, torch.tensor([2, 0, 5]), [-1, -1], batch_size=2,
                                  use_pyg_lib=False)
    batches = list(loader)
    assert [b.batch_size for b in batches] == [2, 1]
    first = batches[0]
    assert first.n_id.tolist() == [2, 0, 1, 4, 3]
    assert torch.equal(first.x, features[first.n_id])
    assert first.edge_index.tolist() == [[3, 2, 0, 1, 4], [0, 1, 1, 2, 2]]
    assert batches[1].n_id[:1].tolist() == [5]
