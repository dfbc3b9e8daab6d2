"""Categorization and retrieval metrics on hand-computed examples, and the side-by-side table."""

from __future__ import annotations

import numpy as np
import pytest

from gatrep import evaluate


def test_categorization_by_hand():
    # a: 3 true, 2 found, no false a -> P 1, R 2/3, F1 0.8; b: 1 true, 2 predicted -> P 1/2, R 1, F1 2/3.
    result = evaluate.categorization(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert result.accuracy == pytest.approx(0.75)
    a, b = result.per_class["a"], result.per_class["b"]
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert (result.macro.precision, result.macro.recall, result.macro.f1) == pytest.approx((0.75, 5 / 6, 11 / 15))
    weighted = (0.75 * 1 + 0.25 * 0.5, 0.75 * 2 / 3 + 0.25 * 1, 0.75 * 0.8 + 0.25 * 2 / 3)
    assert (result.weighted.precision, result.weighted.recall, result.weighted.f1) == pytest.approx(weighted)


def test_a_class_never_predicted_scores_zero_precision():
    result = evaluate.categorization(["a", "b"], ["a", "a"], labels=["a", "b", "c"])
    assert result.per_class["b"].precision == 0.0 and result.per_class["b"].recall == 0.0
    assert result.per_class["c"].support == 0


def test_retrieval_by_hand():
    result = evaluate.retrieval(
        query_labels=["a", "b", "z"],
        retrieved_labels=[["a", "b", "a"], ["b", None, None], ["a", "a", "a"]],
        relevant_counts=[4, 1, 0],  # "z" has nothing relevant in the index: left out of the means
        k=3,
    )
    # query a: hits 1,0,1 -> P 2/3, R 2/4, AP (1 + 2/3) / min(4, 3); query b: hits 1,0,0 -> P 1/3, R 1, AP 1.
    assert result.queries == 2
    assert result.precision == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result.recall == pytest.approx((0.5 + 1.0) / 2)
    assert result.map == pytest.approx(((1 + 2 / 3) / 3 + 1.0) / 2)


def test_retrieval_refusals():
    with pytest.raises(ValueError, match="k >= 1"):
        evaluate.retrieval(["a"], [["a"]], [1], k=0)
    with pytest.raises(ValueError, match="one entry per query"):
        evaluate.retrieval(["a", "b"], [["a"]], [1], k=1)
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.categorization([], [])


def test_side_by_side_table():
    gat = evaluate.method_result("gat-ae", ["a", "b"], ["a", "b"], [["a"], ["a"]], [1, 1], k=1)
    hog = evaluate.method_result("hog", ["a", "b"], ["a", "a"])
    text = evaluate.format_table([gat, hog])
    lines = text.splitlines()
    header = lines[0].split()
    assert header == ["Metric", "gat-ae", "hog"]
    rows = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert "100.0%" in rows["Categorization accuracy"] and "50.0%" in rows["Categorization accuracy"]
    assert rows["Macro average"].split()[2:] == ["1.00", "/", "1.00", "/", "1.00", "0.25", "/", "0.50", "/", "0.33"]
    assert rows["mAP@1"].split()[1:] == ["0.500", "-"]  # hog has no retrieval column
    # every cell of a column starts at the same offset as its header
    column = lines[0].index("hog")
    assert all(line[column - 2:column] == "  " for line in lines[2:] if len(line) > column)


def test_evaluate_searcher_on_a_tiny_index():
    from gatrep.categorize import CategoryIndex, Searcher

    vectors = np.array([[1, 0], [0.9, 0.2], [0, 1], [0.2, 0.9]], dtype=np.float32)
    labels = ["cat", "cat", "dog", "dog"]
    index = CategoryIndex.build(vectors, ["c1", "c2", "d1", "d2"], ["k0", "k0", "k1", "k1"], labels=labels)
    searcher = Searcher(np.array(["k0", "k1"], dtype=object), vectors[[0, 2]], [vectors[:2], vectors[2:]],
                        np.array(["cat", "dog"], dtype=object), index)
    # the second query is a dog that looks like a cat: categorized wrongly, its matches are cats.
    results = evaluate.evaluate_searcher("gat", searcher, [[1.0, 0.1], [0.95, 0.1]], ["cat", "dog"], k=2,
                                         scorings=("single", "knn"))
    assert [r.name for r in results] == ["gat single", "gat knn"]
    for r in results:
        assert r.categorization.accuracy == pytest.approx(0.5)
        assert r.retrieval is not None
        assert (r.retrieval.precision, r.retrieval.recall, r.retrieval.map) == pytest.approx((0.5, 0.5, 0.5))


def test_look_statistics_by_hand():
    assert evaluate.histogram_correlation(np.array([1.0, 2, 3]), np.array([2.0, 4, 6])) == pytest.approx(1.0)
    assert evaluate.histogram_correlation(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    assert evaluate.histogram_correlation(np.array([1.0, 1, 1]), np.array([3.0, 2, 1])) == 0.0
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 200
    histogram = evaluate.colour_histogram(red)
    assert histogram.shape == (768,) and histogram.sum() == pytest.approx(1.0)
    assert histogram[200] == pytest.approx(1 / 3) and histogram[256] == histogram[512] == pytest.approx(1 / 3)


def test_look_judge_ranks_alike_images_closer_and_reads_each_image_once():
    rng = np.random.default_rng(0)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = (250, 250, 0)
    images = {"stripes": stripes, "stripes-shifted": np.roll(stripes, 2, axis=1),
              "noise": rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)}
    reads: list[str] = []

    def load(uri: str) -> np.ndarray:
        reads.append(uri)
        return images[uri]

    judge = evaluate.LookJudge(load)
    alike = judge.judge([("stripes", ["stripes-shifted"])])
    unlike = judge.judge([("stripes", ["noise"])])
    assert alike.hog_distance < unlike.hog_distance and alike.colour_correlation > unlike.colour_correlation
    both = judge.judge([("stripes", ["stripes-shifted", "noise"])])
    assert both.pairs == 2 and both.hog_distance == pytest.approx((alike.hog_distance + unlike.hog_distance) / 2)
    assert sorted(reads) == ["noise", "stripes", "stripes-shifted"]
    with pytest.raises(evaluate.NothingToJudge):
        judge.judge([("stripes", [])])
