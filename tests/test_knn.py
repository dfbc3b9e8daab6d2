"""k-NN building blocks (gatrep.vectors, gatrep.knn) on hand-made vectors and neighbour tables: exact search,
self removal, mutual k-NN, recall."""

from __future__ import annotations

import numpy as np
import pytest

from gatrep import knn
from gatrep.vectors import PAD, approximate_knn, drop_self, exact_knn, exact_topk, normalise


def _unit(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_exact_knn_orders_by_cosine_and_never_returns_the_node_itself() -> None:
    vectors = _unit([0, 10, 30, 90])
    neighbours, sims = exact_knn(vectors, k=2)
    assert neighbours.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert sims[0] == pytest.approx([np.cos(np.deg2rad(10)), np.cos(np.deg2rad(30))], abs=1e-6)


def test_exact_knn_pads_when_fewer_than_k_other_rows() -> None:
    neighbours, sims = exact_knn(_unit([0, 45]), k=3)
    assert neighbours.tolist() == [[1, PAD, PAD], [0, PAD, PAD]]
    assert np.isnan(sims[:, 1:]).all(), "a missing neighbour has no similarity"


def test_exact_topk_excludes_the_given_row_and_blocks_give_the_same_answer(monkeypatch) -> None:
    from gatrep import vectors

    data = normalise(np.random.default_rng(0).standard_normal((40, 5)))
    rows, scores = exact_topk(data[:7], data, 4, exclude=np.arange(7))
    brute = data[:7] @ data.T
    brute[np.arange(7), np.arange(7)] = -np.inf
    assert rows.tolist() == np.argsort(-brute, axis=1)[:, :4].tolist()
    np.testing.assert_allclose(scores, -np.sort(-brute, axis=1)[:, :4], rtol=1e-6)
    monkeypatch.setattr(vectors, "BLOCK_CELLS", 40)  # one query row per block
    again = exact_topk(data[:7], data, 4, exclude=np.arange(7))
    assert again[0].tolist() == rows.tolist()


def test_drop_self_removes_own_id_wherever_it_appears() -> None:
    candidates = np.array([[0, 2, 1], [2, 1, 0], [1, 0, 2]])
    assert drop_self(candidates, 2).tolist() == [[2, 1], [2, 0], [1, 0]]


def test_mutual_knn_keeps_only_pairs_that_list_each_other() -> None:
    # 0<->1, 0<->2 and 1<->3 are mutual; 2->1 and 3->0 are one-way.
    neighbours = np.array([[1, 2], [0, 3], [0, 1], [1, 0]])
    sims = np.array([[0.9, 0.8], [0.9, 0.7], [0.8, 0.6], [0.7, 0.5]], dtype=np.float32)
    kept, kept_sims = knn.mutual_knn(neighbours, sims)
    assert kept.tolist() == [[1, 2], [0, 3], [0, PAD], [1, PAD]]
    np.testing.assert_allclose(kept_sims, [[0.9, 0.8], [0.9, 0.7], [0.8, np.nan], [0.7, np.nan]], rtol=1e-6)
    edges = {(i, int(j)) for i, row in enumerate(kept) for j in row if j != PAD}
    assert all((j, i) in edges for i, j in edges), "mutual k-NN must be symmetric"


def test_mutual_knn_moves_kept_neighbours_to_the_front() -> None:
    # 0 lists 2 first, but 2 does not list 0: 0 keeps only 1, which moves to the front.
    neighbours = np.array([[2, 1], [0, 2], [1, PAD]])
    sims = np.array([[0.9, 0.8], [0.8, 0.7], [0.7, np.nan]], dtype=np.float32)
    kept, kept_sims = knn.mutual_knn(neighbours, sims)
    assert kept.tolist() == [[1, PAD], [0, 2], [1, PAD]]
    assert kept_sims[0, 0] == pytest.approx(0.8) and np.isnan(kept_sims[0, 1])


def test_grouped_knn_stays_inside_groups_and_uses_global_ids() -> None:
    vectors = _unit([0, 5, 10, 1, 6, 11, 90])
    groups = np.array(["a", "a", "a", "b", "b", "b", "c"], dtype=object)
    neighbours, sims, counts = knn.grouped_knn(vectors, groups, k=2, exact_below=100)
    assert neighbours[0].tolist() == [1, 2]
    assert neighbours[3].tolist() == [4, 5]
    assert neighbours[6].tolist() == [PAD, PAD]  # a group of one has nobody to point at
    assert counts == {"groups": 3, "exact_groups": 3, "approximate_groups": 0, "groups_smaller_than_k_plus_1": 1}
    assert sims[3, 0] == pytest.approx(np.cos(np.deg2rad(5)), abs=1e-6)


def test_recall_is_one_for_exact_neighbours_and_drops_for_a_wrong_one() -> None:
    vectors = _unit(list(np.linspace(0, 180, 20)))
    groups = np.zeros(20, dtype=object)
    neighbours, _ = exact_knn(vectors, k=3)
    assert knn.recall_at_k(vectors, neighbours, groups, sample=20) == 1.0
    broken = neighbours.copy()
    broken[:, 2] = (np.arange(20) + 10) % 20  # far away: 90 degrees off
    assert knn.recall_at_k(vectors, broken, groups, sample=20) == pytest.approx(2 / 3)
    assert knn.recall_at_k(vectors, neighbours, groups, sample=0) is None
    assert knn.recall_at_k(vectors, neighbours, groups, sample=7, seed=3) == 1.0, "a sample of the nodes too"
    assert knn.recall_at_k(vectors, broken, groups, sample=7, seed=3) == pytest.approx(2 / 3)


def test_check_size_refuses_fewer_than_k_plus_one_nodes() -> None:
    knn.check_size(4, 3, "here")
    with pytest.raises(knn.GraphInputError, match="3 nodes, but k=3"):
        knn.check_size(3, 3, "here")


def test_pynndescent_still_compiles_after_ray_data_showed_progress():
    """Ray's progress bars used to replace builtins.print, and numba then refused to compile any function that
    prints, pynndescent's among them, in the same process. Compile a fresh function that prints (numba has
    no cache for it), then build a pynndescent graph, after Ray Data's progress bar has been set up."""
    import builtins

    import numba
    import ray
    from ray.experimental import tqdm_ray

    original = builtins.print
    ray.init(num_cpus=1, object_store_memory=100 * 1024**2, include_dashboard=False)
    try:
        tqdm_ray.instance()  # what Ray Data's progress bars call
        assert builtins.print is original

        @numba.njit
        def prints_and_adds(a: int, b: int) -> int:
            if a < 0:
                print("negative")
            return a + b

        assert prints_and_adds(2, 3) == 5
        unit = normalise(np.random.default_rng(0).standard_normal((300, 8)))
        neighbours, similarities = approximate_knn(unit, 5, n_jobs=1)
        assert neighbours.shape == (300, 5) and (neighbours != np.arange(300)[:, None]).all()
        assert np.isfinite(similarities).all()
    finally:
        ray.shutdown()
        builtins.print = original


def test_update_knn_equals_a_rebuild_after_adding_removing_and_changing_nodes() -> None:
    rng = np.random.default_rng(0)
    old = normalise(rng.standard_normal((300, 8)))
    old_neighbours, old_sims = exact_knn(old, 5)
    kept = np.sort(rng.choice(300, size=290, replace=False))  # 10 removed
    new, previous = old[kept].copy(), kept.astype(np.int64)
    changed = rng.choice(len(new), size=5, replace=False)
    new[changed], previous[changed] = normalise(rng.standard_normal((5, 8))), PAD
    new = np.concatenate([new, normalise(rng.standard_normal((20, 8)))])
    previous = np.concatenate([previous, np.full(20, PAD)])

    neighbours, sims, counts = knn.update_knn(new, previous, old_neighbours, old_sims)

    expected_neighbours, expected_sims = exact_knn(new, 5)
    np.testing.assert_array_equal(neighbours, expected_neighbours)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-6)
    assert counts["new_nodes"] == 25 and counts["searched_again"] > 0 and counts["lists_repaired"] > 0


def test_update_knn_without_changes_keeps_every_list() -> None:
    vectors = normalise(np.random.default_rng(1).standard_normal((50, 4)))
    neighbours, sims = exact_knn(vectors, 3)
    updated, updated_sims, counts = knn.update_knn(vectors, np.arange(50), neighbours, sims)
    np.testing.assert_array_equal(updated, neighbours)
    assert counts == {"new_nodes": 0, "searched_again": 0, "lists_repaired": 0}
