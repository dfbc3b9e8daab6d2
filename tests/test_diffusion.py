"""GRAD-Net diffusion against hand-made graphs and values computed by hand: mutual table, S, anchor codes, layers,
sextets, losses, subgraph exactness, training, QFE and seeding."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gatrep.models import diffusion
from gatrep.models.diffusion import DiffusionConfig, DiffusionLayer, DiffusionNet, Graph, adjacency
from gatrep.vectors import PAD, exact_knn, normalise

NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small sparse steps run several times faster on one thread on a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clustered_vectors(n_per: int, clusters: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Unit vectors in tight clusters around random centres, cluster-major order."""
    rng = np.random.default_rng(seed)
    x = np.repeat(rng.standard_normal((clusters, dim)), n_per, axis=0)
    return normalise(x + 0.05 * rng.standard_normal((clusters * n_per, dim)))


# Row i: node i's k=2 nearest neighbours and their similarities. Mutual pairs: 0-1, 1-3, 2-4 (0->2 and 3->0 are
# one-way); the 2-4 similarity is negative and must be clamped to 0.
TABLE = np.array([[1, 2], [0, 3], [4, PAD], [1, 0], [2, PAD]])
SIMS = np.array([[0.9, 0.8], [0.9, 0.7], [-0.5, NAN], [0.7, 0.6], [-0.5, NAN]], dtype=np.float32)


def test_mutual_table_keeps_only_mutual_pairs_first_in_row_order() -> None:
    table, weights = diffusion.mutual_knn(TABLE, SIMS)
    assert table.tolist() == [[1, PAD], [0, 3], [4, PAD], [1, PAD], [2, PAD]]
    assert torch.allclose(weights[:, 0], torch.tensor([0.9, 0.9, 0.0, 0.7, 0.0]))
    assert weights[1, 1].item() == pytest.approx(0.7)
    assert torch.isnan(weights[table == PAD]).all()


def test_mutual_table_is_symmetric_on_a_real_knn_table() -> None:
    x = clustered_vectors(20, 3, dim=6)
    table, _ = diffusion.mutual_knn(*exact_knn(x, 5))
    edges = {(i, int(j)) for i, row in enumerate(table) for j in row if j != PAD}
    assert edges and all((j, i) in edges for i, j in edges)


def test_transition_is_degree_normalised_affinity() -> None:
    table, weights = diffusion.mutual_knn(TABLE, SIMS)
    s = diffusion.transition(table, weights)
    d0, d1, d3 = 0.9, 0.9 + 0.7, 0.7
    assert s[0, 0].item() == pytest.approx(0.9 / math.sqrt(d0 * d1))
    assert s[1, 1].item() == pytest.approx(0.7 / math.sqrt(d1 * d3))
    assert s[3, 0].item() == pytest.approx(0.7 / math.sqrt(d3 * d1))
    assert s[2, 0].item() == 0.0  # degree 0 (its only affinity was clamped): no division by zero
    assert torch.isnan(s[table == PAD]).all()


def test_project_simplex_by_hand() -> None:
    v = torch.tensor([[0.5, 0.5, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, -1.0], [0.2, 0.1, 0.0]])
    shift = (1 - 0.3) / 3  # the last row sums to 0.3 and stays positive: each entry moves up by the same amount
    expected = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2 + shift, 0.1 + shift, shift]])
    assert torch.allclose(diffusion.project_simplex(v), expected)


@pytest.mark.parametrize("coding", ["lae", "soft"])
def test_anchor_codes_are_sparse_non_negative_rows_summing_to_one(coding: str) -> None:
    x = clustered_vectors(10, 4, dim=6)
    anchors = diffusion.fit_anchors(x, 8, seed=0)
    z = diffusion.anchor_codes(x, anchors, 3, coding)
    assert z.shape == (40, 8)
    assert ((z > 0).sum(dim=1) <= 3).all() and (z >= 0).all()
    assert torch.allclose(z.sum(dim=1), torch.ones(40), atol=1e-5)
    nearest = torch.cdist(torch.from_numpy(x), torch.from_numpy(anchors)).topk(3, largest=False).indices
    assert (z.gather(1, nearest).sum(dim=1) > 1 - 1e-5).all(), "weight only on the 3 nearest anchors"


def test_lae_codes_reconstruct_better_than_soft_assignment() -> None:
    anchors = np.eye(4, dtype=np.float32)
    x = np.array([[0.6, 0.8, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    lae, soft = (diffusion.anchor_codes(x, anchors, 2, c) for c in ("lae", "soft"))
    error = [torch.linalg.norm(torch.from_numpy(x) - z @ torch.from_numpy(anchors), dim=1) for z in (lae, soft)]
    assert (error[0] <= error[1] + 1e-6).all() and error[0].sum() < error[1].sum() - 0.01
    assert lae[1, 0].item() == pytest.approx(1.0, abs=1e-4)  # x equals an anchor: all its weight there
    # min ||(0.6, 0.8) - (z, 1 - z)||^2 on the simplex: z = (0.6 - 0.8 + 1) / 2 = 0.4
    assert lae[0, 0].item() == pytest.approx(0.4, abs=1e-3) and lae[0, 1].item() == pytest.approx(0.6, abs=1e-3)


def _path(n: int = 3) -> Tensor:
    """S of the path 0 - 1 - ... - n-1 with unit affinities, as `adjacency`."""
    edges = torch.tensor([[i, i + 1] for i in range(n - 1)] + [[i + 1, i] for i in range(n - 1)]).T
    return adjacency(edges, torch.ones(edges.shape[1]), n)


def test_layer_shapes_unit_rows_and_second_order_reaches_two_hops() -> None:
    torch.manual_seed(0)
    adj = _path(3)
    x = torch.randn(3, 5)
    moved = x.clone()
    moved[2] += 3.0  # node 2 is two hops from node 0
    for second in (False, True):
        layer = DiffusionLayer(5, 4, second_order=second, dropout=0.0).eval()
        out = layer(x, adj)
        assert out.shape == (3, 4)
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
        changed = not torch.allclose(layer(moved, adj)[0], out[0])
        assert changed is second, "only the second-order term lets node 0 see node 2"


def test_layer_first_order_by_hand() -> None:
    layer = DiffusionLayer(2, 2, second_order=False, dropout=0.0, negative_slope=0.1).eval()
    with torch.no_grad():
        layer.first.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    adj = adjacency(torch.tensor([[1], [0]]), torch.tensor([0.5]), 2)  # one edge 1 -> 0 with s = 0.5
    pre = torch.tensor([[1 + 1.5, -2 + 0.5], [3.0, 1.0]])  # (I + S) x
    expected = F.normalize(torch.where(pre > 0, pre, 0.1 * pre), dim=1)
    assert torch.allclose(layer(x, adj), expected)


def test_second_order_operator_by_hand() -> None:
    layer = DiffusionLayer(1, 1, second_order=True, dropout=0.0, negative_slope=1.0).eval()  # slope 1: no activation
    with torch.no_grad():
        layer.first.weight.zero_()
        layer.second.weight.fill_(1.0)  # type: ignore[union-attr]
    x = torch.tensor([[2.0], [3.0], [5.0]])
    adj = _path(3)
    sh = torch.tensor([[3.0], [7.0], [3.0]])  # S x on the path with unit weights
    expected = adj.to_dense() @ (sh * x)  # S((S x) . x): [21, 6 + 15, 21]
    assert expected.flatten().tolist() == [21.0, 21.0, 21.0]
    net_out = layer.second(layer.spread(x, adj) * x)  # type: ignore[misc]
    assert torch.allclose(layer.spread(net_out, adj), expected)


def test_net_concat_output_and_last_output_widths() -> None:
    torch.manual_seed(0)
    x, adj = torch.randn(3, 6), _path(3)
    concat = DiffusionNet(6, [4, 3], dropout=0.0, output="concat").eval()
    last = DiffusionNet(6, [4, 3], dropout=0.0, output="last").eval()
    assert concat(x, adj).shape == (3, 6 + 4 + 3) and last(x, adj).shape == (3, 3)
    assert torch.allclose(concat(x, adj).norm(dim=1), torch.ones(3), atol=1e-5)
    assert concat.hops == 4


def _sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t))


def test_losses_by_hand() -> None:
    e1, e2, diag = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    r = 1 / math.sqrt(2)
    # BPR(i, j, u) with s_ij = cos(diag, e1) = r, s_iu = cos(diag, e2) ... = r: -ln sigmoid(0) = ln 2
    assert diffusion.bpr_loss(diag, e1, e2).item() == pytest.approx(math.log(2))
    assert diffusion.bpr_loss(e1, diag, e2).item() == pytest.approx(-math.log(_sigmoid(r - 0.0)))
    a_ij, a_kl = torch.tensor([0.5]), torch.tensor([0.8])
    # (i, j, k, l) = (e1, e2, e1, diag): s_ki = 1, s_li = r, s_lj = r
    order = math.log(1 + 0.5 * 0.8 * 1.0 * r * (1.0 - r) ** 2)
    assert diffusion.order_loss((e1, e2, e1, diag), a_ij, a_kl).item() == pytest.approx(order)
    # s_li = cos(e2, e1) = 0: the weight vanishes, so does the term
    assert diffusion.order_loss((e1, e2, e1, e2), a_ij, a_kl).item() == 0.0
    # the sextet (i, j, k, l, u, v) = (e1, e2, e1, diag, e2, e2):
    # BPR(i, j, u) = -ln sigmoid(0 - 0), BPR(k, l, v) = -ln sigmoid(r - 0), plus alpha * order
    sextet = torch.cat([e1, e2, e1, diag, e2, e2]).unsqueeze(0)
    total = diffusion.sextet_loss(sextet, a_ij, a_kl, alpha=10.0).item()
    assert total == pytest.approx(math.log(2) - math.log(_sigmoid(r)) + 10 * order)
    batch = torch.cat([sextet, sextet.flip(1)])  # the mean over a batch of two sextets
    reverse = diffusion.sextet_loss(sextet.flip(1), a_ij, a_kl, alpha=10.0).item()
    assert diffusion.sextet_loss(batch, a_ij.repeat(2), a_kl.repeat(2), 10.0).item() == pytest.approx(
        (total + reverse) / 2)


def test_order_loss_weight_is_clamped_so_the_log_stays_finite() -> None:
    e1 = torch.tensor([[1.0, 0.0]])
    h = [e1, e1, -e1, e1]
    # s_ki = -1, s_li = 1: the paper's weight is negative, ln(1 - 4) would be NaN
    assert diffusion.order_loss(h, torch.tensor([1.0]), torch.tensor([1.0])).item() == 0.0


def _graph(n_per: int = 15, clusters: int = 4, cfg: DiffusionConfig | None = None) -> tuple[Graph, np.ndarray]:
    cfg = cfg or DiffusionConfig()
    x = clustered_vectors(n_per, clusters, dim=8)
    anchors = diffusion.fit_anchors(x, 6)
    return diffusion.build_graph(x, *exact_knn(x, 5), anchors, cfg), x


def test_sextets_pair_neighbours_and_non_neighbours() -> None:
    graph, _ = _graph()
    s = diffusion.sample_sextets(graph.table, 200, torch.Generator().manual_seed(0))
    table = graph.table
    for i, j, k, ll, u, v, slot_j, slot_l in s.tolist():
        assert table[i, slot_j] == j and table[k, slot_l] == ll
        assert j in table[i].tolist() and ll in table[k].tolist()
        assert u != i and u not in table[i].tolist() and v != k and v not in table[k].tolist()


def test_subgraph_of_relevant_nodes_gives_the_full_graph_outputs() -> None:
    torch.manual_seed(0)
    graph, _ = _graph()
    net = DiffusionNet(graph.inputs.shape[1], [5, 3], dropout=0.0).eval()
    full = net(graph.inputs, graph.full())
    seeds = torch.tensor([3, 17, 40])
    nodes, adj = graph.subgraph(seeds, net.hops)
    assert len(nodes) < len(graph.inputs)  # the BFS did not need the whole graph
    assert torch.allclose(net(graph.inputs[nodes], adj)[:3], full[seeds], atol=1e-6)
    too_short_nodes, too_short = graph.subgraph(seeds, net.hops - 1)
    assert not torch.allclose(net(graph.inputs[too_short_nodes], too_short)[:3], full[seeds], atol=1e-6)


def test_batched_inference_equals_the_full_graph_forward() -> None:
    torch.manual_seed(0)
    graph, _ = _graph()
    net = DiffusionNet(graph.inputs.shape[1], [5, 3], dropout=0.3).eval()
    assert torch.allclose(diffusion.diffuse(net, graph, batch_size=7), net(graph.inputs, graph.full()), atol=1e-6)


def test_training_lowers_the_loss_and_keeps_clusters_together() -> None:
    x = clustered_vectors(25, 4, dim=8)
    x = normalise(x + 0.15 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    cfg = DiffusionConfig(k=6, anchors=6, anchor_neighbours=3, reduce=0, sizes=(16,), epochs=12, lr=1e-2,
                          sextets=32)
    fitted = diffusion.fit(x, cfg)
    assert fitted.losses[-1] < fitted.losses[0] - 0.02
    labels = np.repeat(np.arange(4), 25)
    rows, _ = exact_knn(fitted.features, 5)
    assert (labels[rows] == labels[:, None]).mean() > 0.95


def test_qfe_by_hand_once_and_twice() -> None:
    raw = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    out = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    q = np.array([[1.0, 0.2]], dtype=np.float32)
    unit_q = q / np.linalg.norm(q)
    s = normalise(raw) @ unit_q[0]  # cosines to the three indexed images; nearest two: 0 and 2
    expected = normalise(s[0] * out[0] + s[2] * out[2])
    once = diffusion.query_feature_expansion(q, raw, out, k=2)
    assert np.allclose(once, expected[None], atol=1e-6)
    s2 = out @ expected  # second round: cosines of the first h_q to the diffused index features
    top = np.argsort(-s2)[:2]
    twice = diffusion.query_feature_expansion(q, raw, out, k=2, rounds=2)
    assert np.allclose(twice, normalise(s2[top[0]] * out[top[0]] + s2[top[1]] * out[top[1]])[None], atol=1e-6)
    with pytest.raises(ValueError, match="rounds"):
        diffusion.query_feature_expansion(q, raw, out, k=2, rounds=3)


def test_fit_is_deterministic_by_seed() -> None:
    x = clustered_vectors(10, 3, dim=6)
    cfg = DiffusionConfig(k=4, anchors=4, anchor_neighbours=2, reduce=0, sizes=(8,), epochs=2, sextets=16)
    a, b = diffusion.fit(x, cfg), diffusion.fit(x, cfg)
    other = diffusion.fit(x, DiffusionConfig(**{**cfg.__dict__, "seed": 1}))
    assert np.array_equal(a.features, b.features) and a.losses == b.losses
    assert not np.allclose(a.features, other.features)


def test_config_refuses_unknown_choices() -> None:
    with pytest.raises(ValueError, match="coding"):
        DiffusionConfig(coding="dense")
    with pytest.raises(ValueError, match="output"):
        DiffusionConfig(output="mean")
