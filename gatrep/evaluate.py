"""Categorization metrics (accuracy, per-class and averaged precision/recall/F1), retrieval precision/recall/mAP,
and how alike retrieved images look (HOG distance, colour-histogram correlation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gatrep import schemas
from gatrep.errors import UserError

if TYPE_CHECKING:
    from gatrep.categorize import Searcher


class NothingToJudge(UserError, ValueError):
    """A results table without a single labelled query that could be judged."""


@dataclasses.dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall, F1 and support (true count) of one class or one average."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclasses.dataclass(frozen=True)
class Categorization:
    """The paper's Table II: accuracy, per-class precision/recall/F1, macro and weighted averages."""

    accuracy: float
    per_class: dict[str, ClassMetrics]
    macro: ClassMetrics
    weighted: ClassMetrics


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Mean precision@k, recall@k and AP@k over the queries that have any relevant item (`queries` of them)."""

    k: int
    precision: float
    recall: float
    map: float
    queries: int


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method's column in the side-by-side table."""

    name: str
    categorization: Categorization
    retrieval: Retrieval | None = None


def categorization(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[str] | None = None) -> Categorization:
    """Accuracy and per-class / macro / weighted precision, recall and F1 (sklearn.metrics), labels as strings.

    `labels` fixes the classes reported (default: every label seen in y_true or y_pred, sorted). A class
    never predicted has precision 0 rather than a warning. Refuses empty or unequal-length inputs.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    true = np.asarray([str(y) for y in y_true], dtype=object)
    pred = np.asarray([str(y) for y in y_pred], dtype=object)
    if true.size == 0 or true.size != pred.size:
        raise ValueError(f"categorization needs equal, non-empty label lists (got {true.size} and {pred.size})")
    classes = sorted(set(true) | set(pred)) if labels is None else [str(label) for label in labels]
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=classes, zero_division=0)
    per_class = {c: ClassMetrics(float(p[i]), float(r[i]), float(f[i]), int(s[i])) for i, c in enumerate(classes)}
    averages = {}
    for average in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(true, pred, labels=classes, average=average, zero_division=0)
        averages[average] = ClassMetrics(float(ap), float(ar), float(af), int(s.sum()))
    return Categorization(float(accuracy_score(true, pred)), per_class, averages["macro"], averages["weighted"])


def retrieval(query_labels: Sequence[Any], retrieved_labels: Sequence[Sequence[Any]], relevant_counts: Sequence[int],
              k: int) -> Retrieval:
    """precision@k, recall@k and mAP@k where an item is relevant when its label equals the query's label.

    For a query with R relevant items in the index and hits rel_1..rel_k (1 if the i-th retrieved item is
    relevant; missing items, when fewer than k were returned, count as not relevant):
      precision@k = Σ rel_i / k
      recall@k    = Σ rel_i / R            (R counts every relevant item in the index, so it is < 1 when R > k)
      AP@k        = Σ_i precision@i · rel_i / min(R, k)   (1 for a perfect ranking)
    Queries with R = 0 are left out of the means (`queries` says how many were kept). Refuses k < 1 or
    lists of different lengths.
    """
    if k < 1:
        raise ValueError(f"retrieval metrics need k >= 1, got {k}")
    if not len(query_labels) == len(retrieved_labels) == len(relevant_counts):
        raise ValueError("query_labels, retrieved_labels and relevant_counts need one entry per query")
    precisions, recalls, aps = [], [], []
    for label, retrieved, relevant in zip(query_labels, retrieved_labels, relevant_counts, strict=True):
        if relevant <= 0:
            continue
        hits = np.zeros(k)
        found = [str(r) == str(label) for r in list(retrieved)[:k] if r is not None]
        hits[:len(found)] = found
        precisions.append(hits.sum() / k)
        recalls.append(hits.sum() / relevant)
        precision_at = np.cumsum(hits) / np.arange(1, k + 1)
        aps.append(float((precision_at * hits).sum() / min(relevant, k)))
    if not precisions:
        return Retrieval(k, float("nan"), float("nan"), float("nan"), 0)
    return Retrieval(k, float(np.mean(precisions)), float(np.mean(recalls)), float(np.mean(aps)), len(precisions))


def method_result(name: str, y_true: Sequence[Any], y_pred: Sequence[Any],
                  retrieved_labels: Sequence[Sequence[Any]] | None = None, relevant_counts: Sequence[int] | None = None,
                  k: int = 10, labels: Sequence[str] | None = None) -> MethodResult:
    """Categorization (and retrieval, when retrieved labels are given) of one method on one labelled split."""
    result = None
    if retrieved_labels is not None:
        if relevant_counts is None:
            raise ValueError("retrieval metrics need relevant_counts (index items per query label)")
        result = retrieval(y_true, retrieved_labels, relevant_counts, k)
    return MethodResult(name, categorization(y_true, y_pred, labels), result)


def evaluate_searcher(name: str, searcher: Searcher, query_vecs: Any, query_labels: Sequence[str], k: int = 10,
                      scorings: Sequence[str] = ("single", "max", "mean", "knn")) -> list[MethodResult]:
    """One MethodResult per category scoring of an index on a labelled split, named "<name> <scoring>".

    A predicted category counts as its `label` (the input category most of its images carry, so discovered
    categories are judged by their majority label); a match is relevant when its input label equals the
    query's, and R is the number of indexed images with that label. A query whose vector is bad counts
    as wrong.
    """
    relevant = searcher.index.label_counts()
    label_of = dict(zip(searcher.names, searcher.labels, strict=True))
    counts = [relevant.get(str(label), 0) for label in query_labels]
    out = []
    for scoring in scorings:
        found = searcher.search(query_vecs, k, scoring)
        predicted = [label_of.get(c) for c in found.category]
        out.append(method_result(f"{name} {scoring}", query_labels, predicted, list(found.match_labels), counts, k))
    return out


def _cell(m: ClassMetrics) -> str:
    return f"{m.precision:.2f} / {m.recall:.2f} / {m.f1:.2f}"


def _rows(results: Sequence[MethodResult]) -> list[tuple[str, list[str]]]:
    classes = sorted({c for r in results for c in r.categorization.per_class})
    rows = [("Categorization accuracy", [f"{r.categorization.accuracy:.1%}" for r in results]),
            ("Category: Precision / Recall / F1", [""] * len(results))]
    for c in classes:
        rows.append((f"  {c}", [_cell(r.categorization.per_class[c]) if c in r.categorization.per_class else "-"
                                for r in results]))
    rows.append(("Macro average", [_cell(r.categorization.macro) for r in results]))
    rows.append(("Weighted average", [_cell(r.categorization.weighted) for r in results]))
    ks = sorted({r.retrieval.k for r in results if r.retrieval is not None})
    for k in ks:
        for label, attr in ((f"precision@{k}", "precision"), (f"recall@{k}", "recall"), (f"mAP@{k}", "map")):
            rows.append((label, [f"{getattr(r.retrieval, attr):.3f}" if r.retrieval is not None and r.retrieval.k == k
                                 else "-" for r in results]))
    return rows


def format_table(results: Sequence[MethodResult]) -> str:
    """A plain-text table with one column per method and the rows of the paper's Table II, plus retrieval@k.

    Refuses an empty list of results.
    """
    if not results:
        raise ValueError("format_table needs at least one method's result")
    rows = _rows(results)
    first = max(len("Metric"), *(len(name) for name, _ in rows))
    widths = [max(len(r.name), *(len(cells[i]) for _, cells in rows)) for i, r in enumerate(results)]
    header = "  ".join(["Metric".ljust(first)] + [r.name.ljust(w) for r, w in zip(results, widths, strict=True)])
    lines = [header.rstrip()]
    lines.append("  ".join(["-" * first] + ["-" * w for w in widths]))
    for name, cells in rows:
        lines.append("  ".join([name.ljust(first)] + [c.ljust(w) for c, w in zip(cells, widths, strict=True)]).rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# A published results stage, judged against its index


def evaluate_results(name: str, results: pa.Table, searcher: Searcher, k: int) -> tuple[MethodResult, dict[str, Any]]:
    """(MethodResult, extras) of one results table: queries with status ok and a label are judged.

    A predicted category counts as its majority input label (as in `evaluate_searcher`); a match is
    relevant when its indexed image carries the query's label. `extras` holds the confusion matrix
    (rows: true labels, columns: predicted) and how many queries were judged or left out.
    """
    from sklearn.metrics import confusion_matrix

    judged = results.filter(pc.and_(pc.equal(results[schemas.STATUS], schemas.OK), pc.is_valid(results[schemas.LABEL])))
    if judged.num_rows == 0:
        raise NothingToJudge(f"{name}: no query has status ok and a label; evaluation needs labelled queries")
    label_of_category = dict(zip(searcher.names, searcher.labels, strict=True))
    label_of_image = {i: lab for part in searcher.index.parts.values() for i, lab in zip(part.ids, part.labels,
                                                                                           strict=True)}
    relevant = searcher.index.label_counts()
    y_true = judged[schemas.LABEL].to_pylist()
    y_pred = [label_of_category.get(c) for c in judged[schemas.CATEGORY].to_pylist()]
    retrieved = [[label_of_image.get(m[schemas.IMAGE_ID]) for m in (matches or [])]
                 for matches in judged[schemas.MATCHES].to_pylist()]
    result = method_result(name, y_true, y_pred, retrieved, [relevant.get(str(y), 0) for y in y_true], k)
    labels = sorted({str(y) for y in y_true} | {str(y) for y in y_pred})
    matrix = confusion_matrix([str(y) for y in y_true], [str(y) for y in y_pred], labels=labels)
    extras = {"confusion": {"labels": labels, "matrix": matrix.tolist()}, "judged": judged.num_rows,
              "left_out": results.num_rows - judged.num_rows}
    return result, extras


def to_json(result: MethodResult, extras: dict[str, Any]) -> dict[str, Any]:
    """A method's figures as a JSON-ready dict (for the evaluation stage and the report)."""
    return {**dataclasses.asdict(result), **extras}


# ----------------------------------------------------------------------------------------------
# How alike retrieved images look: the thesis's @5 statistics (5.4.3, 5.4.4)

LOOK_SIZE = 64  # side of the grey image HOG is computed on: images of any size compare alike


def hog_descriptor(image: np.ndarray) -> np.ndarray:
    """HOG of an image (9 orientations, 8-pixel cells, 2x2 blocks, L2-Hys; Dalal & Triggs as in the thesis) after
    converting it to grey and resizing it to LOOK_SIZE pixels."""
    from skimage.color import rgb2gray
    from skimage.feature import hog
    from skimage.transform import resize

    grey = rgb2gray(image) if image.ndim == 3 else image
    return hog(resize(grey, (LOOK_SIZE, LOOK_SIZE), anti_aliasing=True), orientations=9, pixels_per_cell=(8, 8),
               cells_per_block=(2, 2), block_norm="L2-Hys", feature_vector=True)


def colour_histogram(image: np.ndarray) -> np.ndarray:
    """256 bins per RGB channel, concatenated (768 values) and normalised to sum 1."""
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    counts = np.concatenate([np.bincount(rgb[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.float64)
    return counts / counts.sum()


def histogram_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two histograms (OpenCV's HISTCMP_CORREL, the thesis's Equation 14); 0 when one of
    them is flat."""
    da, db = a - a.mean(), b - b.mean()
    denominator = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / denominator) if denominator > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Look:
    """How alike a query and its matches look, averaged over every (query, match) pair: the mean distance of
    their HOG descriptors (lower: more alike in texture and edges) and the mean correlation of their colour
    histograms (higher: more alike in colour)."""

    hog_distance: float
    colour_correlation: float
    pairs: int


class LookJudge:
    """Judges (query, matches) pairs by `Look`, reading each image once (`load(uri)` -> uint8 [h, w(, 3)])."""

    def __init__(self, load: Callable[[str], np.ndarray]) -> None:
        self.load = load
        self._seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _descriptors(self, uri: str) -> tuple[np.ndarray, np.ndarray]:
        if uri not in self._seen:
            image = self.load(uri)
            self._seen[uri] = hog_descriptor(image), colour_histogram(image)
        return self._seen[uri]

    def judge(self, pairs: Iterable[tuple[str, Sequence[str]]]) -> Look:
        """The mean Look over every (query uri, match uri) pair of `pairs` [(query, its matches)]."""
        distances, correlations = [], []
        for query, matches in pairs:
            q_hog, q_colour = self._descriptors(query)
            for match in matches:
                m_hog, m_colour = self._descriptors(match)
                distances.append(float(np.linalg.norm(q_hog - m_hog)))
                correlations.append(histogram_correlation(q_colour, m_colour))
        if not distances:
            raise NothingToJudge("no (query, match) pair to judge")
        return Look(float(np.mean(distances)), float(np.mean(correlations)), len(distances))
