"""The report's sections, rendered from already-loaded stage data (no file is read here) into HTML fragments."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from gatrep import schemas
from gatrep.config import ReportConfig
from gatrep.report.charts import PALETTE, legend, projection_name, svg_line, svg_scatter
from gatrep.report.html import cut, esc, heat, num, page, placeholder, section, shade
from gatrep.report.thumbnails import Thumbnails, figure

if TYPE_CHECKING:  # the loaders' value types; gatrep.stages.report imports this module
    from gatrep.stages.report import IndexView, Inputs, Loaded, Looks, MapData, QuerySample, Training

CLOSEST_PAIRS = 6  # most similar listing pairs shown with their representatives when nothing reaches the threshold

SECTIONS = (("categories", "Categories", "Categories and their representatives"),
            ("queries", "Queries", "Sampled queries"), ("looks", "Look-alikes", "Matches by content, style and both"),
            ("evaluation", "Evaluation", "Evaluation"),
            ("training", "Training", "Training"), ("map", "2-D map", "2-D map of the latents"),
            ("similarity", "Similarity", "Listing similarity and merge suggestions"),
            ("inputs", "Bad inputs", "Bad inputs"), ("about", "Sampling", "How this report was sampled"))

STATUS_MEANING = {
    schemas.OK: "decoded and embedded",
    schemas.UNREADABLE: "the URI could not be opened or read",
    schemas.EMPTY: "zero bytes",
    schemas.NOT_AN_IMAGE: "no image format recognised",
    schemas.UNSUPPORTED_FORMAT: "an image format gatrep does not decode",
    schemas.TRUNCATED: "data ends early or is corrupt",
    schemas.TOO_LARGE: "over the pixel or byte limit",
    schemas.DECODE_ERROR: "anything else the decoder raised",
    schemas.BLANK: "an all-zero vector (a blank image): left out of the graph",
}


@dataclasses.dataclass
class Context:
    """What every section renderer shares: the config, the thumbnails, image id -> URI, and the sampling notes."""

    cfg: ReportConfig
    thumbs: Thumbnails
    uri_of: dict[str, str] = dataclasses.field(default_factory=dict)
    category_of: dict[str, str | None] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # already-escaped HTML, one per bounded section

    def image(self, image_id: str | None, alt: str) -> str:
        """A thumbnail marker for an image id (a placeholder when the embeddings stage does not name its URI)."""
        uri = self.uri_of.get(image_id) if image_id else None
        return self.thumbs.img(uri, alt, "no image id" if not image_id else "URI unknown")

    def figure(self, image_id: str | None, caption: str, alt: str, css: str = "") -> str:
        """`image` with an (already escaped) caption."""
        cls = f' class="{css}"' if css else ""
        return f"<figure{cls}>{self.image(image_id, alt)}<figcaption>{caption}</figcaption></figure>"


def render_categories(ctx: Context, index: Loaded) -> str:
    """Every shown category's representative, most central images with z-scores, and listing representatives
    (the paper's Figures 6, 8, 11, 16), then a table of all categories."""
    if not index.ok:
        return index.note()
    view: IndexView = index.value
    shown = view.categories[: ctx.cfg.categories]
    ctx.notes.append(f"Categories: {len(shown):,} of {len(view.categories):,} shown in full (the largest), each with "
                     f"at most {ctx.cfg.central} most central images and {ctx.cfg.listings_per_category} listing "
                     f"representatives (the largest listings).")
    cards = [category_card(ctx, c, view.listings.get(c[schemas.CATEGORY], []),
                           view.rep_listing.get(c[schemas.CATEGORY])) for c in shown]
    method = view.manifest.get("config", {}).get("method", "?")
    intro = (f"<p>{len(view.categories):,} categories, {view.listing_count:,} listings; representatives by "
             f"<b>{esc(method)}</b> over <code>{esc(view.manifest.get('config', {}).get('source', '?'))}</code>. "
             "A z-score says how much more central an image is than its listing's average.</p>")
    return intro + '<div class="cats">' + "".join(cards) + "</div>" + category_table(ctx, view.categories)


def short_listing(listing: Any, category: str) -> str:
    """A listing's name without its category prefix (`shirts/listing-1` in shirts -> `listing-1`), for captions."""
    text = str(listing)
    return text[len(category) + 1:] if text.startswith(f"{category}/") and len(text) > len(category) + 1 else text


def category_card(ctx: Context, cat: dict[str, Any], listings: list[dict[str, Any]],
                  rep_listing: dict[str, Any] | None) -> str:
    """One category: representative image, the representative listing's most central images with z-scores, and
    its listings' representatives when it has more than the one listing named after it."""
    name = str(cat[schemas.CATEGORY])
    label = cat.get(schemas.LABEL)
    labelled = f" \u00b7 label {esc(label)}" if label is not None and label != name else ""
    head = (f"<h3>{esc(name)} <small>{num(cat.get(schemas.SIZE))} images \u00b7 {num(cat.get(schemas.LISTINGS))} "
            f"listing(s){labelled}</small></h3>")
    source = esc(cut(short_listing(cat.get(schemas.REPRESENTATIVE_LISTING), name), 32))
    rep = ctx.figure(cat.get(schemas.REPRESENTATIVE_IMAGE_ID), f"representative<br>{source}", f"{name}: representative",
                     "rep")
    blocks = [f'<div class="block">{rep}</div>']
    if rep_listing is not None:
        blocks.append(central_block(ctx, name, rep_listing))
    if len(listings) > 1 or (listings and listings[0][schemas.LISTING] != name):
        blocks.append(listings_block(ctx, name, listings, int(cat.get(schemas.LISTINGS) or 0)))
    return f'<div class="card">{head}<div class="row">{"".join(blocks)}</div></div>'


def central_block(ctx: Context, name: str, rep_listing: dict[str, Any]) -> str:
    """The representative listing's top-k most central images, each with its z-score."""
    ids = (rep_listing.get(schemas.CENTRAL_IMAGE_IDS) or [])[: ctx.cfg.central]
    zs = rep_listing.get(schemas.CENTRAL_ZSCORES) or []
    figs = [ctx.figure(i, f"#{k + 1} z {num(zs[k] if k < len(zs) else None, 2)}", f"{name}: central #{k + 1}")
            for k, i in enumerate(ids)]
    rep_name = rep_listing[schemas.LISTING]
    where = "" if rep_name == name else f" of listing {esc(cut(short_listing(rep_name, name), 32))}"
    return (f'<div class="block"><h4>most central{where} (z-score)</h4><div class="strip">{"".join(figs)}'
            "</div></div>")


def listings_block(ctx: Context, name: str, listings: list[dict[str, Any]], listing_count: int) -> str:
    """The representatives of the category's largest listings, with each listing's size and z-score."""
    figs = [ctx.figure(r.get(schemas.REPRESENTATIVE_IMAGE_ID),
                       f"{esc(cut(short_listing(r[schemas.LISTING], name), 24))}<br>{num(r.get(schemas.SIZE))} img "
                       f"\u00b7 z {num(r.get(schemas.ZSCORE), 2)}", f"listing {r[schemas.LISTING]}: representative")
            for r in listings]
    more = listing_count - len(listings)
    extra = f'<p class="more">+ {more:,} more listings</p>' if more > 0 else ""
    return (f'<div class="block"><h4>listing representatives</h4><div class="strip">{"".join(figs)}</div>'
            f"{extra}</div>")


def category_table(ctx: Context, categories: list[dict[str, Any]]) -> str:
    """All categories (at most `table_rows`) as a collapsed table."""
    rows = categories[: ctx.cfg.table_rows]
    body = "".join(f"<tr><td>{esc(c[schemas.CATEGORY])}</td><td>{esc(c.get(schemas.LABEL))}</td>"
                   f'<td class="n">{num(c.get(schemas.LISTINGS))}</td><td class="n">{num(c.get(schemas.SIZE))}</td>'
                   f"<td>{esc(cut(c.get(schemas.REPRESENTATIVE_LISTING), 60))}</td></tr>" for c in rows)
    cut_note = f" (the {len(rows):,} largest of {len(categories):,})" if len(rows) < len(categories) else ""
    if len(rows) < len(categories):
        ctx.notes.append(f"Category table: the {len(rows):,} largest of {len(categories):,} categories.")
    return (f"<details><summary>All categories{cut_note}</summary><table><thead><tr><th>category</th><th>label</th>"
            f"<th>listings</th><th>images</th><th>representative listing</th></tr></thead><tbody>{body}</tbody>"
            "</table></details>")


def render_queries(ctx: Context, results: Loaded, index: Loaded) -> str:
    """Sampled queries, each beside its predicted category, the category scores, and its top matches
    (the paper's Figures 7, 13, 17, 19)."""
    if not results.ok:
        return results.note()
    sample: QuerySample = results.value
    categories = index.value.categories if index.ok else []
    reps = {c[schemas.CATEGORY]: c.get(schemas.REPRESENTATIVE_IMAGE_ID) for c in categories}
    shown_wrong = sum(1 for r in sample.rows
                      if r[schemas.LABEL] is not None and r[schemas.LABEL] != r[schemas.CATEGORY])
    ctx.notes.append(f"Queries: {len(sample.rows):,} of {sample.total:,} drawn at random (seed {ctx.cfg.seed}), "
                     f"{shown_wrong:,} of them from the {sample.wrong:,} misclassified; {ctx.cfg.matches} matches "
                     "shown per query.")
    statuses = ", ".join(f"{esc(s)}: {c:,}" for s, c in sorted(sample.statuses.items()))
    method = sample.manifest.get("method") or sample.manifest.get("config", {}).get("index", "")
    intro = (f"<p><code>{esc(results.uri)}</code>: {sample.total:,} queries ({statuses}) searched with "
             f"<b>{esc(method)}</b>; {sample.judged:,} "
             f"labelled, {sample.wrong:,} of them put in another category than their label. A green frame marks a "
             "match with the query's label, a red one a match with another.</p>")
    return intro + "".join(query_card(ctx, r, reps) for r in sample.rows)


def query_card(ctx: Context, row: dict[str, Any], reps: dict[str, Any]) -> str:
    """One query: its image and label, the predicted category's representative, category scores, top matches."""
    label, predicted = row[schemas.LABEL], row[schemas.CATEGORY]
    verdict = "unlabelled" if label is None else ("right" if label == predicted else "wrong")
    mark = {"unlabelled": "", "right": " \u2713", "wrong": " \u2717"}[verdict]
    query_fig = figure(ctx.thumbs, row[schemas.URI], f"query<br>label {esc(cut(label, 24))}",
                       f"query {cut(row[schemas.URI], 120)}")
    predicted_fig = ctx.figure(reps.get(predicted), f"predicted{mark}<br>{esc(cut(predicted, 24))}",
                               f"category {predicted}: representative", f"pred {verdict}")
    matches = []
    for k, m in enumerate((row[schemas.MATCHES] or [])[: ctx.cfg.matches]):
        css = ""
        if label is not None and m[schemas.IMAGE_ID] in ctx.category_of:
            css = "hit" if ctx.category_of[m[schemas.IMAGE_ID]] == label else "miss"
        matches.append(ctx.figure(m[schemas.IMAGE_ID], f"#{k + 1} {num(m.get('score'), 4)}", f"match #{k + 1}", css))
    return (f'<div class="card query {verdict}"><div class="row"><div class="block">{query_fig}</div>'
            f'<div class="block">{predicted_fig}</div><div class="block scores">{score_bars(row, label)}</div>'
            f'<div class="block"><h4>top matches in {esc(cut(predicted, 32))}</h4><div class="strip">'
            f'{"".join(matches) or "<p>no matches</p>"}</div></div></div></div>')


def render_looks(ctx: Context, looks: Loaded | None) -> str:
    """Sampled queries with their top matches in each --looks results stage side by side, one row per stage
    (the thesis's recommendations by content, by style and by the adaptive score)."""
    if looks is None:
        return ("<p>Not shown: no <code>--looks</code>. Embed with <code>--style true</code>, query the same images "
                "with <code>--similarity content</code>, <code>style</code> and <code>adaptive</code> into three "
                "results stages, and name them in <code>--looks</code> (<code>jobs.pipeline --style true</code> "
                "does all of it).</p>")
    if not looks.ok:
        return looks.note()
    value: Looks = looks.value
    ctx.notes.append(f"Look-alikes: {len(value.queries):,} queries drawn (seed {ctx.cfg.seed}) from "
                     f"<code>{esc(ctx.cfg.looks[0])}</code>, {ctx.cfg.matches} matches per results stage.")
    cards = []
    for row in value.queries:
        query_fig = figure(ctx.thumbs, row[schemas.URI], f"query<br>in {esc(cut(row[schemas.CATEGORY], 24))}",
                           f"query {cut(row[schemas.URI], 120)}")
        strips = []
        for method, matches in zip(value.methods, value.matches, strict=True):
            found = [ctx.figure(m[schemas.IMAGE_ID], f"#{k + 1} {num(m.get('score'), 3)}", f"{method} #{k + 1}")
                     for k, m in enumerate(matches[row[schemas.QUERY_ID]])]
            strips.append(f'<div class="block"><h4>{esc(method)}</h4><div class="strip">'
                          f'{"".join(found) or "<p>no matches</p>"}</div></div>')
        cards.append(f'<div class="card query"><div class="row"><div class="block">{query_fig}</div>'
                     f'{"".join(strips)}</div></div>')
    return ("<p>The same queries, each row of matches from one results stage: ranked by content (the same kind of "
            "thing), by style (the same look: palette, texture) or by the adaptive score, high only where both "
            "are.</p>" + "".join(cards))


def score_bars(row: dict[str, Any], label: str | None, top: int = 5) -> str:
    """The `top` best category scores as bars, the predicted category in bold, the label's category underlined."""
    scores = sorted(row[schemas.CATEGORY_SCORES] or [], key=lambda s: -(s.get("score") or -math.inf))[:top]
    bars = []
    for s in scores:
        value = s.get("score")
        width = 0.0 if value is None or not math.isfinite(value) else min(max(value, 0.0), 1.0) * 100
        css = " ".join(c for c, on in (("best", s["category"] == row[schemas.CATEGORY]),
                                       ("truth", s["category"] == label)) if on)
        bars.append(f'<div class="bar {css}"><span class="name">{esc(cut(s["category"], 20))}</span>'
                    f'<span class="track"><span style="width:{width:.0f}%"></span></span>'
                    f'<span class="v">{num(value, 4)}</span></div>')
    n = len(row[schemas.CATEGORY_SCORES] or [])
    return f"<h4>category scores (top {len(scores)} of {n})</h4>" + "".join(bars)


def _get(document: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


METRIC_ROWS: tuple[tuple[str, tuple[str, ...], bool], ...] = (  # (row title, path in a method's JSON, higher is better)
    ("Categorization accuracy", ("categorization", "accuracy"), True),
    ("Macro precision", ("categorization", "macro", "precision"), True),
    ("Macro recall", ("categorization", "macro", "recall"), True),
    ("Macro F1", ("categorization", "macro", "f1"), True),
    ("Weighted F1", ("categorization", "weighted", "f1"), True),
    ("precision@k", ("retrieval", "precision"), True),
    ("recall@k", ("retrieval", "recall"), True),
    ("mAP@k", ("retrieval", "map"), True),
    ("queries judged", ("judged",), False),
    ("queries left out", ("left_out",), False),
)


def render_evaluation(ctx: Context, evaluation: Loaded) -> str:
    """Every method side by side (best of each row in bold), per-class F1, and a confusion matrix per method."""
    if not evaluation.ok:
        return evaluation.note()
    methods = [m for m in evaluation.value["methods"] if isinstance(m, dict)]
    if not methods:
        return '<p class="empty">The evaluation holds no methods.</p>'
    k = evaluation.value.get("k")
    head = "".join(f"<th>{esc(m.get('name'))}<br><small>{esc(m.get('results_stage'))}</small></th>" for m in methods)
    rows = []
    for title, path, best_bold in METRIC_ROWS:
        values = [_get(m, *path) for m in methods]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        best = max(finite) if finite and best_bold and len(methods) > 1 else None
        cells = "".join(f'<td class="n">{"<b>" if v == best else ""}{num(v)}{"</b>" if v == best else ""}</td>'
                        for v in values)
        rows.append(f"<tr><th>{esc(title.replace('@k', f'@{k}'))}</th>{cells}</tr>")
    table = (f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
             "</table>")
    confusions = "".join(
        f"<details{' open' if i == 0 else ''}><summary>Confusion matrix: {esc(m.get('name'))}</summary>"
        f"{confusion(ctx, m.get('confusion') or {})}</details>" for i, m in enumerate(methods))
    return (f'<div class="row"><div><h3>Methods side by side</h3>{table}</div><div><h3>Per-class F1</h3>'
            f"{per_class_f1(ctx, methods)}</div></div>{confusions}")


def per_class_f1(ctx: Context, methods: list[dict[str, Any]]) -> str:
    """A class x method table of F1 (shaded) with each class's support; above `classes` classes, the ones with the
    lowest F1 under the first method."""
    first = _get(methods[0], "categorization", "per_class") or {}
    names = sorted({c for m in methods for c in (_get(m, "categorization", "per_class") or {})})
    if len(names) > ctx.cfg.classes:
        names = sorted(names, key=lambda c: (_get(first, c, "f1") if _get(first, c, "f1") is not None else 2.0, c))
        names = names[: ctx.cfg.classes]
        ctx.notes.append(f"Per-class F1: the {len(names):,} classes with the lowest F1 under the first method.")
    head = "".join(f"<th>{esc(m.get('name'))}</th>" for m in methods)
    body = []
    for c in names:
        cells = []
        for m in methods:
            f1 = _get(m, "categorization", "per_class", c, "f1")
            cells.append(f'<td class="n"{heat(float(f1)) if isinstance(f1, (int, float)) else ""}>{num(f1, 2)}</td>')
        support = _get(first, c, "support")
        body.append(f'<tr><th>{esc(c)}</th><td class="n">{num(support)}</td>{"".join(cells)}</tr>')
    return (f'<table class="metrics"><thead><tr><th>class</th><th>support</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def confusion(ctx: Context, matrix_json: dict[str, Any]) -> str:
    """The confusion matrix (rows true, columns predicted; cells shaded by share of the row) up to `classes` labels,
    else its `pairs` largest off-diagonal cells."""
    labels = [str(x) for x in matrix_json.get("labels") or []]
    matrix = np.asarray(matrix_json.get("matrix") or [], dtype=np.float64)
    if not labels or matrix.shape != (len(labels), len(labels)):
        return '<p class="empty">no confusion matrix in the evaluation</p>'
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
    if len(labels) > ctx.cfg.classes:
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[: ctx.cfg.pairs]
        items = [f"<tr><td>{esc(labels[i])}</td><td>{esc(labels[j])}</td><td class='n'>{int(off[i, j]):,}</td>"
                 f"<td class='n'>{off[i, j] / rows[i, 0]:.1%}</td></tr>"
                 for i, j in zip(*np.unravel_index(flat, off.shape), strict=True) if off[i, j] > 0]
        return (f"<p>{len(labels):,} classes: the {len(items)} largest confusions.</p><table><thead><tr><th>true</th>"
                f"<th>predicted</th><th>queries</th><th>of the class</th></tr></thead><tbody>{''.join(items)}"
                "</tbody></table>")
    head = "".join(f'<th title="{esc(lab)}">{i + 1}</th>' for i, lab in enumerate(labels))
    body = "".join(
        f'<tr><th class="l">{i + 1}. {esc(cut(lab, 28))}</th>'
        + "".join(f'<td class="n"{shade(matrix[i, j] / rows[i, 0])}>{int(matrix[i, j]) or ""}</td>'
                  for j in range(len(labels))) + "</tr>" for i, lab in enumerate(labels))
    return (f'<table class="matrix"><thead><tr><th>true \u2193 / predicted \u2192</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def render_training(ctx: Context, training: Loaded) -> str:
    """The loss per epoch as a line chart, with the model's config and the training's timings."""
    if not training.ok:
        return training.note()
    t: Training = training.value
    model = t.manifest.get("model") or {}
    facts = ", ".join(f"{esc(k)} {esc(model[k])}" for k in ("encoder", "hidden", "heads", "latent_dim",
                                                            "decoder_hidden", "dropout") if k in model)
    skipped = f" {t.skipped:,} malformed line(s) of metrics.jsonl skipped." if t.skipped else ""
    if not t.losses:
        return f'<p class="empty">The model stage has no loss records in metrics.jsonl.{skipped}</p>'
    summary = (f"<p>{len(t.losses):,} epochs, final loss {num(t.losses[-1], 5)} (first {num(t.losses[0], 5)}); "
               f"model: {facts or 'config not recorded'}.{skipped}</p>")
    return summary + svg_line(t.epochs, t.losses, xlabel="epoch", ylabel="reconstruction loss (MSE)")


def render_map(ctx: Context, mapped: Loaded, fallback_note: str) -> str:
    """A 2-D map of sampled latents coloured by category, with its legend."""
    if not mapped.ok:
        return mapped.note()
    m: MapData = mapped.value
    how = projection_name(m.method, len(m.groups))
    among = "" if m.candidates == m.total else (
        f", from the {len(PALETTE)} largest of {m.group_count:,} categories ({m.candidates:,} rows)")
    ctx.notes.append(f"2-D map: {len(m.groups):,} of {m.total:,} rows of <code>{esc(m.source)}</code> drawn at random "
                     f"(seed {ctx.cfg.seed}){among}, {how}.")
    return (f"<p>{fallback_note}{len(m.groups):,} points of <code>{esc(m.source)}</code>{among} (unit-normalised), "
            f"{how}, coloured by input category (the listing when there is none).</p><div class=\"row\">"
            f"{svg_scatter(m.xy, m.groups)}{legend(m.groups)}</div>")


def render_similarity(ctx: Context, index: Loaded) -> str:
    """The listing similarity matrix (or its top pairs) and the merge suggestions with both representatives."""
    if not index.ok:
        return index.note()
    view: IndexView = index.value
    if view.names is not None and view.matrix is not None:
        part = similarity_matrix(view.names, view.matrix)
    else:
        ctx.notes.append(f"Listing similarity: {view.listing_count:,} listings are more than "
                         f"{ctx.cfg.similarity_listings}; the {len(view.top_pairs):,} most similar of "
                         f"{view.pair_count:,} stored pairs shown.")
        part = pair_table(view.top_pairs, f"The {len(view.top_pairs):,} most similar listing pairs of "
                                          f"{view.pair_count:,} stored")
    threshold = view.manifest.get("config", {}).get("merge_threshold")
    if view.merge_count > len(view.merges):
        ctx.notes.append(f"Merge suggestions: {len(view.merges):,} of {view.merge_count:,} shown (most similar).")
    merges = [merge_card(ctx, m, view.listing_rep) for m in view.merges]
    text = (f"<h3>Merge suggestions</h3><p>{view.merge_count:,} listing pairs reach the merge threshold "
            f"{num(threshold, 2)} (cosine of their representatives): they may be one category.")
    if not merges and view.top_pairs:
        text += f" The {min(CLOSEST_PAIRS, len(view.top_pairs))} most similar pairs, for comparison:"
        merges = [merge_card(ctx, m, view.listing_rep) for m in view.top_pairs[:CLOSEST_PAIRS]]
    return part + text + '</p><div class="strip">' + "".join(merges) + "</div>"


def similarity_matrix(names: list[str], matrix: np.ndarray) -> str:
    """The dense listing x listing cosine matrix. Off-diagonal cells are shaded from the lowest to the highest
    off-diagonal value, so that differences show whether the values spread over [0, 1] or bunch near 1."""
    n = len(names)
    off = matrix[~np.eye(n, dtype=bool)] if n > 1 else np.array([])
    off = off[np.isfinite(off)]
    low, high = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    scale = lambda v: (v - low) / (high - low) if high > low else 0.5  # noqa: E731
    head = "".join(f'<th title="{esc(name)}">{i + 1}</th>' for i, name in enumerate(names))
    body = "".join(
        f'<tr><th class="l">{i + 1}. {esc(cut(name, 28))}</th>'
        + "".join(f'<td class="n"{"" if i == j else shade(scale(float(matrix[i, j])))}>{num(float(matrix[i, j]), 3)}'
                  "</td>" for j in range(n)) + "</tr>" for i, name in enumerate(names))
    return (f"<p>Cosine similarity of the {n:,} listings' representatives; off-diagonal cells shaded from the lowest "
            f"({num(low, 3)}) to the highest ({num(high, 3)}).</p><table class=\"matrix\">"
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>")


def pair_table(pairs: list[dict[str, Any]], caption: str) -> str:
    """Listing pairs with their similarity, as a table."""
    rows = "".join(f"<tr><td>{esc(p[schemas.LISTING_A])}</td><td>{esc(p[schemas.LISTING_B])}</td>"
                   f'<td class="n">{num(p[schemas.SIMILARITY])}</td></tr>' for p in pairs)
    return (f"<p>{caption}.</p><table><thead><tr><th>listing</th><th>listing</th><th>cosine</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def merge_card(ctx: Context, merge: dict[str, Any], listing_rep: dict[str, str]) -> str:
    """One merge suggestion: both listings' representatives side by side, with the similarity (Figure 9)."""
    a, b = merge[schemas.LISTING_A], merge[schemas.LISTING_B]
    captions = [(x, esc(cut(x, 24)) + (f"<br>in {esc(cut(merge.get(c), 24))}" if merge.get(c) not in (None, x) else ""))
                for x, c in ((a, schemas.CATEGORY_A), (b, schemas.CATEGORY_B))]
    figs = "".join(ctx.figure(listing_rep.get(x), caption, f"listing {x}: representative") for x, caption in captions)
    return f'<div class="card merge"><div class="row">{figs}</div><p>cosine {num(merge[schemas.SIMILARITY])}</p></div>'


def render_inputs(ctx: Context, inputs: Loaded) -> str:
    """Counts of input rows by status and the first few examples of every bad status."""
    if not inputs.ok:
        return inputs.note()
    found: Inputs = inputs.value
    total = sum(found.counts.values())
    rows = "".join(f'<tr><td><code>{esc(s)}</code></td><td class="n">{c:,}</td><td class="n">{c / max(total, 1):.2%}'
                   f"</td><td>{esc(STATUS_MEANING.get(s, ''))}</td></tr>"
                   for s, c in sorted(found.counts.items(), key=lambda sc: (sc[0] != schemas.OK, -sc[1], sc[0])))
    table = (f"<table><thead><tr><th>status</th><th>rows</th><th>share</th><th>meaning</th></tr></thead>"
             f"<tbody>{rows}</tbody></table>")
    bad = sum(c for s, c in found.counts.items() if s != schemas.OK)
    if not bad:
        return f"<p>All {total:,} inputs decoded and embedded.</p>" + table
    ctx.notes.append(f"Bad inputs: the first {ctx.cfg.bad_examples} rows of each status other than ok.")
    examples = []
    for status in sorted(found.examples):
        for row in found.examples[status]:
            examples.append(f'<div class="bad">{placeholder(status, 48)}<div><code>{esc(cut(row[schemas.URI]))}'
                            f"</code><br><small>{esc(cut(row[schemas.ERROR]))}</small></div></div>")
    return (f"<p>{bad:,} of {total:,} inputs could not be used. Bad files are never decoded for the report: each "
            "example shows its status, URI and error.</p>" + table + "".join(examples))


def render_about(ctx: Context, loaded: dict[str, Loaded]) -> str:
    """The sampling notes, the thumbnail budget (filled in after the thumbnails), and each stage's state."""
    states = "".join(
        f"<tr><td>{esc(name)}</td><td><code>{esc(item.uri)}</code></td><td>"
        + ("read" if item.ok else ("<b>could not be read</b>" if item.error else "not run")) + "</td></tr>"
        for name, item in loaded.items())
    notes = "".join(f"<li>{n}</li>" for n in [bounds(ctx.cfg), *ctx.notes])
    return (f'<ul class="notes">{notes}<li><!--thumbstats--></li></ul><table><thead><tr><th>read for</th><th>stage</th>'
            f"<th>state</th></tr></thead><tbody>{states}</tbody></table>")


def bounds(cfg: ReportConfig) -> str:
    """The statement of how large the page can get, whatever the size of the run."""
    most = (cfg.categories * (1 + cfg.central + cfg.listings_per_category) + cfg.queries * (2 + cfg.matches)
            + cfg.look_queries * (1 + len(cfg.looks) * cfg.matches) + 2 * max(cfg.pairs, CLOSEST_PAIRS))
    return (f"Bounded whatever the run's size: at most {most:,} thumbnails ({cfg.thumb_px} px) and at most "
            f"{cfg.max_thumbnail_mb:g} MB of them (later ones become placeholders), {cfg.map_points:,} map points, a "
            f"full similarity matrix only up to {cfg.similarity_listings} listings, a confusion matrix up to "
            f"{cfg.classes} classes, {cfg.table_rows:,} rows in the category table. Every sample is drawn with seed "
            f"{cfg.seed}.")


def render_all(ctx: Context, loaded: dict[str, Loaded], map_note: str) -> dict[str, str]:
    """The body of every section of SECTIONS by anchor, rendered in page order (the sampling notes last, since
    every other section adds to them)."""
    bodies = {
        "categories": render_categories(ctx, loaded["index"]),
        "queries": render_queries(ctx, loaded["results"], loaded["index"]),
        "looks": render_looks(ctx, loaded.get("looks")),
        "evaluation": render_evaluation(ctx, loaded["evaluation"]),
        "training": render_training(ctx, loaded["training"]),
        "map": render_map(ctx, loaded["map"], map_note),
        "similarity": render_similarity(ctx, loaded["index"]),
        "inputs": render_inputs(ctx, loaded["inputs"]),
    }
    bodies["about"] = render_about(ctx, loaded)
    return bodies


def layout(title: str, subtitle: str, bodies: dict[str, str]) -> str:
    """The whole page: every section of SECTIONS in order, each linked from the navigation bar."""
    body = "\n".join(section(anchor, heading, bodies[anchor]) for anchor, _, heading in SECTIONS)
    return page(title, subtitle, body, [(anchor, short) for anchor, short, _ in SECTIONS])


def thumbnail_note(cfg: ReportConfig, stats: dict[str, int]) -> str:
    """The sampling note on thumbnails, once `Thumbnails.fill` has counted them."""
    return (f"Thumbnails: {stats['embedded']:,} embedded ({stats['bytes'] / 1e6:.2f} MB of the "
            f"{cfg.max_thumbnail_mb:g} MB budget, {cfg.thumb_px} px JPEG), {stats['placeholders']:,} placeholders "
            f"({stats['over_budget']:,} over budget).")
