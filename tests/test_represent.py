"""Representatives against brute-force n*n computations; category discovery on separable clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gatrep import represent, vectors


def brute_total_similarity(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit.astype(np.float64) @ unit.T.astype(np.float64)
    return sims.sum(axis=1) - np.diag(sims)


def brute_zscores(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / values.std()


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.normal(size=(60, 12)) * rng.uniform(0.5, 3.0, size=(60, 1)) + 0.3).astype(np.float32)


def test_most_central_by_hand():
    # cos([1,0],[0,1]) = 0 and cos of each with [1,1] = 1/sqrt2: totals a, a, 2a with a = 1/sqrt2.
    rep = represent.most_central(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32), top_k=2)
    assert rep.index == 2
    np.testing.assert_allclose(rep.centrality, [1 / math.sqrt(2), 1 / math.sqrt(2), math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(rep.zscores, [-1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2)], rtol=1e-6)
    assert rep.zscore == pytest.approx(math.sqrt(2))
    assert rep.top.tolist() == [2, 0]  # tie between 0 and 1 goes to the lower position
    np.testing.assert_array_equal(rep.vector, [1, 1])


def test_most_central_matches_brute_force(data):
    rep = represent.most_central(data, top_k=7)
    brute = brute_total_similarity(data)
    np.testing.assert_allclose(rep.centrality, brute, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rep.zscores, brute_zscores(brute), rtol=1e-4, atol=1e-5)
    assert rep.index == int(np.argmax(brute))
    assert rep.top.tolist() == np.argsort(-brute)[:7].tolist()
    np.testing.assert_array_equal(rep.vector, data[rep.index])


def test_most_central_in_row_chunks_equals_one_chunk(data, monkeypatch):
    whole = represent.most_central(data, top_k=5)
    monkeypatch.setattr(represent, "ROW_CHUNK", 7)
    chunked = represent.most_central(data, top_k=5)
    np.testing.assert_allclose(chunked.centrality, whole.centrality, rtol=1e-12)
    assert chunked.top.tolist() == whole.top.tolist()


def test_centroid_matches_brute_force(data):
    rep = represent.centroid(data, top_k=4)
    mean = data.astype(np.float64).mean(axis=0)
    cosines = (data @ mean) / (np.linalg.norm(data, axis=1) * np.linalg.norm(mean))
    np.testing.assert_allclose(rep.vector, mean, rtol=1e-5)
    np.testing.assert_allclose(rep.centrality, cosines, rtol=1e-5)
    assert rep.index == int(np.argmax(cosines))
    assert rep.top.tolist() == np.argsort(-cosines)[:4].tolist()


def brute_degree(x: np.ndarray, threshold: float) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return (sims > threshold).sum(axis=1)


@pytest.mark.parametrize("block_cells", [1 << 24, 50])  # one block, and blocks of a single row
def test_degree_exact_matches_brute_force(data, monkeypatch, block_cells):
    monkeypatch.setattr(vectors, "BLOCK_CELLS", block_cells)
    rep = represent.degree(data, threshold=0.3, top_k=6)
    counts = brute_degree(data, 0.3)
    np.testing.assert_array_equal(rep.centrality, counts)
    np.testing.assert_allclose(rep.zscores, brute_zscores(counts.astype(float)))
    # Degree ties are common: the order is degree, then total similarity, then position.
    order = np.lexsort((np.arange(len(data)), -brute_total_similarity(data), -counts))
    assert rep.top.tolist() == order[:6].tolist()
    assert rep.index == order[0]


def test_degree_edges_need_a_similarity_strictly_above_the_threshold():
    # orthogonal vectors have cosine exactly 0: no edge at threshold 0, all edges just below it.
    assert represent.degree(np.eye(3), threshold=0.0).centrality.tolist() == [0, 0, 0]
    assert represent.degree(np.eye(3), threshold=-0.01).centrality.tolist() == [2, 2, 2]


def test_degree_from_a_full_neighbour_table_is_exact(data):
    ids, sims = vectors.exact_knn(vectors.normalise(data), k=len(data) - 1)
    rep = represent.degree(data, threshold=0.3, neighbours=ids, similarities=sims)
    np.testing.assert_array_equal(rep.centrality, brute_degree(data, 0.3))


def test_in_degree_by_hand():
    neighbours = np.array([[1, 2], [0, -1], [0, 1]])
    similarities = np.array([[0.9, 0.2], [0.9, np.nan], [0.7, 0.6]], dtype=np.float32)
    # node 0 is listed by 1 (0.9) and 2 (0.7); node 1 by 0 (0.9) and 2 (0.6); node 2 only at 0.2 < 0.5.
    assert represent.in_degree(neighbours, similarities, 0.5).tolist() == [2, 2, 0]


def test_degree_approximation_from_pynndescent_never_overcounts():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 16))
    x = (np.repeat(centres, 10, axis=0) + rng.normal(scale=0.05, size=(300, 16))).astype(np.float32)
    exact = brute_degree(x, 0.9)
    approx = represent.degree(x, threshold=0.9, exact_max=0, n_neighbors=15).centrality
    assert (approx <= exact).all()  # in-degree over a k-NN graph is a subset of the thresholded graph's edges
    assert np.mean(approx == exact) >= 0.95  # clusters of 10 < k=15: a good k-NN graph finds every edge


def test_top_indices_ties_are_deterministic():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert represent.top_indices(scores, 2).tolist() == [1, 2]
    assert represent.top_indices(scores, 2, tiebreak=np.array([0, 0, 5, 0, 1])).tolist() == [2, 4]
    assert represent.top_indices(scores, 10).tolist() == [1, 2, 4, 3, 0]
    with pytest.raises(ValueError, match="k >= 1"):
        represent.top_indices(scores, 0)


def test_zscores_of_a_constant_group_are_zero():
    assert represent.zscores(np.array([2.0, 2.0, 2.0])).tolist() == [0.0, 0.0, 0.0]
    rep = represent.most_central(np.ones((1, 3)))
    assert rep.index == 0 and rep.zscore == 0.0


def test_group_representatives_equal_per_group_results(data):
    groups = np.array(["b", "a", "c"] * 20, dtype=object)
    grouped = represent.represent_groups(data, groups, "most_central", top_k=3)
    assert grouped.groups.tolist() == ["a", "b", "c"]
    assert grouped.sizes.tolist() == [20, 20, 20]
    for g, name in enumerate(grouped.groups):
        rows = np.flatnonzero(groups == name)
        single = represent.most_central(data[rows], top_k=3)
        assert grouped.index[g] == rows[single.index]
        assert grouped.top[g].tolist() == rows[single.top].tolist()
        assert grouped.zscore[g] == pytest.approx(single.zscore)
        np.testing.assert_allclose(grouped.centrality[rows], single.centrality)
        np.testing.assert_array_equal(grouped.vectors[g], data[rows[single.index]])


def test_refusals(data):
    with pytest.raises(ValueError, match="unknown representative method"):
        represent.represent(data, "median")
    with pytest.raises(ValueError, match="non-empty"):
        represent.most_central(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="NaN"):
        represent.most_central(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="nulls"):
        represent.represent_groups(data[:2], np.array(["a", None], dtype=object), "centroid")


# ----------------------------------------------------------------------------------------------
# Category discovery


def separable_listings(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """15 listing representatives in 3 well separated directions, shuffled; returns (vectors, true cluster)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 24) * 5
    truth = rng.permutation(np.repeat(np.arange(3), 5))
    return (centres[truth] + rng.normal(scale=0.3, size=(15, 24))).astype(np.float32), truth


@pytest.mark.parametrize("method, options", [
    ("threshold", {"threshold": 0.7}),
    ("kmeans", {"n_clusters": 3}),
    ("dbscan", {"eps": 0.2, "min_samples": 2}),
])
def test_discovery_recovers_separable_clusters(method, options):
    vectors, truth = separable_listings()
    labels = represent.discover_categories(vectors, method, **options)
    assert labels.tolist() == represent.first_seen_order(truth).tolist()


def test_threshold_discovery_over_a_knn_graph():
    vectors, truth = separable_listings(seed=1)
    labels = represent.discover_categories(vectors, "threshold", threshold=0.7, exact_max=0, n_neighbors=4)
    assert labels.tolist() == represent.first_seen_order(truth).tolist()


def test_dbscan_noise_listings_become_their_own_categories():
    vectors, truth = separable_listings()
    outlier = np.zeros((1, 24), dtype=np.float32)
    outlier[0, 10] = 1.0
    labels = represent.discover_categories(np.vstack([vectors, outlier]), "dbscan", eps=0.2, min_samples=2)
    assert labels[-1] == 3 and (labels[:-1] < 3).all()


def test_kmeans_refuses_more_clusters_than_listings():
    with pytest.raises(ValueError, match="n_clusters"):
        represent.discover_categories(np.eye(3, dtype=np.float32), "kmeans", n_clusters=4)


# ----------------------------------------------------------------------------------------------
# Listing similarity and merge suggestions (Experiment IV-A2)

PAPER_MATRIX = np.array([[1.0, 0.67333986, 0.81033915], [0.67333986, 1.0, 0.69574974], [0.81033915, 0.69574974, 1.0]])


def paper_listings() -> np.ndarray:
    """Three unit vectors whose cosine matrix is the one printed in Experiment IV-A2."""
    return np.linalg.cholesky(PAPER_MATRIX).astype(np.float32)


def test_similarity_matrix_and_merge_suggestion_of_the_paper():
    np.testing.assert_allclose(represent.similarity_matrix(paper_listings()), PAPER_MATRIX, atol=1e-6)
    a, b, sims = represent.listing_pairs(paper_listings())
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 2)]
    ma, mb, msims = represent.merge_suggestions(a, b, sims, threshold=0.8)
    assert (ma.tolist(), mb.tolist()) == ([0], [2])  # "we can merge the first and third listings"
    assert msims[0] == pytest.approx(0.81033915, abs=1e-6)


def test_listing_pairs_above_the_dense_limit_keep_top_neighbours():
    a, b, sims = represent.listing_pairs(paper_listings(), max_dense=0, neighbours=1)
    # nearest of 0 is 2, of 1 is 2 (0.696 > 0.673), of 2 is 0: pairs (0, 2) and (1, 2), each once.
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="listing_pairs"):
        represent.similarity_matrix(paper_listings(), max_listings=2)


def test_cluster_centres_keep_one_image_of_each_look():
    rng = np.random.default_rng(0)
    # One group of three looks of unequal size: 30, 20 and 10 images around three orthogonal directions.
    looks = np.eye(8, dtype=np.float32)[:3]
    sizes = [30, 20, 10]
    x = np.concatenate([look + 0.05 * rng.normal(size=(n, 8)) for look, n in zip(looks, sizes, strict=True)])
    centres = represent.cluster_centres(x, 3, seed=0)
    look_of = np.repeat([0, 1, 2], sizes)
    assert look_of[centres].tolist() == [0, 1, 2]  # one per look, largest cluster first
    for look, row in zip(range(3), centres, strict=True):  # each is its cluster's most central image
        members = np.flatnonzero(look_of == look)
        assert row == members[np.argmax(represent.total_similarity(vectors.normalise(x[members])))]
    # The top-3 most central images of the same group all come from the largest look.
    top = represent.central_images(x, np.zeros(60), 3, "top")[0]
    assert set(look_of[top].tolist()) == {0}
    assert represent.cluster_centres(x[:2], 5).tolist() == [0, 1]  # fewer images than m: all of them
    with pytest.raises(ValueError, match="unknown central method 'median'"):
        represent.central_images(x, np.zeros(60), 3, "median")


def test_central_images_per_group_in_group_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    groups = np.array(["b", "a"] * 20, dtype=object)
    found = represent.central_images(x, groups, 4, "kmeans", seed=0)
    assert len(found) == 2
    assert set(groups[found[0]]) == {"a"} and set(groups[found[1]]) == {"b"}  # group_rows sorts the labels
    assert all(len(rows) == 4 for rows in found)
