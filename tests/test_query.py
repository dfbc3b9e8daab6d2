"""Categorization, multi-representative scoring, k-NN vote and per-category retrieval on tiny indexes, and the
retrieval index's files."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from gatrep import categorize as query
from gatrep.categorize import CategoryIndex, Searcher, review
from gatrep.stages.index import IndexFileError, load_retrieval_index, save_retrieval_index
from gatrep.vectors import exact_topk, normalise

S = 1 / math.sqrt(2)


def test_categorize_by_hand():
    best, scores = query.categorize([[1.0, 0.1], [0.0, -2.0], [1.0, 1.0]], [[1, 0], [0, -1]], ["x", "y"])
    assert best.tolist() == ["x", "y", "x"]  # the third is equally close to both: the first category wins
    np.testing.assert_allclose(scores[0], [1 / math.hypot(1, 0.1), -0.1 / math.hypot(1, 0.1)], rtol=1e-6)
    np.testing.assert_allclose(scores[2], [S, -S], rtol=1e-6)
    with pytest.raises(ValueError, match="2 category names"):
        query.categorize([[1.0, 0.0]], [[1, 0]], ["x", "y"])


def test_multi_representative_max_and_mean_differ_by_hand():
    central = [np.array([[1, 0], [0, 1]]), np.array([[1, 1]])]  # A: two axes; B: their diagonal
    best, scores = query.categorize_multi([[1.0, 0.0]], central, ["A", "B"], reduce="max")
    assert best.tolist() == ["A"]
    np.testing.assert_allclose(scores, [[1.0, S]], rtol=1e-6)
    best, scores = query.categorize_multi([[1.0, 0.0]], central, ["A", "B"], reduce="mean")
    assert best.tolist() == ["B"]
    np.testing.assert_allclose(scores, [[0.5, S]], rtol=1e-6)


def tiny_index() -> tuple[np.ndarray, list[str], list[str]]:
    vectors = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.8, 0.3, 0], [0, 1, 0], [0.1, 1, 0]], dtype=np.float32)
    return vectors, ["a1", "a2", "a3", "b1", "b2"], ["A", "A", "A", "B", "B"]


def test_identical_query_retrieves_itself_first_exact():
    vectors, ids, cats = tiny_index()
    index = CategoryIndex.build(vectors, ids, cats, labels=cats)
    found, scores = index.retrieve(vectors[1:2], "A", k=2)
    assert found.tolist() == [["a2", "a1"]]
    assert scores[0, 0] == pytest.approx(1.0)
    found, scores = index.retrieve(vectors[3:4], "B", k=4)  # more than B holds: padded
    assert found.tolist() == [["b1", "b2", None, None]]
    assert np.isnan(scores[0, 2:]).all()
    with pytest.raises(KeyError, match="'C'"):
        index.retrieve(vectors[:1], "C")
    with pytest.raises(KeyError, match="not in the index: C"):
        index.retrieve_many(vectors[:2], ["A", "C"])


def test_search_all_merges_categories_like_a_global_search():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 6)).astype(np.float32)
    cats = [f"c{i % 3}" for i in range(40)]
    index = CategoryIndex.build(vectors, [f"i{i}" for i in range(40)], cats)
    q = rng.normal(size=(5, 6)).astype(np.float32)
    ids, sims, _ = index.search_all(q, k=6)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T, axis=1)[:, :6]
    assert ids.tolist() == [[f"i{j}" for j in row] for row in brute]


def test_knn_vote_by_hand():
    vectors, ids, cats = tiny_index()
    index = CategoryIndex.build(vectors, ids, cats)
    # [1, 0.5, 0]: nearest three are a3 (0.8, 0.3), a2, a1 -> all A.
    best, votes = query.knn_vote([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]], index, k=3)
    assert best.tolist() == ["A", "B"]
    np.testing.assert_allclose(votes[0], [1.0, 0.0])
    np.testing.assert_allclose(votes[1], [1 / 3, 2 / 3])  # b1, b2 and then a3


def test_knn_vote_counts_votes_before_similarity():
    vectors = np.array([[1, 0, 0], [0.3, 0.954, 0], [0.3, -0.954, 0]], dtype=np.float32)
    index = CategoryIndex.build(vectors, ["b", "a1", "a2"], ["B", "A", "A"])
    # k=3: B gets one vote of similarity 1.0, A two votes of 0.3 each: the majority wins.
    assert query.knn_vote([[1.0, 0.0, 0.0]], index, k=3)[0].tolist() == ["A"]
    # k=2: one vote each (b: 1.0, a1 or a2: 0.3): the tie goes to the larger summed similarity.
    assert query.knn_vote([[1.0, 0.0, 0.0]], index, k=2)[0].tolist() == ["B"]


def test_weighted_vote_lets_the_nearest_outweigh_the_majority():
    vectors = np.array([[1, 0, 0], [0.3, 0.954, 0], [0.3, -0.954, 0]], dtype=np.float32)
    index = CategoryIndex.build(vectors, ["b", "a1", "a2"], ["B", "A", "A"])
    # k=3, power 1: B weighs 1.0, A 0.3 + 0.3 = 0.6; power 0 is the majority vote above (A).
    best, share = query.knn_vote([[1.0, 0.0, 0.0]], index, k=3, power=1.0)
    assert best.tolist() == ["B"]
    np.testing.assert_allclose(share[0], [0.6 / 1.6, 1.0 / 1.6], rtol=1e-4)  # categories in order A, B
    # power 0.2: 0.3 ** 0.2 = 0.786 per A vote, 1.57 in all: A wins again.
    assert query.knn_vote([[1.0, 0.0, 0.0]], index, k=3, power=0.2)[0].tolist() == ["A"]
    with pytest.raises(ValueError, match="power must be >= 0"):
        query.knn_vote([[1.0, 0.0, 0.0]], index, k=3, power=-1)


def test_query_expansion_by_hand():
    vectors, ids, cats = tiny_index()
    index = CategoryIndex.build(vectors, ids, cats)
    q = np.array([[1.0, 1.0, 0.0], [np.nan, 0.0, 0.0]], dtype=np.float32)
    expanded = query.expand_queries(q, index, neighbours=3, power=2.0)
    unit = normalise(vectors)
    # The three nearest to the diagonal over both categories: a3, a2 and b2.
    first = normalise(q[:1])[0]
    sims = unit @ first
    top = np.argsort(-sims)[:3]
    assert sorted(top.tolist()) == [1, 2, 4]
    want = first + (sims[top, None] ** 2 * unit[top]).sum(axis=0)
    np.testing.assert_allclose(expanded[0], want / np.linalg.norm(want), rtol=1e-5)
    assert not expanded[1].any()  # a bad query stays a zero row
    with pytest.raises(ValueError, match="neighbours >= 1"):
        query.expand_queries(q, index, neighbours=0, power=1.0)


def test_retrieval_over_the_whole_index_crosses_categories():
    vectors, ids, cats = tiny_index()
    index = CategoryIndex.build(vectors, ids, cats, labels=cats)
    s = searcher(index)
    q = np.array([[0.7, 0.7, 0.0]], dtype=np.float32)
    inside = s.search(q, k=3, scoring="single")
    assert inside.category.tolist() == ["A"] and set(inside.match_ids[0]) <= {"a1", "a2", "a3"}
    s.options = query.Options(scope="all")
    everywhere = s.search(q, k=3, scoring="single")
    unit = normalise(vectors)
    brute = np.argsort(-(unit @ normalise(q)[0]))[:3]
    assert everywhere.match_ids[0].tolist() == [ids[i] for i in brute]
    assert everywhere.match_labels[0].tolist() == [cats[i] for i in brute]
    assert "B" in everywhere.match_labels[0].tolist()  # b2 is among the three nearest
    with pytest.raises(ValueError, match="unknown scope"):
        query.Options(scope="world")


def searcher(index: CategoryIndex) -> Searcher:
    reps = np.array([[1, 0.2, 0], [0, 1, 0]], dtype=np.float32)
    central = [np.array([[1, 0, 0], [0.9, 0.1, 0]]), np.array([[0, 1, 0]])]
    return Searcher(np.array(["A", "B"], dtype=object), reps, central, np.array(["A", "B"], dtype=object), index)


@pytest.mark.parametrize("scoring", query.SCORINGS)
def test_search_path_and_bad_rows(scoring):
    vectors, ids, cats = tiny_index()
    s = searcher(CategoryIndex.build(vectors, ids, cats, labels=cats))
    batch = np.vstack([vectors[[2, 4]], [[np.nan, 0, 0]]])
    results = s.search(batch, k=2, scoring=scoring)
    assert results.category.tolist() == ["A", "B", None]
    assert results.ok.tolist() == [True, True, False]
    assert results.match_ids[:2, 0].tolist() == ["a3", "b2"]
    assert results.match_labels[:2, 0].tolist() == ["A", "B"]
    columns = s.search(batch, k=2, scoring=scoring).columns()
    assert columns["matches"][0][0]["image_id"] == "a3"
    assert columns["matches"][0][0]["score"] == pytest.approx(1.0)
    assert columns["matches"][2] == [] and columns["category_scores"][2] is None
    assert [c["category"] for c in columns["category_scores"][1]] == ["A", "B"]
    with pytest.raises(ValueError, match="unknown scoring"):
        s.categorize(batch[:1], "vote")


def clustered(n_categories: int, per_category: int, dim: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Clusters with a low intrinsic dimension (a few directions of spread each), like real image features."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_categories):
        basis = rng.normal(size=(4, dim)) / 2
        out.append(rng.normal(size=dim) + rng.normal(size=(per_category, 4)) @ basis)
    vectors = np.vstack(out).astype(np.float32) + rng.normal(scale=0.01, size=(n_categories * per_category, dim))
    cats = [f"c{i // per_category}" for i in range(len(vectors))]
    return vectors.astype(np.float32), [f"img{i}" for i in range(len(vectors))], cats


def test_ann_index_retrieves_itself_first_and_round_trips(tmp_path):
    vectors, ids, cats = clustered(2, 300, 16, seed=0)
    index = CategoryIndex.build(vectors, ids, cats, labels=cats, ann_min_size=200, n_neighbors=10)
    assert all(index.parts[c].ann is not None for c in ("c0", "c1"))
    sample = np.arange(0, 600, 7)
    found, scores = index.retrieve_many(vectors[sample], [cats[i] for i in sample], k=5)[:2]
    assert found[:, 0].tolist() == [ids[i] for i in sample]  # every query identical to an image finds it first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    exact_ids = []
    for i in sample:
        part = index.parts[cats[i]]
        rows = exact_topk(normalise(vectors[i:i + 1]), part.vectors, 5)[0][0]
        exact_ids.append(part.ids[rows].tolist())
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found.tolist(), exact_ids, strict=True)])
    assert recall >= 0.9

    files = save_retrieval_index(index, str(tmp_path / "ann"))
    assert sum(f.endswith(".pkl") for f in files) == 2
    loaded = load_retrieval_index(str(tmp_path / "ann"))
    again = loaded.retrieve_many(vectors[sample], [cats[i] for i in sample], k=5)
    assert again[0].tolist() == found.tolist()
    assert again[2][:, 0].tolist() == [cats[i] for i in sample]
    # An index published before the vectors were split per group of categories still loads.
    (tmp_path / "ann" / "vectors-00000.parquet").rename(tmp_path / "ann" / "vectors.parquet")
    old = load_retrieval_index(str(tmp_path / "ann")).retrieve_many(vectors[sample], [cats[i] for i in sample], k=5)
    assert old[0].tolist() == found.tolist()

    pickle_file = tmp_path / "ann" / "ann-00000.pkl"
    pickle_file.write_bytes(pickle_file.read_bytes() + b"tampered")
    with pytest.raises(IndexFileError, match="SHA-256"):
        load_retrieval_index(str(tmp_path / "ann"))


def test_exact_index_round_trips_without_pickles(tmp_path):
    vectors, ids, cats = tiny_index()
    files = save_retrieval_index(CategoryIndex.build(vectors, ids, cats, labels=cats), str(tmp_path))
    assert not any(f.endswith(".pkl") for f in files)
    loaded = load_retrieval_index(str(tmp_path))
    assert loaded.categories == ["A", "B"] and loaded.size("A") == 3 and loaded.size("C") == 0
    assert loaded.retrieve(vectors[4:5], "B", k=1)[0].tolist() == [["b2"]]
    assert loaded.label_counts() == {"A": 3, "B": 2}
    vectors_file = tmp_path / "vectors-00000.parquet"
    pq.write_table(pq.read_table(vectors_file).slice(0, 4), vectors_file)  # one row short of the catalog
    with pytest.raises(IndexFileError, match=r"vectors-\*\.parquet rows do not match catalog\.parquet"):
        load_retrieval_index(str(tmp_path))
    vectors_file.unlink()
    with pytest.raises(IndexFileError, match=r"missing vectors-\*\.parquet; rebuild the index"):
        load_retrieval_index(str(tmp_path))
    (tmp_path / "catalog.parquet").unlink()
    with pytest.raises(IndexFileError, match="missing catalog.parquet"):
        load_retrieval_index(str(tmp_path))


def test_review_flags_close_calls_and_uploads_unlike_every_category():
    scores = np.array([[0.7, 0.3, 0.0], [0.4, 0.3, 0.3], [0.9, 0.1, 0.0]])
    best = np.array([[0.95, 0.5, 0.4], [0.9, 0.9, 0.2], [0.5, 0.3, 0.2]])  # upload 3: far from everything
    typical = np.array([0.8, 0.8, np.nan])  # the third category has one image: no typical similarity
    confidence, reasons = review(scores, best, typical, min_confidence=0.2)
    np.testing.assert_allclose(confidence, [0.4, 0.1, 0.8], atol=1e-6)
    assert list(reasons) == [None, "low_confidence", "unlike_every_category"]
    _, exactly_at = review(np.array([[0.3, 0.1]]), np.array([[0.9, 0.9]]), np.array([0.5, 0.5]), 0.2)
    assert list(exactly_at) == [None]  # a margin of exactly min_confidence is confident enough


def test_typical_similarity_and_best_per_category():
    x = normalise(np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]], dtype=np.float32))
    index = CategoryIndex.build(x, ["a", "b", "c", "d", "e"], ["p", "p", "q", "q", "r"])
    typical = index.typical_similarity()
    assert typical[:2] == pytest.approx([float(x[0] @ x[1])] * 2, abs=1e-6) and math.isnan(typical[2])
    best = index.best_per_category(np.array([[1.0, 0.0]]))
    assert best[0] == pytest.approx([1.0, float(x[3, 0]), float(x[4, 0])], abs=1e-6)


def test_adaptive_score_needs_both_similarities_high():
    content = np.array([1.0, 0.9, 0.5, 0.0, -0.8])
    style = np.array([1.0, 0.5, 0.9, 1.0, -0.8])
    np.testing.assert_allclose(query.adaptive_score(content, style), [2.0, 0.45 * 1.4, 0.45 * 1.4, 0.0, 0.0])


def style_searcher() -> tuple[Searcher, np.ndarray]:
    """Category A holds a content twin of the query with another look, and a look twin with other content."""
    vectors, ids, cats = tiny_index()
    looks = np.array([[0, 0, 1], [1, 0, 0], [0.6, 0, 0.8], [0, 1, 0], [0, 1, 0]], dtype=np.float32)
    s = searcher(CategoryIndex.build(vectors, ids, cats, labels=cats))
    s.style = CategoryIndex.build(looks, ids, cats, labels=cats)
    return s, looks


@pytest.mark.parametrize(("similarity", "first"), [("content", "a1"), ("style", "a2"), ("adaptive", "a2")])
def test_retrieval_by_content_style_or_both(similarity, first):
    s, _ = style_searcher()
    query_style = np.array([[1, 0, 0], [1, 0, 0]], dtype=np.float32)
    results = s.search(np.array([[1, 0, 0], [np.nan, 0, 0]]), k=3, similarity=similarity, query_style=query_style)
    assert results.category.tolist() == ["A", None], "categorized by content whatever retrieval ranks by"
    assert results.match_ids[0, 0] == first and results.match_ids[1].tolist() == [None] * 3
    if similarity == "adaptive":  # a2: content 0.994, style 1.0; a1: content 1.0, style 0.0
        assert results.match_ids[0].tolist() == ["a2", "a3", "a1"]
        c = 0.9 / math.hypot(0.9, 0.1)
        assert results.match_scores[0, 0] == pytest.approx(c * 1.0 * (c + 1.0), rel=1e-5)


def test_adaptive_from_candidates_matches_exhaustive_when_they_hold_the_best():
    rng = np.random.default_rng(0)
    content, style = normalise(rng.normal(size=(300, 8))), normalise(rng.normal(size=(300, 6)))
    ids, cats = [f"i{n}" for n in range(300)], ["A"] * 300
    c_index, s_index = CategoryIndex.build(content, ids, cats), CategoryIndex.build(style, ids, cats)
    qc, qs = content[:20] + 0.1 * rng.normal(size=(20, 8)), style[:20] + 0.1 * rng.normal(size=(20, 6))
    exhaustive = query.retrieve_adaptive(c_index, s_index, qc, qs, ["A"] * 20, k=5, candidates=None)
    assert [row[0] for row in exhaustive[0]] == ids[:20], "each query's own twin, alike in both, comes first"
    assert np.all(np.diff(exhaustive[1], axis=1) <= 0), "best first"
    assert query.retrieve_adaptive(c_index, s_index, qc, qs, ["A"] * 20, k=5, candidates=300)[0].tolist() == \
        exhaustive[0].tolist()
    few = query.retrieve_adaptive(c_index, s_index, qc, qs, ["A"] * 20, k=5, candidates=5)
    assert [row[0] for row in few[0]] == ids[:20]
    assert (few[1] <= exhaustive[1] + 1e-6).all(), "a subset's j-th best is never above the whole's j-th best"
    # Candidates from approximate (pynndescent) indexes of both.
    c_ann, s_ann = (CategoryIndex.build(v, ids, cats, ann_min_size=100) for v in (content, style))
    assert c_ann.parts["A"].ann is not None and s_ann.parts["A"].ann is not None
    approximate = query.retrieve_adaptive(c_ann, s_ann, qc, qs, ["A"] * 20, k=5, candidates=50)
    assert [row[0] for row in approximate[0]] == ids[:20]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approximate[0].tolist(), exhaustive[0].tolist(),
                                                                  strict=True)])
    assert recall >= 0.9


def test_style_retrieval_is_refused_without_style_vectors():
    vectors, ids, cats = tiny_index()
    s = searcher(CategoryIndex.build(vectors, ids, cats, labels=cats))
    with pytest.raises(ValueError, match="similarity 'style' needs style vectors of the index and of the queries"):
        s.search(vectors[:1], similarity="style", query_style=vectors[:1])
    with pytest.raises(ValueError, match="unknown similarity 'look'; choose one of content, style, adaptive"):
        s.search(vectors[:1], similarity="look")
    s, looks = style_searcher()
    with pytest.raises(ValueError, match="similarity 'adaptive' needs style vectors"):
        s.search(vectors[:1], similarity="adaptive")
