"""Inline SVG charts written by hand (a line chart, a scatter and its legend) and the 2-D projection of the map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gatrep.report.html import esc

# Categorical colours for the 2-D map (Tableau 10 + 2); categories past these are drawn grey as "other".
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#17becf", "#bcbd22", "#1f3a93")
OTHER_COLOUR = "#c8c8c8"
MAP_METHODS = ("tsne", "pca")  # the 2-D projections `project` knows
TSNE_MIN_ROWS = 10  # below this many rows, t-SNE has too few neighbours: the map uses PCA alone


# ----------------------------------------------------------------------------------------------
# Charts: inline SVG written by hand (matplotlib is not a dependency, and SVG text stays small and sharp)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) inside [low, high], about `count` of them."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _span(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        pad = abs(low) * 0.05 or 1.0
        return low - pad, high + pad
    return low, high


def _y_axis(y: np.ndarray, log: bool) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """(plotted values, [(tick position, label)]): log10 with ticks at powers of ten (or round log steps) when
    `log`, else the values with nice ticks."""
    if not log:
        low, high = _span(y)
        return y, [(t, f"{t:g}") for t in nice_ticks(low, high)]
    logged = np.log10(y)
    low, high = _span(logged)
    powers = [float(p) for p in range(math.ceil(low), math.floor(high) + 1)]
    ticks = powers if len(powers) >= 2 else nice_ticks(low, high)
    return logged, [(t, f"{10 ** t:.3g}") for t in ticks]


def svg_line(xs: Sequence[float], ys: Sequence[float], width: int = 640, height: int = 240, xlabel: str = "epoch",
             ylabel: str = "loss", max_points: int = 1000, log_y: bool | None = None) -> str:
    """A line chart (e.g. loss per epoch) as an inline <svg> with round ticks; non-finite points are dropped and at
    most `max_points` (evenly strided, last kept) are drawn. The y axis is logarithmic when `log_y`, or, when None,
    when every y is positive and they span at least a factor of 50. Refuses xs and ys of different lengths."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"svg_line needs as many xs as ys, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return '<p class="empty">no finite points to draw</p>'
    if x.size > max_points:
        idx = np.unique(np.append(np.linspace(0, x.size - 1, max_points).astype(int), x.size - 1))
        x, y = x[idx], y[idx]
    log = bool(y.min() > 0 and y.max() / y.min() >= 50) if log_y is None else (log_y and bool(y.min() > 0))
    y, y_ticks = _y_axis(y, log)
    left, right, top, bottom = 64, 16, 12, 40
    (x0, x1), (y0, y1) = _span(x), _span(y)
    sx = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(ylabel)} by {esc(xlabel)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="#fafafa" stroke="#ccc"/>']
    for t in nice_ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:g}</text>')
    for t, label in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{label}</text>')
    points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y, strict=True))
    parts.append(f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{points}"/>')
    if x.size == 1:
        parts.append(f'<circle cx="{sx(x[0]):.1f}" cy="{sy(y[0]):.1f}" r="3" fill="#2563eb"/>')
    middle_x, middle_y = (left + width - right) / 2, (top + height - bottom) / 2
    ylabel = f"{ylabel}, log scale" if log else ylabel
    parts.append(f'<text x="{middle_x:.0f}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>'
                 f'<text x="14" y="{middle_y:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {middle_y:.0f})">{esc(ylabel)}</text></svg>')
    return "".join(parts)


def colours(groups: Sequence[str]) -> dict[str, str]:
    """A colour per group: the most frequent groups get the palette (ties by name), the rest OTHER_COLOUR."""
    names, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    order = sorted(range(names.size), key=lambda i: (-counts[i], names[i]))
    return {str(names[i]): PALETTE[rank] if rank < len(PALETTE) else OTHER_COLOUR for rank, i in enumerate(order)}


def svg_scatter(xy: np.ndarray, groups: Sequence[str], width: int = 640, height: int = 480) -> str:
    """A scatter plot of [n, 2] points coloured by group (see `colours`), each point titled with its group.
    Refuses a shape other than [n, 2] or a group count other than n."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != len(groups):
        raise ValueError(f"svg_scatter needs [n, 2] points and n groups, got {xy.shape} and {len(groups)}")
    pad = 10
    colour = colours(groups)
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="2-D map">'
             f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ccc"/>']
    if xy.shape[0]:
        (x0, x1), (y0, y1) = _span(xy[:, 0]), _span(xy[:, 1])
        px = pad + (xy[:, 0] - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad - (xy[:, 1] - y0) / (y1 - y0) * (height - 2 * pad)
        # Grey "other" points first, so that coloured ones are drawn on top.
        order = sorted(range(len(groups)), key=lambda i: colour[str(groups[i])] != OTHER_COLOUR)
        for i in order:
            g = str(groups[i])
            parts.append(f'<circle cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="3" fill="{colour[g]}" fill-opacity="0.8">'
                         f"<title>{esc(g)}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


def legend(groups: Sequence[str]) -> str:
    """The scatter's legend: one swatch per palette colour with its group and count, then 'other'."""
    colour = colours(groups)
    counts: dict[str, int] = {}
    for g in groups:
        counts[str(g)] = counts.get(str(g), 0) + 1
    named = sorted((c for c in colour if colour[c] != OTHER_COLOUR), key=lambda c: (-counts[c], c))
    items = [f'<li><span class="sw" style="background:{colour[c]}"></span>{esc(c)} ({counts[c]:,})</li>'
             for c in named]
    others = [c for c in colour if colour[c] == OTHER_COLOUR]
    if others:
        items.append(f'<li><span class="sw" style="background:{OTHER_COLOUR}"></span>{len(others):,} other groups '
                     f"({sum(counts[c] for c in others):,})</li>")
    return f'<ul class="legend">{"".join(items)}</ul>'


# ----------------------------------------------------------------------------------------------
# The 2-D projection


def uses_tsne(method: str, n: int) -> bool:
    """Whether `project` maps `n` rows with t-SNE (else with PCA alone)."""
    return method == "tsne" and n >= TSNE_MIN_ROWS


def projection_name(method: str, n: int) -> str:
    """How `project` maps `n` rows with `method`, in words for the page."""
    return "t-SNE after PCA to 50 dimensions" if uses_tsne(method, n) else "PCA (first 2 components)"


def project(unit: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[n, 2] coordinates of the rows of `unit`: PCA to at most 50 dimensions, then t-SNE (method 'tsne', at least
    TSNE_MIN_ROWS rows) or the first two principal components. Refuses a method not in MAP_METHODS."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if method not in MAP_METHODS:
        raise ValueError(f"map method must be {' or '.join(MAP_METHODS)}, not {method!r}")
    n, d = unit.shape
    if n < 3 or d < 2:
        return np.column_stack([unit[:, 0] if d else np.zeros(n), np.zeros(n)]).astype(np.float64)
    reduced = PCA(min(50, d, n), random_state=seed).fit_transform(unit.astype(np.float64))
    if not uses_tsne(method, n):
        return reduced[:, :2] if reduced.shape[1] >= 2 else np.column_stack([reduced[:, 0], np.zeros(n)])
    tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed, max_iter=500)
    # One OpenMP thread: on a busy machine the threads' spin-waits made t-SNE of 2,000 points take 18 s instead of 4.
    with threadpool_limits(1):
        return np.asarray(tsne.fit_transform(reduced), dtype=np.float64)
