"""Listing and category representatives (centroid, most central, degree), z-scores, top-k, category discovery."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gatrep.vectors import approximate_knn, block_rows, exact_knn, group_rows, normalise, row_chunks

# Rows per chunk of the O(n*d) passes: bounds the float64 copies made for exact sums.
ROW_CHUNK = 65_536


@dataclasses.dataclass(frozen=True)
class Representative:
    """The representative of one group of vectors (a listing or a category).

    `vector` is the representative model; `index` the position (in the group) of the representative image;
    `centrality[i]` how central image i is under `method`; `zscores` standardise it within the group;
    `top` the positions of the most central images, most central first.
    """

    method: str
    vector: np.ndarray
    index: int
    centrality: np.ndarray
    zscores: np.ndarray
    top: np.ndarray

    @property
    def zscore(self) -> float:
        """How exceptional the representative image is within its group (Remark 1)."""
        return float(self.zscores[self.index])


@dataclasses.dataclass(frozen=True)
class GroupRepresentatives:
    """One representative per group of a table's rows; row positions refer to the input table.

    `groups[g]` is the group label, `vectors[g]` its representative, `index[g]` the row of its representative
    image, `zscore[g]` that image's z-score, `top[g]` the rows of its most central images, `sizes[g]` its row
    count; `centrality` and `zscores` are per input row, within the row's group.
    """

    method: str
    groups: np.ndarray
    vectors: np.ndarray
    index: np.ndarray
    zscore: np.ndarray
    top: list[np.ndarray]
    sizes: np.ndarray
    centrality: np.ndarray
    zscores: np.ndarray


# ----------------------------------------------------------------------------------------------
# Basic pieces


def as_matrix(vectors: Any, what: str = "vectors") -> np.ndarray:
    """`vectors` as a float32 [n, d] array; refuses other ranks, empty groups and non-finite values."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty [n, d] matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: contains NaN or infinite values; re-embed or drop those rows")
    return array


def zscores(values: np.ndarray) -> np.ndarray:
    """(values - mean) / std with the population std; all zeros when every value is equal (nothing stands out)."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, float(np.abs(values).max())):
        return np.zeros_like(values)
    return (values - values.mean()) / std


def top_indices(scores: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Positions of the k largest `scores`, largest first, in O(n + c log c) for c candidates.

    Ties are broken by the larger `tiebreak`, then by the smaller position, so the order is exact and
    deterministic (no arbitrary choice at the k-th place). Returns min(k, n) positions; refuses k < 1.
    """
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    scores = np.asarray(scores)
    n = scores.shape[0]
    candidates = np.arange(n)
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        candidates = np.flatnonzero(scores >= kth)
    keys: list[np.ndarray] = [candidates]
    if tiebreak is not None:
        keys.append(-np.asarray(tiebreak)[candidates])
    keys.append(-scores[candidates])
    return candidates[np.lexsort(keys)][:k]


def total_similarity(unit: np.ndarray) -> np.ndarray:
    """Σ_{j≠i} cos(z_i, z_j) for every row of the unit-norm matrix `unit`, in O(n*d) time and O(chunk*d) memory.

    For unit vectors Σ_j z_i·z_j = z_i · Σ_j z_j (ARCHITECTURE.md), minus z_i·z_i for the image itself (1, or 0
    for an all-zero row). Sums are exact float64 so a listing of a million images keeps its ordering.
    """
    total = np.zeros(unit.shape[1], dtype=np.float64)
    for rows in row_chunks(unit.shape[0], ROW_CHUNK):
        total += unit[rows].sum(axis=0, dtype=np.float64)
    centrality = np.empty(unit.shape[0], dtype=np.float64)
    for rows in row_chunks(unit.shape[0], ROW_CHUNK):
        block = unit[rows].astype(np.float64)
        centrality[rows] = block @ total - np.einsum("ij,ij->i", block, block)
    return centrality


# ----------------------------------------------------------------------------------------------
# One group


def most_central(vectors: Any, top_k: int = 5) -> Representative:
    """Approach I: the image with the highest total cosine similarity to the others, in O(n*d).

    Returns the image's own vector as the representative, every image's total similarity as its centrality,
    their z-scores and the top-k most central images (Remark 1). Refuses empty or non-finite input.
    """
    array = as_matrix(vectors)
    centrality = total_similarity(normalise(array))
    top = top_indices(centrality, top_k)
    return Representative("most_central", array[top[0]].copy(), int(top[0]), centrality, zscores(centrality), top)


def centroid(vectors: Any, top_k: int = 5) -> Representative:
    """Approach II / Experiment 1: the mean of the group's vectors as the representative, in O(n*d).

    The mean is of the vectors as given (the paper averages the latents, not their unit versions). The
    representative image is the one with the highest cosine to the mean; centrality is that cosine.
    Refuses empty or non-finite input.
    """
    array = as_matrix(vectors)
    mean = np.zeros(array.shape[1], dtype=np.float64)
    for rows in row_chunks(array.shape[0], ROW_CHUNK):
        mean += array[rows].sum(axis=0, dtype=np.float64)
    mean /= array.shape[0]
    direction = normalise(mean[None, :])[0].astype(np.float64)
    centrality = np.empty(array.shape[0], dtype=np.float64)
    unit = normalise(array)
    for rows in row_chunks(array.shape[0], ROW_CHUNK):
        centrality[rows] = unit[rows].astype(np.float64) @ direction
    top = top_indices(centrality, top_k)
    return Representative("centroid", mean.astype(np.float32), int(top[0]), centrality, zscores(centrality), top)


def degree(vectors: Any, threshold: float, top_k: int = 5, exact_max: int = 20_000,
           neighbours: np.ndarray | None = None, similarities: np.ndarray | None = None,
           n_neighbors: int = 30, seed: int = 0) -> Representative:
    """End of IV-A: degree centrality on the graph with an edge i-j wherever cos(z_i, z_j) > threshold.

    Up to `exact_max` images the degree is exact: the similarity matrix is computed in blocks of rows,
    O(n²d) time and O(block*n) memory, and never held whole. Above it the degree is approximated from a
    k-NN graph: each image counts how many images list it among their k nearest neighbours with similarity
    > threshold (in-degree). Over an exact k-NN graph that equals the degree when no image has more than k
    neighbours above the threshold, and undercounts otherwise (never overcounts); pynndescent's graph is
    itself approximate. A given (`neighbours`, `similarities`) table, e.g. the `graph` stage's, is used
    instead of building one.
    Ties in degree go to the higher total similarity. Returns the representative image's vector.
    """
    array = as_matrix(vectors)
    unit = normalise(array)
    n = unit.shape[0]
    if neighbours is not None:
        if similarities is None or neighbours.shape != similarities.shape or neighbours.shape[0] != n:
            raise ValueError("degree: neighbours and similarities must both be [n, k] tables over the same images")
        counts = in_degree(neighbours, similarities, threshold)
    elif n <= exact_max:
        counts = count_above(unit, threshold)
    else:
        neighbours, similarities = nearest_neighbours(unit, n_neighbors, exact_max=0, seed=seed)
        counts = in_degree(neighbours, similarities, threshold)
    centrality = counts.astype(np.float64)
    top = top_indices(centrality, top_k, tiebreak=total_similarity(unit))
    return Representative("degree", array[top[0]].copy(), int(top[0]), centrality, zscores(centrality), top)


# The registry of representative methods (config.py validates --method against it).
METHODS: dict[str, Callable[..., Representative]] = {"most_central": most_central, "centroid": centroid,
                                                     "degree": degree}


def represent(vectors: Any, method: str, top_k: int = 5, **degree_options: Any) -> Representative:
    """The representative of one group by `method` (see METHODS); refuses an unknown method by name."""
    if method not in METHODS:
        raise ValueError(f"unknown representative method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](vectors, top_k=top_k, **degree_options)


# ----------------------------------------------------------------------------------------------
# Chunked n*n helpers (never a dense n*n matrix)


def count_above(unit: np.ndarray, threshold: float) -> np.ndarray:
    """#{j ≠ i : cos(z_i, z_j) > threshold} for every row of `unit`, exactly, in blocks of rows."""
    n = unit.shape[0]
    counts = np.empty(n, dtype=np.int64)
    for rows in row_chunks(n, block_rows(n)):
        block = unit[rows] @ unit.T
        self_above = np.einsum("ij,ij->i", unit[rows], unit[rows]) > threshold
        counts[rows] = (block > threshold).sum(axis=1) - self_above
    return counts


def in_degree(neighbours: np.ndarray, similarities: np.ndarray, threshold: float) -> np.ndarray:
    """How many rows list each node among their neighbours with similarity > threshold (-1 padding and
    self-loops ignored)."""
    n = neighbours.shape[0]
    source = np.broadcast_to(np.arange(n)[:, None], neighbours.shape)
    keep = (neighbours >= 0) & (neighbours != source) & (similarities > threshold)
    return np.bincount(neighbours[keep].astype(np.int64), minlength=n)


def pairs_above(unit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with cos(z_i, z_j) >= threshold as (rows, cols, similarities), exactly, in blocks."""
    n = unit.shape[0]
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for rows in row_chunks(n, block_rows(n)):
        block = unit[rows] @ unit.T
        i, j = np.nonzero(block >= threshold)
        i_global = i + rows.start
        upper = j > i_global
        found.append((i_global[upper], j[upper], block[i[upper], j[upper]]))
    return _concat_pairs(found)


def _concat_pairs(found: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return (np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]),
            np.concatenate([f[2] for f in found]))


def nearest_neighbours(unit: np.ndarray, k: int, exact_max: int = 20_000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine: exact up to `exact_max` rows, pynndescent above.

    Returns ([n, k] ids, [n, k] cosines), PAD / NaN padded. The pynndescent graph is approximate.
    """
    if unit.shape[0] <= exact_max or unit.shape[0] <= k + 1:
        return exact_knn(unit, k)
    return approximate_knn(unit, k, seed=seed)


# ----------------------------------------------------------------------------------------------
# A whole table: one representative per group


def represent_groups(vectors: Any, groups: Any, method: str, top_k: int = 5,
                     **degree_options: Any) -> GroupRepresentatives:
    """The representative of every group of rows (listings or categories), one group at a time.

    Each group is handled by `represent`, so memory is that of the largest group's vectors and no n*n
    matrix is built (degree: see `degree`). Refuses a row count that differs from the label count.
    """
    if "neighbours" in degree_options or "similarities" in degree_options:
        raise ValueError("represent_groups: a neighbour table is per group; call degree() on each group instead")
    array = as_matrix(vectors)
    labels, members = group_rows(groups)
    if sum(m.size for m in members) != array.shape[0]:
        raise ValueError(f"{array.shape[0]} vectors but {sum(m.size for m in members)} group labels")
    reps = np.empty((labels.size, array.shape[1]), dtype=np.float32)
    index = np.empty(labels.size, dtype=np.int64)
    zscore = np.empty(labels.size, dtype=np.float64)
    centrality = np.empty(array.shape[0], dtype=np.float64)
    row_z = np.empty(array.shape[0], dtype=np.float64)
    top = []
    for g, rows in enumerate(members):
        rep = represent(array[rows], method, top_k, **degree_options)
        reps[g], index[g], zscore[g] = rep.vector, rows[rep.index], rep.zscore
        centrality[rows], row_z[rows] = rep.centrality, rep.zscores
        top.append(rows[rep.top])
    sizes = np.array([m.size for m in members], dtype=np.int64)
    return GroupRepresentatives(method, labels, reps, index, zscore, top, sizes, centrality, row_z)


def nearest_members(vectors: Any, groups: Any, targets: Any) -> np.ndarray:
    """For each group (in sorted label order, as `group_rows` gives them), the row of its member with the highest
    cosine to `targets[g]`: the image that stands for a representative learned rather than chosen among the
    images (a class node's embedding). O(n*d); refuses a target count other than the group count."""
    array = as_matrix(vectors)
    labels, members = group_rows(groups)
    wanted = as_matrix(targets, "targets")
    if wanted.shape != (labels.size, array.shape[1]):
        raise ValueError(f"{labels.size} groups of {array.shape[1]}-d vectors but targets of shape {wanted.shape}")
    unit = normalise(wanted)
    return np.array([rows[int(np.argmax(normalise(array[rows]) @ unit[g]))] for g, rows in enumerate(members)],
                    dtype=np.int64)


# How a category's several representatives are chosen (`--central`): its top-m most central images, or the most
# central image of each of m K-Means clusters inside it (a category of several looks keeps one of each).
CENTRAL = ("top", "kmeans")


def cluster_centres(vectors: Any, m: int, seed: int = 0, sample: int = 20_000) -> np.ndarray:
    """Positions of m representatives of one group: the most central image (highest total cosine, as in
    `most_central`) of each of min(m, n) K-Means clusters of its unit vectors, ordered by cluster size, largest
    first. K-Means is fitted on at most `sample` rows, so its cost stops growing with the group; every row is
    then assigned to its nearest centre. Refuses m < 1."""
    if m < 1:
        raise ValueError(f"cluster_centres needs m >= 1, got {m}")
    from sklearn.cluster import KMeans

    unit = normalise(as_matrix(vectors))
    n = unit.shape[0]
    if m >= n:
        return np.arange(n)
    fit_rows = np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False)
    model = KMeans(n_clusters=m, n_init=3, random_state=seed).fit(unit[fit_rows])
    labels = model.predict(unit)
    _, members = group_rows(labels)
    order = np.argsort([-rows.size for rows in members], kind="stable")
    return np.array([members[c][int(np.argmax(total_similarity(unit[members[c]])))] for c in order], dtype=np.int64)


def central_images(vectors: Any, groups: Any, m: int, how: str = "top", seed: int = 0) -> list[np.ndarray]:
    """Rows of each group's m representatives, in `group_rows` order: its top-m most central images ("top") or the
    centres of m K-Means clusters inside it ("kmeans", see `cluster_centres`). Refuses an unknown `how`."""
    if how not in CENTRAL:
        raise ValueError(f"unknown central method {how!r}; choose one of {', '.join(CENTRAL)}")
    if how == "top":
        return represent_groups(vectors, groups, "most_central", m).top
    array = as_matrix(vectors)
    return [rows[cluster_centres(array[rows], m, seed)] for rows in group_rows(groups)[1]]


# ----------------------------------------------------------------------------------------------
# Categories from listing representatives (Case 1 of III-A2)


def discover_categories(representatives: Any, method: str, threshold: float = 0.8, n_clusters: int = 0,
                        eps: float = 0.2, min_samples: int = 2, exact_max: int = 20_000, n_neighbors: int = 30,
                        seed: int = 0) -> np.ndarray:
    """A category number (0, 1, ... in order of first listing) for every listing representative (see DISCOVERY).

    Refuses an unknown method, and for kmeans n_clusters outside [1, n].
    """
    unit = normalise(as_matrix(representatives, "listing representatives"))
    if method not in DISCOVERY:
        raise ValueError(f"unknown category discovery {method!r}; choose one of {', '.join(DISCOVERY)}")
    options = {"threshold": threshold, "n_clusters": n_clusters, "eps": eps, "min_samples": min_samples,
               "exact_max": exact_max, "n_neighbors": n_neighbors, "seed": seed}
    return first_seen_order(DISCOVERY[method](unit, **options))


def threshold_components(unit: np.ndarray, threshold: float, exact_max: int, n_neighbors: int, seed: int,
                         **_: Any) -> np.ndarray:
    """Listings whose representatives have cosine >= threshold share a category, transitively (connected
    components; exact pairs up to `exact_max` listings, a pynndescent k-NN graph above, which can miss pairs
    beyond the k nearest)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = unit.shape[0]
    if n <= exact_max:
        rows, cols = pairs_above(unit, threshold)[:2]
    else:
        ids, sims = nearest_neighbours(unit, n_neighbors, exact_max=0, seed=seed)
        keep = (ids >= 0) & (sims >= threshold)
        rows, cols = np.nonzero(keep)[0], ids[keep]
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def kmeans(unit: np.ndarray, n_clusters: int, seed: int, **_: Any) -> np.ndarray:
    """K-Means with `n_clusters` on unit vectors (a spherical approximation of cosine)."""
    from sklearn.cluster import KMeans

    if not 1 <= n_clusters <= unit.shape[0]:
        raise ValueError(f"kmeans needs 1 <= n_clusters <= {unit.shape[0]} listings, got {n_clusters}")
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(unit).labels_


def dbscan(unit: np.ndarray, eps: float, min_samples: int, **_: Any) -> np.ndarray:
    """DBSCAN with cosine distance `eps`; each noise listing becomes its own category so every listing keeps one."""
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit(unit).labels_
    noise = labels < 0
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    return labels


# The registry of category discovery methods (Case 1 of III-A2; config.py validates --categories against it).
DISCOVERY: dict[str, Callable[..., np.ndarray]] = {"threshold": threshold_components, "kmeans": kmeans,
                                                   "dbscan": dbscan}


def first_seen_order(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in order of first appearance, so results do not depend on the algorithm's
    arbitrary numbering."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


# ----------------------------------------------------------------------------------------------
# Listing-to-listing similarity and merge suggestions (Experiment IV-A2)


def similarity_matrix(representatives: Any, max_listings: int = 2000) -> np.ndarray:
    """The dense cosine matrix of listing representatives, as printed in Experiment IV-A2.

    Refuses more than `max_listings` rows: use `listing_pairs`, which stays sparse.
    """
    unit = normalise(as_matrix(representatives, "listing representatives"))
    if unit.shape[0] > max_listings:
        raise ValueError(f"{unit.shape[0]} listings > max_listings={max_listings}: use listing_pairs instead")
    return unit @ unit.T


def listing_pairs(representatives: Any, max_dense: int = 2000, neighbours: int = 10, exact_max: int = 20_000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Listing pairs (a < b) with the cosine of their representatives, as (a, b, similarity).

    Every pair when there are at most `max_dense` listings; above that, each listing with its `neighbours`
    most similar listings (exact up to `exact_max`, pynndescent above), each pair once.
    """
    unit = normalise(as_matrix(representatives, "listing representatives"))
    n = unit.shape[0]
    if n <= max_dense:
        a, b = np.triu_indices(n, k=1)
        return a.astype(np.int64), b.astype(np.int64), np.einsum("ij,ij->i", unit[a], unit[b])
    ids, sims = nearest_neighbours(unit, neighbours, exact_max=exact_max, seed=seed)
    keep = ids >= 0
    rows, cols, values = np.nonzero(keep)[0], ids[keep], sims[keep]
    a, b = np.minimum(rows, cols), np.maximum(rows, cols)
    _, unique = np.unique(a * n + b, return_index=True)
    return a[unique], b[unique], values[unique]


def merge_suggestions(a: np.ndarray, b: np.ndarray, similarity: np.ndarray,
                      threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs whose representatives have cosine >= threshold, most similar first: listings that could be
    merged into one category (Experiment IV-A2)."""
    keep = np.flatnonzero(similarity >= threshold)
    order = keep[np.lexsort((b[keep], a[keep], -similarity[keep]))]
    return a[order], b[order], similarity[order]
