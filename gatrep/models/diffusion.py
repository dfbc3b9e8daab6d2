"""GRAD-Net graph diffusion: mutual k-NN + anchor graphs, first/second-order diffusion layers, sextet losses, QFE.

The method of `shared/seeds/003_57395f98739460cf.txt` (sections 3.4-3.7), unsupervised: features of the indexed
images are diffused over their mutual k-NN graph by trained Graph Diffusion layers, and an unseen query gets its
diffused feature from its nearest indexed images (query feature expansion, QFE). Training runs on mini-batches
of sextets (i, j, k, l, u, v); each batch's forward pass covers only the nodes its losses depend on (a hop-limited
BFS over the mutual graph, done by gatrep.sampling.sample), so a step costs the same whatever the size of the
graph. Inference runs layer by layer over batches of nodes, like gatrep.models.context_aware_latents.

Tables follow gatrep.vectors: a padded neighbour table [N, k] with PAD (-1) where there is no neighbour and NaN as
its similarity. Edges point neighbour -> node, as in gatrep.sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SimpleConv
from torch_geometric.utils import to_torch_csr_tensor

from gatrep import io, sampling, schemas
from gatrep.vectors import PAD, exact_topk, normalise

CODINGS = ("lae", "soft")
OUTPUTS = ("last", "concat")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """GRAD-Net's settings; defaults are the paper's (section 3.7) scaled down to run on a CPU (see each note)."""

    k: int = 15  # neighbours searched per image before the mutual filter (paper: 15)
    anchors: int = 32  # k-means anchors B of the bi-part graph (paper's toy set: 100)
    anchor_neighbours: int = 5  # s: nearest anchors each image is coded over
    coding: str = "lae"  # "lae": the paper's sparse coding (Eq. 9); "soft": Gaussian soft assignment
    anchor_sample: int = 20_000  # images k-means is fitted on (all when fewer)
    code_weight: float = 1.0  # the codes Z are scaled by this before concat(x, Z)
    # x enters the network as its first `reduce` principal components (0: all d dimensions). Not in the paper: the
    # first layer's cost is linear in the input width, and 128 components of a 1280-d backbone keep it CPU-sized.
    reduce: int = 128
    # Paper: (1024, 256, 128) on a GPU. One layer of 128 already reads 2 hops (the second-order term); on digits'
    # validation split it matched (256, 128) in mAP@10 at a quarter of the training time on a CPU.
    sizes: tuple[int, ...] = (128,)
    second_order: bool = True  # add the second-order operator S((SH) . H) W2 (Eq. 15) to every layer
    dropout: float = 0.3  # after every layer's L2 normalisation (paper: 0.3)
    negative_slope: float = 0.2  # LeakyReLU (the paper names LeakyReLU without its slope)
    output: str = "concat"  # "last": H(L); "concat": H(0) || H(1) || ... || H(L), each part unit length (Eq. 17)
    alpha: float = 1.0  # weight of the quadruplet order loss (Eq. 23; the paper's 1e5 is tuned to its features)
    weight_decay: float = 1e-5  # lambda: L2 penalty on every parameter (paper: 1e-5)
    lr: float = 1e-3  # Adam (paper: 3e-4 over 300 epochs; fewer epochs here)
    epochs: int = 10  # an epoch is N sextets, as in the paper
    sextets: int = 64  # sextets per mini-batch (paper: 64)
    fanout: int = -1  # neighbours followed per node and hop when finding a batch's relevant nodes (-1: all)
    qfe_k: int = 10  # QFE: nearest indexed images a query's feature is built from
    qfe_rounds: int = 1  # QFE applied once (raw-feature neighbours) or twice (then diffused-feature neighbours)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.coding not in CODINGS:
            raise ValueError(f"unknown anchor coding {self.coding!r}; choose one of {', '.join(CODINGS)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; choose one of {', '.join(OUTPUTS)}")
        if self.k < 1 or self.anchors < 1 or not 1 <= self.anchor_neighbours <= self.anchors or not self.sizes:
            raise ValueError("k, anchors and sizes need at least 1, and 1 <= anchor_neighbours <= anchors")
        if self.qfe_k < 1 or self.qfe_rounds not in (1, 2):
            raise ValueError("QFE needs qfe_k >= 1 and qfe_rounds 1 or 2")


# ----------------------------------------------------------------------------------------------
# Graphs: the local mutual k-NN graph (Eq. 8) and the global bi-part anchor graph (Eq. 9)


def mutual_knn(neighbours: Any, similarities: Any) -> tuple[Tensor, Tensor]:
    """(mutual table [N, m] int64, its affinities [N, m] float32) from a padded k-NN table and its similarities.

    Keeps j in row i only when i is also in row j (Eq. 8), in row i's order, mutual neighbours first and PAD
    after (NaN affinity); m is the largest mutual degree (at least 1). Affinities are the given similarities
    clamped at 0 (the transition S needs non-negative weights). Cost O(E log E) for E table slots: membership of
    each reversed edge is a sorted search, with no N x N matrix.
    """
    table = torch.tensor(np.asarray(neighbours), dtype=torch.long)  # copies: the arrays may be read-only
    sims = torch.tensor(np.asarray(similarities), dtype=torch.float32)
    n, k = table.shape
    rows = torch.arange(n).unsqueeze(1).expand_as(table)
    valid = table != PAD
    keys = torch.sort((rows * n + table)[valid]).values
    reverse = torch.where(valid, table * n + rows, -1)
    mutual = valid & torch.isin(reverse, keys)
    order = torch.sort((~mutual).to(torch.int8), dim=1, stable=True).indices
    width = max(1, int(mutual.sum(dim=1).max()) if n else 1)
    kept = mutual.gather(1, order)[:, :width]
    out = torch.where(kept, table.gather(1, order)[:, :width], PAD)
    weights = torch.where(kept, sims.gather(1, order)[:, :width].clamp(min=0.0), torch.nan)
    return out, weights


def transition(table: Tensor, affinities: Tensor) -> Tensor:
    """S = D^-1/2 A D^-1/2 (Eq. 2) in table form: [N, m] with s_ij = a_ij / sqrt(d_i d_j), NaN at PAD.

    Degrees come from the whole graph, so a sampled subgraph gathers the same S entries as the full graph.
    Computed on the table directly (PyG's gcn_norm works on an edge list and would need converting back)."""
    degree = torch.nan_to_num(affinities).sum(dim=1)
    inv = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    safe = table.clamp(min=0)
    return torch.where(table != PAD, affinities * inv.unsqueeze(1) * inv[safe], torch.nan)


def fit_anchors(x: Any, count: int, sample: int = 20_000, seed: int = 0) -> np.ndarray:
    """k-means anchors U [count, d] (sklearn MiniBatchKMeans) fitted on at most `sample` unit rows of x."""
    from sklearn.cluster import MiniBatchKMeans

    unit = normalise(x)
    if len(unit) > sample:
        unit = unit[np.random.default_rng(seed).choice(len(unit), sample, replace=False)]
    if count > len(unit):
        raise ValueError(f"{count} anchors need at least as many images, got {len(unit)}")
    kmeans = MiniBatchKMeans(count, random_state=seed, n_init=3, batch_size=2048)
    return np.asarray(kmeans.fit(unit).cluster_centers_, dtype=np.float32)


def anchor_codes(x: Any, anchors: Any, s: int, coding: str = "lae", iterations: int = 50) -> Tensor:
    """Z [N, B] float32 (dense; s non-zeros per row, each row summing to 1): each unit row of x over its s nearest
    anchors.

    "lae" solves the paper's Eq. 9, min ||x - U_s^T z||^2 with z >= 0, sum z = 1, over the s nearest anchors, by
    Nesterov-accelerated projected gradient (the Local Anchor Embedding of the paper's ref. [46]), batched for all
    rows at once; it starts from the "soft" codes, a Gaussian kernel on the distances with each row's mean squared
    distance as bandwidth (ref. [46]'s cheaper alternative). Dense storage: B is small (tens to hundreds), and
    concat(x, Z) is dense anyway."""
    if coding not in CODINGS:
        raise ValueError(f"unknown anchor coding {coding!r}; choose one of {', '.join(CODINGS)}")
    unit = torch.from_numpy(normalise(x))
    centres = torch.as_tensor(np.asarray(anchors, dtype=np.float32))
    distance = torch.cdist(unit, centres).square()
    near, slots = distance.topk(s, dim=1, largest=False)
    weights = torch.softmax(-near / near.mean(dim=1, keepdim=True).clamp(min=1e-12), dim=1)
    if coding == "lae":
        weights = _simplex_least_squares(unit, centres[slots], weights, iterations)
    return torch.zeros(len(unit), len(centres)).scatter_(1, slots, weights)


def _simplex_least_squares(x: Tensor, basis: Tensor, start: Tensor, iterations: int) -> Tensor:
    """argmin_z ||x - basis^T z||^2 over the simplex, for every row: x [N, d], basis [N, s, d], start [N, s]."""
    gram = basis @ basis.transpose(1, 2)  # [N, s, s]
    target = (basis @ x.unsqueeze(2)).squeeze(2)  # [N, s]
    step = 1.0 / torch.linalg.matrix_norm(gram, ord=2).clamp(min=1e-12).unsqueeze(1)
    z = previous = start
    for t in range(iterations):
        y = z + (t / (t + 3)) * (z - previous)
        gradient = (gram @ y.unsqueeze(2)).squeeze(2) - target
        previous, z = z, project_simplex(y - step * gradient)
    return z


def project_simplex(v: Tensor) -> Tensor:
    """Each row of v projected onto the probability simplex (Duchi et al. 2008, sort-based)."""
    u = v.sort(dim=1, descending=True).values
    cumulative = u.cumsum(dim=1) - 1
    index = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - cumulative / index) > 0).sum(dim=1, keepdim=True).clamp(min=1)
    theta = cumulative.gather(1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0)


def diffusion_inputs(x: Any, codes: Tensor, code_weight: float = 1.0) -> Tensor:
    """H(0) = concat(unit x, code_weight * Z) [N, d + B] (Eq. 10 with the paper's sparse codes appended)."""
    return torch.cat([torch.from_numpy(normalise(x)), code_weight * codes], dim=1)


# ----------------------------------------------------------------------------------------------
# The network (Eq. 16)


class DiffusionLayer(nn.Module):
    """One Graph Diffusion layer: LeakyReLU((I + S) H W1 + S((S H) . H) W2), then L2 normalisation and dropout.

    S comes as a sparse [n, n] matrix of target rows and source columns (`adjacency`); the I term adds the node
    itself. Propagation is PyG's SimpleConv (a weighted sum over in-edges, a sparse matmul on a CSR matrix: five
    times faster on a CPU than gathering an edge list); the second-order term has no PyG layer, so it is composed
    here from two propagations and an element-wise product (Eq. 15). W1 and W2 are applied before the outer
    propagation (the same linear map), so only S H is propagated at the input width."""

    def __init__(self, in_dim: int, out_dim: int, second_order: bool = True, dropout: float = 0.3,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        self.first = nn.Linear(in_dim, out_dim, bias=False)
        self.second = nn.Linear(in_dim, out_dim, bias=False) if second_order else None
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.spread = SimpleConv(aggr="sum")
        self.dropout = dropout
        self.negative_slope = negative_slope

    def forward(self, h: Tensor, adj: Tensor) -> Tensor:
        """Output rows [n, out_dim], unit length (zero rows stay zero), one per row of h."""
        hw = self.first(h)
        out = hw + self.spread(hw, adj) + self.bias
        if self.second is not None:
            out = out + self.spread(self.second(self.spread(h, adj) * h), adj)
        out = F.normalize(F.leaky_relu(out, self.negative_slope), dim=1)
        return F.dropout(out, p=self.dropout, training=self.training)


def adjacency(edge_index: Tensor, weight: Tensor, n: int) -> Tensor:
    """S of a subgraph as the sparse CSR [n, n] matrix (row = target, column = source) DiffusionLayer takes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")  # built valid
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return to_torch_csr_tensor(edge_index.flip(0), weight, (n, n))


class DiffusionNet(nn.Module):
    """GRAD-Net: Graph Diffusion layers of `sizes`; outputs H(L), or H(0) || ... || H(L) with each part unit length.

    A layer reads its node's 2-hop neighbourhood (the second-order term), so the output depends on 2L hops."""

    def __init__(self, in_dim: int, sizes: Sequence[int], second_order: bool = True, dropout: float = 0.3,
                 negative_slope: float = 0.2, output: str = "concat") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
        dims = [in_dim, *sizes]
        self.layers = nn.ModuleList(DiffusionLayer(a, b, second_order, dropout, negative_slope)
                                    for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.output = output

    @property
    def hops(self) -> int:
        """Hops of the graph one output row depends on."""
        return 2 * len(self.layers)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        """Diffused features, one row per row of x, over S given as `adjacency(edge_index, weight, len(x))`."""
        parts, h = [F.normalize(x, dim=1)], x
        for layer in self.layers:
            h = layer(h, adj)
            parts.append(h)
        return self.combine(parts)

    def combine(self, parts: Sequence[Tensor]) -> Tensor:
        """The output from [unit H(0), H(1), ..., H(L)]: the last, or all concatenated (scaled to unit length)."""
        if self.output == "last":
            return parts[-1]
        return torch.cat(list(parts), dim=1) / math.sqrt(len(parts))


def build_net(in_dim: int, cfg: DiffusionConfig) -> DiffusionNet:
    """A freshly initialised DiffusionNet for `cfg` (seed torch first for reproducibility)."""
    return DiffusionNet(in_dim, cfg.sizes, cfg.second_order, cfg.dropout, cfg.negative_slope, cfg.output)


# ----------------------------------------------------------------------------------------------
# Sextets and losses (Eqs. 19, 20, 23)


def sample_sextets(table: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """[count, 8]: node ids (i, j, k, l, u, v), then the table slots of j in row i and of l in row k.

    i, k uniform over nodes with at least one mutual neighbour; j, l uniform among i's and k's neighbours; u, v
    uniform over nodes that are neither the anchor nor one of its neighbours (section 3.7). Refuses a graph
    without edges."""
    valid = table != PAD
    degree = valid.sum(dim=1)
    candidates = torch.nonzero(degree > 0).squeeze(1)
    if candidates.numel() == 0:
        raise ValueError("the mutual k-NN graph has no edges: raise k")
    anchors = candidates[torch.randint(len(candidates), (2, count), generator=generator)]
    slots = (torch.rand((2, count), generator=generator) * degree[anchors]).long()  # valid slots come first
    positives = table[anchors, slots]
    negatives = torch.stack([_negative(table, a, generator) for a in anchors])
    return torch.stack([anchors[0], positives[0], anchors[1], positives[1], negatives[0], negatives[1],
                        slots[0], slots[1]], dim=1)


def _negative(table: Tensor, anchor: Tensor, generator: torch.Generator | None, tries: int = 8) -> Tensor:
    """A node per anchor that is not the anchor nor in its row (re-drawn up to `tries` times)."""
    n = len(table)
    out = torch.randint(n, anchor.shape, generator=generator)
    for _ in range(tries):
        bad = (out == anchor) | (table[anchor] == out.unsqueeze(1)).any(dim=1)
        if not bad.any():
            break
        out = torch.where(bad, torch.randint(n, anchor.shape, generator=generator), out)
    return out


def bpr_loss(h_i: Tensor, h_j: Tensor, h_u: Tensor) -> Tensor:
    """Eq. 19 per triplet: -ln sigmoid(s_ij - s_iu), s the cosine similarity (Eq. 18); shape [B]."""
    return -F.logsigmoid(F.cosine_similarity(h_i, h_j) - F.cosine_similarity(h_i, h_u))


def order_loss(h: Sequence[Tensor], a_ij: Tensor, a_kl: Tensor) -> Tensor:
    """Eq. 20 per quadruplet (h_i, h_j, h_k, h_l): ln(1 + a_ij a_kl s_ki s_li (s_ki - s_lj)^2); shape [B].

    The weight a_ij a_kl s_ki s_li is clamped at 0 (with cosines it can be negative, and ln(1 + x) is undefined
    below x = -1) and detached: the term asks cross-pair similarities to agree, not to vanish."""
    h_i, h_j, h_k, h_l = h
    s_ki, s_li, s_lj = (F.cosine_similarity(a, b) for a, b in ((h_k, h_i), (h_l, h_i), (h_l, h_j)))
    weight = (a_ij * a_kl * s_ki * s_li).clamp(min=0).detach()
    return torch.log1p(weight * (s_ki - s_lj).square())


def sextet_loss(h: Tensor, a_ij: Tensor, a_kl: Tensor, alpha: float) -> Tensor:
    """Eq. 23 without the L2 term: mean over the batch of BPR(i, j, u) + BPR(k, l, v) + alpha * order(i, j, k, l).

    `h` is [B, 6, D] (the features of i, j, k, l, u, v). The paper's prose swaps the names "local" and "global"
    between Eqs. 19/20 and 23; the formulas are followed: BPR on the two triplets, the order term on the
    quadruplet, weighted by alpha."""
    h_i, h_j, h_k, h_l, h_u, h_v = h.unbind(dim=1)
    order = order_loss((h_i, h_j, h_k, h_l), a_ij, a_kl)
    return (bpr_loss(h_i, h_j, h_u) + bpr_loss(h_k, h_l, h_v) + alpha * order).mean()


# ----------------------------------------------------------------------------------------------
# Training on sampled subgraphs, inference in batches


@dataclasses.dataclass
class Graph:
    """What the network runs over: inputs H(0) [N, d + B], the mutual table [N, m], its affinities and S."""

    inputs: Tensor
    table: Tensor
    affinities: Tensor
    weights: Tensor  # S in table form

    def subgraph(self, seeds: Tensor, hops: int, fanout: int = -1,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(global node ids, S over them as `adjacency`) of the `hops`-hop BFS around distinct `seeds` (first in
        the node list), following at most `fanout` neighbours per node and hop (-1: all)."""
        out = sampling.sample(self.table, seeds, [fanout] * hops, generator)
        weight = self.weights.reshape(-1)[out.edge]
        return out.node, adjacency(torch.stack([out.row, out.col]), weight, len(out.node))

    def full(self) -> Tensor:
        """S of the whole graph as `adjacency` (for checks on small graphs: inference goes by `diffuse`)."""
        return adjacency(sampling.edge_index_of(self.table), self.weights[self.table != PAD], len(self.table))


def build_graph(x: Any, neighbours: Any, similarities: Any, anchors: Any, cfg: DiffusionConfig) -> Graph:
    """The Graph of images x [N, d] given their k-NN table and similarities and the anchors U [B, d]."""
    table, affinities = mutual_knn(neighbours, similarities)
    codes = anchor_codes(x, anchors, cfg.anchor_neighbours, cfg.coding)
    return Graph(diffusion_inputs(x, codes, cfg.code_weight), table, affinities, transition(table, affinities))


def batch_loss(net: nn.Module, graph: Graph, cfg: DiffusionConfig, generator: torch.Generator,
               device: torch.device | str = "cpu") -> Tensor:
    """The loss (with the L2 term) of one batch of cfg.sextets sextets drawn by `generator`, computed over their
    BFS subgraph on `device`. `net` may be a DiffusionNet or one wrapped by DDP (the gradients are then averaged)."""
    module: Any = getattr(net, "module", net)
    sextets = sample_sextets(graph.table, cfg.sextets, generator)
    seeds, local = torch.unique(sextets[:, :6], return_inverse=True)
    nodes, adj = graph.subgraph(seeds, module.hops, cfg.fanout, generator)
    h = net(graph.inputs[nodes].to(device), adj.to(device))[local.to(device)]  # seeds keep local ids 0..len-1
    a_ij = graph.affinities[sextets[:, 0], sextets[:, 6]].to(device)
    a_kl = graph.affinities[sextets[:, 2], sextets[:, 7]].to(device)
    loss = sextet_loss(h, a_ij, a_kl, cfg.alpha)
    return loss + cfg.weight_decay * sum(p.square().sum() for p in net.parameters())


def train_step(net: nn.Module, graph: Graph, optimizer: torch.optim.Optimizer, cfg: DiffusionConfig,
               generator: torch.Generator, device: torch.device | str = "cpu") -> float:
    """One Adam step on a batch of cfg.sextets sextets; returns the loss (with the L2 term)."""
    loss = batch_loss(net, graph, cfg, generator, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def steps_per_epoch(n: int, sextets: int, workers: int = 1) -> int:
    """Steps of each of `workers` that together draw about N sextets, an epoch (section 3.7); at least 1."""
    return max(1, math.ceil(n / (sextets * workers)))


def train(graph: Graph, cfg: DiffusionConfig, log: Callable[[int, float], None] | None = None) -> tuple[
        DiffusionNet, list[float]]:
    """(trained net in eval mode, mean loss of each epoch); an epoch is N sextets (section 3.7). Seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    net = build_net(graph.inputs.shape[1], cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps = steps_per_epoch(len(graph.inputs), cfg.sextets)
    losses = []
    net.train()
    for epoch in range(cfg.epochs):
        losses.append(float(np.mean([train_step(net, graph, optimizer, cfg, generator) for _ in range(steps)])))
        if log is not None:
            log(epoch, losses[-1])
    return net.eval(), losses


@torch.no_grad()
def diffuse(net: DiffusionNet, graph: Graph, batch_size: int = 4096) -> Tensor:
    """The diffused features [N, D] of every node, layer by layer over batches of `batch_size` target nodes.

    Each layer runs on a batch with its full 2-hop neighbourhood and keeps its output on the CPU for the next
    layer, so no forward pass holds the whole graph; equals `net(inputs, S of the whole graph)` up to rounding."""
    net.eval()
    n = len(graph.inputs)
    parts = [F.normalize(graph.inputs, dim=1)]
    h = graph.inputs
    for layer in net.layers:
        outputs = []
        for start in range(0, n, batch_size):
            targets = torch.arange(start, min(start + batch_size, n))
            nodes, adj = graph.subgraph(targets, 2)
            outputs.append(layer(h[nodes], adj)[:len(targets)])
        h = torch.cat(outputs)
        parts.append(h)
    return net.combine(parts)


# ----------------------------------------------------------------------------------------------
# Query feature expansion (Eq. 22)


def query_feature_expansion(queries: Any, index_raw: Any, index_out: Any, k: int = 10, rounds: int = 1) -> np.ndarray:
    """Unit diffused features [Q, D] of unseen queries: h_q = sum over the query's k nearest indexed images x
    (by cosine of raw features) of s_qx h_x (Eq. 22). With rounds=2 the expansion is repeated from the k nearest
    by cosine of the first round's h_q to the diffused index features (section 5.3). Negative s_qx count 0."""
    if rounds not in (1, 2) or k < 1:
        raise ValueError(f"QFE needs k >= 1 and rounds 1 or 2, not k={k}, rounds={rounds}")
    out = normalise(np.asarray(index_out, dtype=np.float32))
    h = _expand(normalise(queries), normalise(index_raw), out, k)
    return _expand(h, out, out, k) if rounds == 2 else h


def _expand(unit_queries: np.ndarray, unit_index: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    rows, sims = exact_topk(unit_queries, unit_index, k)
    weight = np.where(rows == PAD, 0.0, np.clip(np.nan_to_num(sims), 0.0, None)).astype(np.float32)
    return normalise(np.einsum("qk,qkd->qd", weight, features[np.where(rows == PAD, 0, rows)]))


# ----------------------------------------------------------------------------------------------
# The whole method on one collection


def principal_components(x: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """The first `count` principal components of the rows of x [N, count] (sklearn's randomized PCA)."""
    return fit_projection(x, count, seed).apply(x)


@dataclasses.dataclass(frozen=True)
class Projection:
    """A fitted PCA: rows x map to (x - mean) @ components.T (sklearn's PCA.transform, kept as two arrays)."""

    mean: np.ndarray  # [d]
    components: np.ndarray  # [count, d]

    def apply(self, x: Any) -> np.ndarray:
        """The projected rows [N, count] of x [N, d]."""
        return np.asarray((np.asarray(x, dtype=np.float32) - self.mean) @ self.components.T, dtype=np.float32)


def fit_projection(x: np.ndarray, count: int, seed: int = 0) -> Projection:
    """The first `count` principal directions of the rows of x (sklearn's randomized PCA, seeded)."""
    from sklearn.decomposition import PCA

    pca = PCA(count, svd_solver="randomized", random_state=seed).fit(x)
    return Projection(np.asarray(pca.mean_, dtype=np.float32), np.asarray(pca.components_, dtype=np.float32))


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What GRAD-Net fits before training and keeps with its weights: the PCA (None when cfg.reduce keeps every
    dimension) and the k-means anchors U [B, reduce or d]."""

    projection: Projection | None
    anchors: np.ndarray

    def inputs(self, x: Any) -> np.ndarray:
        """The rows the anchors and the network see: unit x, projected when there is a PCA."""
        raw = normalise(x)
        return raw if self.projection is None else self.projection.apply(raw)


def fit_inputs(x: Any, cfg: DiffusionConfig) -> Fitted:
    """The PCA of the unit rows of x (when 0 < cfg.reduce < d) and the anchors fitted on the projected rows."""
    raw = normalise(x)
    projection = fit_projection(raw, cfg.reduce, cfg.seed) if 0 < cfg.reduce < raw.shape[1] else None
    inputs = raw if projection is None else projection.apply(raw)
    return Fitted(projection, fit_anchors(inputs, cfg.anchors, cfg.anchor_sample, cfg.seed))


def prepare(x: Any, neighbours: Any, similarities: Any, cfg: DiffusionConfig,
            fitted: Fitted | None = None) -> tuple[Fitted, Graph]:
    """(the PCA and anchors, the Graph) of images x [N, d] and their k-NN table; `fitted` (e.g. from a checkpoint)
    is used instead of fitting them again."""
    fitted = fitted or fit_inputs(x, cfg)
    return fitted, build_graph(fitted.inputs(x), neighbours, similarities, fitted.anchors, cfg)


# ----------------------------------------------------------------------------------------------
# Saved models: weights, config, PCA and anchors in one directory


FORMAT = "gatrep.grad_net/1"


@dataclasses.dataclass
class GradNet:
    """A saved GRAD-Net: its config, network (eval mode, CPU), PCA and anchors, and the rest of config.json."""

    config: DiffusionConfig
    net: DiffusionNet
    fitted: Fitted
    document: dict[str, Any]


def config_from_dict(values: dict[str, Any]) -> DiffusionConfig:
    """DiffusionConfig from its JSON form (lists back to tuples)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return DiffusionConfig(**fields)


def save_grad_net(dir_uri: str, net: nn.Module, cfg: DiffusionConfig, fitted: Fitted,
                  extra: dict[str, Any] | None = None) -> list[str]:
    """Write model.safetensors (the weights as "net.*", "anchors", and "pca.mean", "pca.components" when there is
    a PCA) and config.json (format, the DiffusionConfig as "model", the network's input width, `extra`) into
    `dir_uri`; returns their URIs. A DDP-wrapped net is unwrapped; tensors are copied to the CPU."""
    module: Any = getattr(net, "module", net)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors["anchors"] = torch.tensor(np.asarray(fitted.anchors, dtype=np.float32))
    if fitted.projection is not None:
        tensors["pca.mean"] = torch.tensor(fitted.projection.mean)
        tensors["pca.components"] = torch.tensor(fitted.projection.components)
    in_dim = module.layers[0].first.in_features
    document = {"format": FORMAT, "model": dataclasses.asdict(cfg), "in_dim": in_dim, **(extra or {})}
    fs, path = io.url_to_fs(dir_uri)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(posixpath.join(path, schemas.WEIGHTS_FILE), safetensors.torch.save(tensors))
    fs.pipe_file(posixpath.join(path, schemas.CONFIG_FILE), json.dumps(document, indent=2, sort_keys=True).encode())
    return [io.join(dir_uri, schemas.WEIGHTS_FILE), io.join(dir_uri, schemas.CONFIG_FILE)]


def load_grad_net(dir_uri: str) -> GradNet:
    """The GradNet saved in `dir_uri` by save_grad_net. Raises ModelLoadError when a file is missing or unreadable,
    is not a GRAD-Net, or its weights do not fit its config."""
    from gatrep.models import ModelLoadError, check_weights

    weights_uri, config_uri = io.join(dir_uri, schemas.WEIGHTS_FILE), io.join(dir_uri, schemas.CONFIG_FILE)
    fs, _ = io.url_to_fs(dir_uri)
    try:
        document = json.loads(fs.cat_file(io.url_to_fs(config_uri)[1]))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, not {FORMAT!r}")
        cfg = config_from_dict(document["model"])
        tensors = safetensors.torch.load(fs.cat_file(io.url_to_fs(weights_uri)[1]))
    except FileNotFoundError as err:
        raise ModelLoadError(f"{dir_uri}: {err}; train one first (python -m jobs.train --objective grad-net)") from err
    except Exception as err:  # JSON, safetensors and config errors alike: the directory holds no GRAD-Net
        raise ModelLoadError(f"{dir_uri}: not a readable GRAD-Net model ({err})") from err
    net = build_net(int(document["in_dim"]), cfg)
    weights = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
    check_weights(net, weights, f"{weights_uri} vs {config_uri}")
    net.load_state_dict(weights)
    projection = None
    if "pca.mean" in tensors:
        projection = Projection(tensors["pca.mean"].numpy(), tensors["pca.components"].numpy())
    return GradNet(cfg, net.eval(), Fitted(projection, tensors["anchors"].numpy()), document)


# ----------------------------------------------------------------------------------------------
# The whole method on one collection


@dataclasses.dataclass
class Diffusion:
    """A fitted GRAD-Net over one collection: its config, anchors, network, graph and diffused index features."""

    config: DiffusionConfig
    anchors: np.ndarray
    net: DiffusionNet
    graph: Graph
    features: np.ndarray  # diffused features of the indexed images [N, D], unit rows
    raw: np.ndarray  # unit raw features of the indexed images [N, d] (QFE searches them)
    losses: list[float]
    projection: Projection | None = None  # the PCA the inputs went through (None: all dimensions)

    def query_features(self, queries: Any) -> np.ndarray:
        """Diffused features [Q, D] of unseen queries by QFE (config.qfe_k, config.qfe_rounds)."""
        return query_feature_expansion(queries, self.raw, self.features, self.config.qfe_k, self.config.qfe_rounds)


def fit(x: Any, cfg: DiffusionConfig, neighbours: Any = None, similarities: Any = None,
        log: Callable[[int, float], None] | None = None) -> Diffusion:
    """GRAD-Net fitted on the images x [N, d]: k-NN table (exact, unless `neighbours`/`similarities` are given),
    PCA and anchors, mutual graph, training, then the diffused features of every image."""
    from gatrep.vectors import exact_knn

    raw = normalise(x)
    if neighbours is None or similarities is None:
        neighbours, similarities = exact_knn(raw, cfg.k)
    fitted, graph = prepare(raw, neighbours, similarities, cfg)
    net, losses = train(graph, cfg, log)
    features = normalise(diffuse(net, graph).numpy())
    return Diffusion(cfg, fitted.anchors, net, graph, features, raw, losses, fitted.projection)
