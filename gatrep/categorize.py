"""Categorize query vectors against category representatives and retrieve their matches inside a category, batched."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from gatrep.vectors import PAD, exact_topk, group_rows, normalise

Labels = Sequence[Any] | np.ndarray  # one string (or None) per row


# ----------------------------------------------------------------------------------------------
# Categorization


def queries(query_vecs: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit query rows, ok mask): rows with NaN/inf become zero rows marked not ok, so one bad query does
    not fail its batch. Refuses a batch whose width is not the index's `dim`."""
    array = np.asarray(query_vecs, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"query vectors must be [B, {dim}] to match the index, got shape {array.shape}")
    ok = np.asarray(np.isfinite(array).all(axis=1), dtype=bool)
    return normalise(np.where(ok[:, None], array, 0.0)), ok


def categorize(query_vecs: Any, category_reps: Any, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each query's category: the representative with the highest cosine (III-A2, III-B2).

    Returns (best category name per query [B], cosine scores [B, C] in `names` order). Refuses a
    representative count that differs from the name count.
    """
    reps = normalise(np.asarray(category_reps, dtype=np.float32))
    if reps.ndim != 2 or reps.shape[0] != len(names):
        raise ValueError(f"{len(names)} category names but representatives of shape {reps.shape}")
    unit, _ = queries(query_vecs, reps.shape[1])
    scores = unit @ reps.T
    return np.asarray(names, dtype=object)[np.argmax(scores, axis=1)], scores


def categorize_multi(query_vecs: Any, central: Sequence[Any], names: Sequence[str],
                     reduce: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Category scores from several representatives per category (its top-m most central images).

    `central[c]` is an [m_c, d] matrix for category c; a category's score is the max or the mean of the
    query's cosines to its representatives. Returns (best name [B], scores [B, C]). Refuses an unknown
    `reduce` or a category without representatives.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', not {reduce!r}")
    if len(central) != len(names) or any(np.asarray(c).shape[0] == 0 for c in central):
        raise ValueError("categorize_multi needs one non-empty [m, d] matrix of representatives per category name")
    flat = normalise(np.concatenate([np.asarray(c, dtype=np.float32) for c in central]))
    starts = np.cumsum([0] + [np.asarray(c).shape[0] for c in central[:-1]])
    unit, _ = queries(query_vecs, flat.shape[1])
    cosines = unit @ flat.T
    if reduce == "max":
        scores = np.maximum.reduceat(cosines, starts, axis=1)
    else:
        scores = np.add.reduceat(cosines, starts, axis=1) / np.diff(np.append(starts, flat.shape[0]))
    return np.asarray(names, dtype=object)[np.argmax(scores, axis=1)], scores


def knn_vote(query_vecs: Any, index: CategoryIndex, k: int = 10, power: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Each query's category by a vote of its k nearest indexed images over all categories.

    With `power` 0 every neighbour has one vote (majority), ties going to the category with the larger
    summed similarity; with `power` p > 0 a neighbour's vote is its cosine ** p (cosines below 0 count 0), so
    the nearest weigh most. Returns (best name [B], each category's share of the votes [B, C] in
    `index.categories` order).
    """
    if power < 0:
        raise ValueError(f"the vote's power must be >= 0, not {power}")
    _, sims, cats = index.search_all(query_vecs, k)
    names = np.asarray(index.categories, dtype=object)
    votes = np.zeros((sims.shape[0], names.size), dtype=np.float64)
    similarity = np.zeros_like(votes)
    found = cats >= 0
    rows = np.broadcast_to(np.arange(sims.shape[0])[:, None], cats.shape)[found]
    weight = np.ones(found.sum()) if power == 0 else np.clip(sims[found], 0.0, None).astype(np.float64) ** power
    np.add.at(votes, (rows, cats[found]), weight)
    np.add.at(similarity, (rows, cats[found]), sims[found])
    # Majority votes are integers and |summed similarity| <= k, so this key orders by votes first, similarity
    # second; weighted votes are continuous and need no tie-break.
    best = np.argmax(votes * (2 * k + 1) + similarity if power == 0 else votes, axis=1)
    total = votes.sum(axis=1, keepdims=True)
    return names[best], votes / np.where(total > 0, total, 1.0)


def expand_queries(query_vecs: Any, index: CategoryIndex, neighbours: int, power: float) -> np.ndarray:
    """Alpha query expansion (Radenovic et al. 2018; GRAD-Net's query feature expansion on the index's own
    vectors): each unit query plus its `neighbours` nearest indexed vectors over all categories, each weighted by
    its cosine ** `power` (cosines below 0 count 0), scaled back to unit length. A query moves towards the dense
    part of the collection it sits in, and retrieval from there finds more of that part. Rows with NaN/inf
    become zero rows, as in `queries`."""
    if neighbours < 1 or power < 0:
        raise ValueError(f"query expansion needs neighbours >= 1 and power >= 0, not {neighbours} and {power}")
    unit, _ = queries(query_vecs, index.dim)
    cats, rows, sims = index.nearest(unit, neighbours)
    weight = np.where(rows >= 0, np.clip(np.nan_to_num(sims), 0.0, None) ** power, 0.0).astype(np.float32)
    return normalise(unit + np.einsum("bn,bnd->bd", weight, index.vectors_at(cats, rows)))


# ----------------------------------------------------------------------------------------------
# Per-category retrieval


@dataclasses.dataclass
class CategoryPart:
    """The indexed images of one category: ids, input labels, listings, unit vectors, optional ANN index."""

    ids: np.ndarray
    labels: np.ndarray
    listings: np.ndarray
    vectors: np.ndarray
    ann: Any = None


class CategoryIndex:
    """One retrieval index per category: exact search for small categories, pynndescent above `ann_min_size`."""

    def __init__(self, parts: dict[str, CategoryPart], epsilon: float = 0.1) -> None:
        if not parts:
            raise ValueError("a CategoryIndex needs at least one category")
        self.parts = parts
        self.categories = sorted(parts)
        self.dim = next(iter(parts.values())).vectors.shape[1]
        self.epsilon = epsilon

    @classmethod
    def build(cls, vectors: Any, image_ids: Labels, categories: Labels, labels: Labels | None = None,
              listings: Labels | None = None,
              ann_min_size: int = 4096, n_neighbors: int = 30, seed: int = 0, epsilon: float = 0.1) -> CategoryIndex:
        """Group the rows by category and build each category's index (pynndescent when it has at least
        `ann_min_size` images, none below: exact search is as fast there). Refuses mismatched lengths."""
        unit = normalise(np.asarray(vectors, dtype=np.float32))
        n = unit.shape[0]
        columns = [np.asarray(c, dtype=object) if c is not None else np.full(n, None, dtype=object)
                   for c in (image_ids, categories, labels, listings)]
        if unit.ndim != 2 or any(c.shape != (n,) for c in columns):
            raise ValueError("vectors, image_ids, categories (and labels, listings) need one entry per row")
        ids, cats, labs, lists = columns
        parts = {}
        names, members = group_rows(cats)
        for name, rows in zip(names, members, strict=True):
            part = CategoryPart(ids[rows], labs[rows], lists[rows], np.ascontiguousarray(unit[rows]))
            if rows.size >= max(ann_min_size, n_neighbors + 2):
                part.ann = _build_ann(part.vectors, n_neighbors, seed)
            parts[str(name)] = part
        return cls(parts, epsilon)

    def size(self, category: str) -> int:
        """How many images the category holds (0 when it is not in the index)."""
        part = self.parts.get(category)
        return 0 if part is None else part.vectors.shape[0]

    def label_counts(self) -> dict[str, int]:
        """How many indexed images carry each input label: the relevant-item count R of recall@k."""
        labels = np.concatenate([p.labels for p in self.parts.values()])
        names, counts = np.unique(np.asarray([str(x) for x in labels if x is not None], dtype=object),
                                  return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}

    def _rows(self, unit_queries: np.ndarray, category: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        part = self.parts[category]
        if part.ann is None or k >= part.vectors.shape[0]:
            return exact_topk(unit_queries, part.vectors, k)
        found, distances = part.ann.query(unit_queries, k=k, epsilon=self.epsilon)
        scores = np.where(found >= 0, 1.0 - distances, np.nan).astype(np.float32)
        return found.astype(np.int64), scores

    def retrieve(self, query_vecs: Any, category: str, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar images of `category` to each query: ([B, k] image ids, [B, k] cosines), best
        first, None / NaN padded. Refuses a category the index does not hold, or k < 1."""
        if category not in self.parts:
            raise KeyError(f"category {category!r} is not in the index (it has {len(self.categories)} categories)")
        if k < 1:
            raise ValueError(f"retrieve needs k >= 1, got {k}")
        unit, _ = queries(query_vecs, self.dim)
        rows, scores = self._rows(unit, category, k)
        return _take(self.parts[category].ids, rows), scores

    def retrieve_many(self, query_vecs: Any, categories: Sequence[str | None], k: int = 10,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Retrieval for a batch whose queries go to different categories (None: skip the query), one call per
        category. Returns ([B, k] ids, [B, k] cosines, [B, k] input labels of the matches), padded. Refuses
        (KeyError) a category the index does not hold."""
        unit, _ = queries(query_vecs, self.dim)
        wanted = np.asarray(categories, dtype=object)
        ids = np.full((unit.shape[0], k), None, dtype=object)
        labels = np.full((unit.shape[0], k), None, dtype=object)
        scores = np.full((unit.shape[0], k), np.nan, dtype=np.float32)
        chosen = np.flatnonzero(wanted != None)  # noqa: E711 - elementwise comparison of an object array
        names, groups = group_rows(wanted[chosen]) if chosen.size else (np.empty(0), [])
        unknown = sorted({str(c) for c in names} - set(self.parts))
        if unknown:
            raise KeyError(f"categories not in the index: {', '.join(unknown[:5])}")
        for category, positions in zip(names, groups, strict=True):
            members = chosen[positions]
            rows, part_scores = self._rows(unit[members], str(category), k)
            ids[members] = _take(self.parts[str(category)].ids, rows)
            labels[members] = _take(self.parts[str(category)].labels, rows)
            scores[members] = part_scores
        return ids, scores, labels

    def best_per_category(self, query_vecs: Any) -> np.ndarray:
        """[B, C] cosine of each query to its most similar image of each category (`categories` order)."""
        unit, _ = queries(query_vecs, self.dim)
        return np.stack([self._rows(unit, c, 1)[1][:, 0] for c in self.categories], axis=1)

    def typical_similarity(self, sample: int = 200, seed: int = 0) -> np.ndarray:
        """[C] each category's typical similarity: the median, over up to `sample` of its images, of the cosine
        to their most similar other image of the category (NaN for a category of one image)."""
        rng = np.random.default_rng(seed)
        typical = np.full(len(self.categories), np.nan, dtype=np.float32)
        for position, category in enumerate(self.categories):
            members = self.parts[category].vectors
            if len(members) < 2:
                continue
            picked = np.sort(rng.choice(len(members), size=min(sample, len(members)), replace=False))
            typical[position] = np.median(exact_topk(members[picked], members, 1, exclude=picked)[1][:, 0])
        return typical

    def nearest(self, unit_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k nearest images of unit queries over every category, merged from each category's top k: ([B, k]
        category positions in `categories`, [B, k] rows inside that category, [B, k] cosines), best first,
        PAD / NaN padded."""
        all_cats, all_rows, all_scores = [], [], []
        for position, category in enumerate(self.categories):
            rows, scores = self._rows(unit_queries, category, k)
            all_cats.append(np.where(rows >= 0, position, PAD))
            all_rows.append(rows)
            all_scores.append(np.where(rows >= 0, scores, -np.inf))
        cats, rows, scores = (np.concatenate(a, axis=1) for a in (all_cats, all_rows, all_scores))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(scores, order, axis=1)
        return (np.take_along_axis(cats, order, axis=1), np.take_along_axis(rows, order, axis=1),
                np.where(np.isfinite(best), best, np.nan).astype(np.float32))

    def column_at(self, cats: np.ndarray, rows: np.ndarray, column: str) -> np.ndarray:
        """The `column` ("ids" or "labels") of the images at (category position, row), None where PAD."""
        out = np.full(rows.shape, None, dtype=object)
        for position, category in enumerate(self.categories):
            here = cats == position
            out[here] = getattr(self.parts[category], column)[rows[here]]
        return out

    def vectors_at(self, cats: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[..., dim] unit vectors of the images at (category position, row), zero where PAD."""
        out = np.zeros((*rows.shape, self.dim), dtype=np.float32)
        for position, category in enumerate(self.categories):
            here = cats == position
            out[here] = self.parts[category].vectors[rows[here]]
        return out

    def search_all(self, query_vecs: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k nearest images over every category: ([B, k] ids, [B, k] cosines, [B, k] category positions in
        `categories`), PAD padded."""
        unit, _ = queries(query_vecs, self.dim)
        cats, rows, scores = self.nearest(unit, k)
        return self.column_at(cats, rows, "ids"), scores, cats

    def retrieve_all(self, query_vecs: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Retrieval over the whole index, whatever the category: ([B, k] ids, [B, k] cosines, [B, k] input
        labels of the matches), padded."""
        unit, _ = queries(query_vecs, self.dim)
        cats, rows, scores = self.nearest(unit, k)
        return self.column_at(cats, rows, "ids"), scores, self.column_at(cats, rows, "labels")


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows] with PAD rows as None."""
    out = np.full(rows.shape, None, dtype=object)
    found = rows >= 0
    out[found] = values[rows[found]]
    return out


def _build_ann(unit_vectors: np.ndarray, n_neighbors: int, seed: int) -> Any:
    import pynndescent  # numba-compiled: imported only where an index is built (gatrep/__init__ sets its cache)

    ann = pynndescent.NNDescent(unit_vectors, metric="cosine", n_neighbors=n_neighbors, random_state=seed)
    ann.prepare()
    return ann


# ----------------------------------------------------------------------------------------------
# The query path: category scores -> chosen category -> top-k matches inside it


@dataclasses.dataclass(frozen=True)
class SearchResults:
    """A batch's answers: `ok[b]` is False for a query vector with NaN/inf (no category, no matches)."""

    names: np.ndarray
    category: np.ndarray
    category_scores: np.ndarray
    match_ids: np.ndarray
    match_scores: np.ndarray
    match_labels: np.ndarray
    ok: np.ndarray

    def columns(self) -> dict[str, list[Any]]:
        """Columns for the results table: category, category_scores (list of {category, score} in category
        order) and matches (list of {image_id, score}, best first, padding dropped)."""
        scores = [[{"category": str(n), "score": float(s)} for n, s in zip(self.names, row, strict=True)] if ok
                  else None for row, ok in zip(self.category_scores, self.ok, strict=True)]
        matches = [[{"image_id": i, "score": float(s)} for i, s in zip(ids, row, strict=True) if i is not None]
                   for ids, row in zip(self.match_ids, self.match_scores, strict=True)]
        return {"category": list(self.category), "category_scores": scores, "matches": matches}


def review(scores: np.ndarray, best: np.ndarray, typical: np.ndarray, min_confidence: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [B], review reasons [B]) of categorized queries. `scores` [B, C] are the category scores,
    `best` [B, C] each query's best cosine per category and `typical` [C] each category's typical one (see
    CategoryIndex.typical_similarity). Confidence is the margin between the two best scores; a query needs review
    when it is below `min_confidence` (low_confidence), or when its best cosine to every category (of two images
    or more) is below that category's typical similarity (unlike_every_category: a possible new category).
    A reason is None when there is none, else the reasons joined by commas."""
    top = -np.sort(-np.nan_to_num(scores, nan=-np.inf), axis=1)
    confidence = (top[:, 0] - top[:, 1]) if scores.shape[1] > 1 else np.ones(len(scores))
    known = np.isfinite(typical)
    unlike = (best[:, known] < typical[known]).all(axis=1) & known.any()
    low = confidence < min_confidence - 1e-6  # vote-share margins are multiples of 1/k: 0.3 - 0.1 is not 0.2
    reasons = np.array([",".join(name for name, flag in (("low_confidence", lo), ("unlike_every_category", un)) if flag)
                        or None for lo, un in zip(low, unlike, strict=True)], dtype=object)
    return confidence.astype(np.float32), reasons


# ----------------------------------------------------------------------------------------------
# Retrieval by look: the thesis's content, style and adaptive similarities

# What retrieval ranks by (`--similarity`): the content vectors (the default), the style vectors, or the
# adaptive score of both.
SIMILARITIES = ("content", "style", "adaptive")


def adaptive_score(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """The thesis's adaptive similarity (S_c * S_s)(S_c + S_s): high only where both are high. Cosines below
    0 count as 0: the thesis's ReLU features never have them, and two negatives must not multiply into a
    high score."""
    c, s = np.clip(content, 0.0, None), np.clip(style, 0.0, None)
    return (c * s) * (c + s)


def retrieve_adaptive(content: CategoryIndex, style: CategoryIndex, query_content: Any, query_style: Any,
                      categories: Sequence[str | None], k: int = 10, candidates: int | None = 100,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Retrieval inside each query's category by the adaptive score. Each query's candidates are its
    `candidates` nearest images by content and as many by style (exact or ANN, as each index holds them); their
    exact adaptive scores pick the k best. `candidates=None` scores every image of the category (exhaustive:
    what `bench/style.py` measures the candidate recall against). `content` and `style` must be built over
    the same rows (index.run does). Returns ([B, k] ids, [B, k] scores, [B, k] input labels), padded."""
    qc, _ = queries(query_content, content.dim)
    qs, _ = queries(query_style, style.dim)
    wanted = np.asarray(categories, dtype=object)
    ids = np.full((qc.shape[0], k), None, dtype=object)
    labels = np.full((qc.shape[0], k), None, dtype=object)
    scores = np.full((qc.shape[0], k), np.nan, dtype=np.float32)
    for b in np.flatnonzero(wanted != None):  # noqa: E711 - elementwise comparison of an object array
        category = str(wanted[b])
        if category not in content.parts:
            raise KeyError(f"categories not in the index: {category}")
        part, style_part = content.parts[category], style.parts[category]
        size = part.vectors.shape[0]
        if candidates is None or candidates >= size:
            rows = np.arange(size)
        else:
            by_content = content._rows(qc[b:b + 1], category, candidates)[0][0]
            by_style = style._rows(qs[b:b + 1], category, candidates)[0][0]
            rows = np.unique(np.concatenate([by_content, by_style]))
            rows = rows[rows >= 0]
        score = adaptive_score(part.vectors[rows] @ qc[b], style_part.vectors[rows] @ qs[b])
        best = np.argsort(-score, kind="stable")[:k]
        ids[b, :best.size] = part.ids[rows[best]]
        labels[b, :best.size] = part.labels[rows[best]]
        scores[b, :best.size] = score[best]
    return ids, scores, labels


# How a category is scored (`--scoring`; config.py validates against it, Searcher.categorize dispatches on it):
# one representative, the max / mean over the category's several representatives, or a vote of the k nearest
# images.
SCORINGS = ("single", "max", "mean", "knn")
# Where matches come from (`--scope`): the chosen category (the paper's path) or the whole index.
SCOPES = ("category", "all")


@dataclasses.dataclass(frozen=True)
class Options:
    """How the query path votes, expands queries and retrieves (the query stage's flags of the same names)."""

    vote_power: float = 0.0  # knn scoring: a neighbour's vote is its cosine ** vote_power (0: one vote each)
    expand: int = 0  # query expansion: nearest indexed images added to each query before retrieval (0: none)
    expand_power: float = 1.0  # query expansion: each added image weighted by its cosine ** expand_power
    scope: str = "category"  # one of SCOPES

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.vote_power < 0 or self.expand < 0 or self.expand_power < 0:
            raise ValueError("vote_power, expand and expand_power must be >= 0")


@dataclasses.dataclass
class Searcher:
    """Category representatives plus the per-category retrieval index: the whole query path of the paper.

    `names[c]`, `representatives[c]` and `central[c]` (its extra representatives, [m, d]) describe category c;
    `labels[c]` is the input category most of its images carry (for evaluation). `style` is the retrieval index
    of the same images' style vectors, when they were embedded with --style. `options` say how to vote, expand
    and retrieve.
    """

    names: np.ndarray
    representatives: np.ndarray
    central: list[np.ndarray]
    labels: np.ndarray
    index: CategoryIndex
    style: CategoryIndex | None = None
    options: Options = Options()

    def categorize(self, query_vecs: Any, scoring: str = "single", k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(best category [B], scores [B, C]) by one representative, the max/mean over the top-m central
        ones, or a k-NN vote over the index. Refuses an unknown scoring."""
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        if scoring == "single":
            return categorize(query_vecs, self.representatives, list(self.names))
        if scoring in ("max", "mean"):
            return categorize_multi(query_vecs, self.central, list(self.names), reduce=scoring)
        best, votes = knn_vote(query_vecs, self.index, k, self.options.vote_power)
        position = {name: i for i, name in enumerate(self.index.categories)}
        order = [position[str(n)] for n in self.names]
        return best, votes[:, order]

    def search(self, query_vecs: Any, k: int = 10, scoring: str = "single", similarity: str = "content",
               query_style: Any = None, candidates: int | None = 100) -> SearchResults:
        """Categorize every query (by content), then retrieve its k best matches inside the chosen category (or
        the whole index: `options.scope`) by `similarity` (see `retrieve`). With `options.expand`, retrieval by
        content (only) re-ranks with each query expanded from its nearest indexed images (`expand_queries`);
        categorization keeps the query as it is (expansion measured better for retrieval only: README)."""
        self.check_similarity(similarity, query_style)
        _, ok = queries(query_vecs, self.index.dim)
        if similarity != "content":
            assert self.style is not None
            ok &= queries(query_style, self.style.dim)[1]
        clean = np.where(ok[:, None], np.asarray(query_vecs, dtype=np.float32), 0.0)
        best, scores = self.categorize(clean, scoring, k)
        best = np.where(ok, best, np.asarray(None, dtype=object))
        if self.options.expand and similarity == "content":
            expanded = expand_queries(clean, self.index, self.options.expand, self.options.expand_power)
            clean = np.where(ok[:, None], expanded, 0.0)
        ids, match_scores, match_labels = self.retrieve(clean, best, k, similarity, query_style, candidates)
        return SearchResults(self.names, best, np.where(ok[:, None], scores, np.nan).astype(np.float32), ids,
                             match_scores, match_labels, ok)

    def check_similarity(self, similarity: str, query_style: Any = None) -> None:
        """Refuse an unknown similarity, or style and adaptive without the style vectors they rank by."""
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        if similarity != "content" and (self.style is None or query_style is None):
            raise ValueError(f"similarity {similarity!r} needs style vectors of the index and of the queries")
        if similarity == "adaptive" and self.options.scope == "all":
            raise ValueError("similarity 'adaptive' ranks inside a category; use it with scope 'category'")

    def retrieve(self, query_vecs: Any, categories: Labels, k: int, similarity: str = "content",
                 query_style: Any = None, candidates: int | None = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k best matches of each query inside its category (None: none), or over the whole index with
        `options.scope` "all", by content, by style (needs `query_style`) or by the adaptive score (see
        retrieve_adaptive): ([B, k] ids, scores, input labels)."""
        self.check_similarity(similarity, query_style)
        if self.options.scope == "all":
            ids, scores, labels = (self.index.retrieve_all(query_vecs, k) if similarity == "content"
                                   else self.style.retrieve_all(query_style, k))  # type: ignore[union-attr]
            skip = np.asarray(categories, dtype=object) == None  # noqa: E711 - elementwise comparison
            ids[skip], scores[skip], labels[skip] = None, np.nan, None
            return ids, scores, labels
        if similarity == "content":
            return self.index.retrieve_many(query_vecs, list(categories), k)
        assert self.style is not None
        if similarity == "style":
            return self.style.retrieve_many(query_style, list(categories), k)
        return retrieve_adaptive(self.index, self.style, query_vecs, query_style, list(categories), k, candidates)
