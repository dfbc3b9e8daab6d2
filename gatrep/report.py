"""Static HTML report of a run: categories, sampled queries, evaluation, training, 2-D map, similarity, bad inputs."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import html
import io as bytes_io
import json
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from gatrep import images, io, query, schemas
from gatrep import index_schemas as ix
from gatrep.config import ReportConfig

# Categorical colours for the 2-D map (Tableau 10 + 2); categories past these are drawn grey as "other".
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#17becf", "#bcbd22", "#1f3a93")
OTHER_COLOUR = "#c8c8c8"
BATCH_ROWS = 65_536  # rows per streamed record batch: bounded memory whatever the stage's size
MAX_TEXT = 300  # characters of an error message or URI shown before it is cut
CLOSEST_PAIRS = 6  # most similar listing pairs shown with their representatives when nothing reaches the threshold


class SectionError(RuntimeError):
    """A stage that exists but cannot be shown; the section renders the message instead of failing the report."""


# ----------------------------------------------------------------------------------------------
# HTML helpers


def esc(value: Any) -> str:
    """`value` as HTML-escaped text (quotes included, so it is safe in attributes); None becomes an em dash."""
    if value is None:
        return "\u2014"
    return html.escape(str(value), quote=True)


def cut(text: Any, limit: int = MAX_TEXT) -> str:
    """`text` as a string of at most `limit` characters (an ellipsis marks the cut); None becomes ''."""
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def num(value: Any, digits: int = 3) -> str:
    """A number for display: integers with thousands separators, floats with `digits` decimals, else an em dash."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return "\u2014" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return f"{float(value):.{digits}f}"
    return "\u2014"


def shade(value: float, rgb: tuple[int, int, int] = (37, 99, 235)) -> str:
    """An inline style shading a table cell by `value` in [0, 1] (clipped; NaN unshaded), with readable text."""
    if not math.isfinite(value):
        return ""
    alpha = min(max(value, 0.0), 1.0)
    colour = "#fff" if alpha > 0.7 else "#111"
    return f' style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f});color:{colour}"'


def heat(value: float) -> str:
    """An inline style colouring a score in [0, 1] from red (0) through yellow to green (1); NaN unshaded.
    Unlike `shade`, scores close to each other near 1 (F1 0.82 vs 0.97) still look different."""
    if not math.isfinite(value):
        return ""
    return f' style="background:hsl({min(max(value, 0.0), 1.0) * 120:.0f},70%,78%)"'


def not_run(stage_uri: str, job: str) -> str:
    """The note a section shows when its stage was never published."""
    return (f'<p class="notrun">Not run: <code>{esc(stage_uri)}</code> has no published stage '
            f"(run <code>python -m jobs.{esc(job)}</code>).</p>")


def failed(stage_uri: str, err: BaseException) -> str:
    """The note a section shows when its stage exists but could not be read."""
    return (f'<p class="failed">Could not read <code>{esc(stage_uri)}</code>: '
            f"{esc(cut(f'{type(err).__name__}: {err}'))}</p>")


def section(anchor: str, title: str, body: str) -> str:
    """One top-level section of the page."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


# ----------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail_jpeg(uri: str, px: int, quality: int, max_bytes: int, max_pixels: int) -> tuple[bytes | None, str]:
    """(JPEG bytes of a `px`-square centre crop, '') or (None, why not): never raises.

    Reading and decoding go through gatrep.images, so size limits, EXIF orientation and odd modes are handled
    exactly as the embedding stage handles them; a file over `max_bytes` or `max_pixels` is not decoded.
    """
    data, refused = images.read_file(uri, max_bytes)
    if refused is not None or data is None:
        return None, refused.status if refused else schemas.UNREADABLE
    decoded = images.decode(data, images.Preprocess(size=px, crop_fraction=1.0), max_pixels)
    if decoded.pixels is None:
        return None, decoded.status
    pixels = decoded.pixels[:, :, 0] if decoded.pixels.shape[2] == 1 else decoded.pixels
    out = bytes_io.BytesIO()
    try:
        Image.fromarray(pixels).save(out, format="JPEG", quality=quality, optimize=True)
    except Exception:  # an encoder failure must cost one thumbnail, not the report (it runs in a thread pool)
        return None, schemas.DECODE_ERROR
    return out.getvalue(), ""


def placeholder(label: str, px: int, title: str = "") -> str:
    """A labelled box the size of a thumbnail, standing in for an image that cannot be shown (never a broken img)."""
    return (f'<div class="ph" style="width:{px}px;height:{px}px" title="{esc(title or label)}">'
            f"<span>{esc(label)}</span></div>")


class Thumbnails:
    """Thumbnails by token: rendering asks for `img(uri)` and gets a marker; `fill` fetches every URI in parallel
    and puts data-URI <img> tags (or placeholders) in place, in page order, until the byte budget is spent."""

    def __init__(self, px: int, quality: int, budget_bytes: int, max_bytes: int, max_pixels: int,
                 threads: int = 8) -> None:
        self.px, self.quality, self.budget = px, quality, budget_bytes
        self.max_bytes, self.max_pixels, self.threads = max_bytes, max_pixels, max(1, threads)
        self.requests: list[tuple[str | None, str, str]] = []  # (uri, alt text, placeholder label)
        self.stats = {"requested": 0, "embedded": 0, "placeholders": 0, "over_budget": 0, "bytes": 0}

    def img(self, uri: str | None, alt: str, missing: str = "no image") -> str:
        """A marker for one thumbnail of `uri` (None: a placeholder labelled `missing`)."""
        self.requests.append((uri, alt, missing))
        return f"<!--thumb:{len(self.requests) - 1}-->"

    def _fetch_all(self) -> dict[str, tuple[bytes | None, str]]:
        uris = sorted({uri for uri, _, _ in self.requests if uri})
        # Threads, not processes: the work is mostly waiting on reads (object stores), and PIL releases the GIL.
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            found = pool.map(lambda u: thumbnail_jpeg(u, self.px, self.quality, self.max_bytes, self.max_pixels),
                             uris)
            return dict(zip(uris, found, strict=True))

    def _tag(self, uri: str | None, alt: str, missing: str, fetched: dict[str, tuple[bytes | None, str]]) -> str:
        self.stats["requested"] += 1
        jpeg, why = fetched.get(uri, (None, missing)) if uri else (None, missing)
        if jpeg is not None:
            encoded = base64.b64encode(jpeg).decode("ascii")
            if self.stats["bytes"] + len(encoded) <= self.budget:
                self.stats["bytes"] += len(encoded)
                self.stats["embedded"] += 1
                return (f'<img class="th" width="{self.px}" height="{self.px}" alt="{esc(alt)}" title="{esc(alt)}" '
                        f'src="data:image/jpeg;base64,{encoded}">')
            self.stats["over_budget"] += 1
            why = "over budget"
        self.stats["placeholders"] += 1
        return placeholder(why, self.px, f"{alt}: {why}")

    def fill(self, page: str) -> str:
        """`page` with every marker replaced by its thumbnail or placeholder."""
        fetched = self._fetch_all()
        tags = [self._tag(uri, alt, missing, fetched) for uri, alt, missing in self.requests]
        return re.sub(r"<!--thumb:(\d+)-->", lambda m: tags[int(m.group(1))], page)


def figure(thumbs: Thumbnails, uri: str | None, caption: str, alt: str, missing: str = "no image",
           css: str = "") -> str:
    """A thumbnail with an (already escaped) caption under it."""
    cls = f' class="{css}"' if css else ""
    return f"<figure{cls}>{thumbs.img(uri, alt, missing)}<figcaption>{caption}</figcaption></figure>"


# ----------------------------------------------------------------------------------------------
# Reading stages in bounded memory


def stage_exists(stage_uri: str) -> bool:
    """Whether the stage has been published (its manifest exists)."""
    fs, path = io.url_to_fs(stage_uri)
    return bool(fs.exists(posixpath.join(path, io.MANIFEST)))


def _parquet_files(stage_uri: str, manifest: dict[str, Any]) -> list[str]:
    return [f for f in io.stage_file_uris(stage_uri, manifest) if f.endswith(".parquet")]


def scan(stage_uri: str, manifest: dict[str, Any], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Every row of a stage's Parquet files as record batches of `columns`, one batch in memory at a time."""
    for uri in _parquet_files(stage_uri, manifest):
        fs, path = io.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)


def count_rows(stage_uri: str, manifest: dict[str, Any]) -> int:
    """The stage's row count from the Parquet footers (no data read)."""
    total = 0
    for uri in _parquet_files(stage_uri, manifest):
        fs, path = io.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def take_rows(stage_uri: str, manifest: dict[str, Any], rows: np.ndarray, columns: list[str]) -> pa.Table:
    """The given global row numbers (sorted, in stage file order) of `columns`; only the row groups that hold
    one of them are read. Refuses an empty `rows`."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        raise ValueError("take_rows needs at least one row")
    parts, offset = [], 0
    for uri in _parquet_files(stage_uri, manifest):
        fs, path = io.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                inside = rows[(rows >= offset) & (rows < offset + size)] - offset
                if inside.size:
                    parts.append(parquet.read_row_group(group, columns=columns).take(pa.array(inside)))
                offset += size
    if not parts:
        raise SectionError(f"{stage_uri}: rows {rows[:3].tolist()}... are past its {offset} rows")
    return pa.concat_tables(parts)


def sample_positions(total: int, n: int, seed: int) -> np.ndarray:
    """min(n, total) distinct row numbers drawn uniformly with `seed`, sorted."""
    if total <= n:
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).astype(np.int64)


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A fixed_size_list column as float32 [n, d]; null rows are refused (filter them first)."""
    dim = schemas.vector_dim(table.schema, column)
    flat = table[column].combine_chunks().flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def read_index_table(stage_uri: str, manifest: dict[str, Any], name: str, columns: list[str],
                     filters: list[tuple[str, str, Any]] | None = None) -> pa.Table:
    """One table of an index stage, only `columns` (and rows passing `filters`, pyarrow's DNF form)."""
    fs, path = io.url_to_fs(query.index_table_uri(stage_uri, manifest, name))
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters or None)


def read_text_file(stage_uri: str, manifest: dict[str, Any], basename: str) -> str | None:
    """The text of the stage's published file named `basename`, or None when the manifest lists none."""
    for uri in io.stage_file_uris(stage_uri, manifest):
        if posixpath.basename(uri) == basename:
            fs, path = io.url_to_fs(uri)
            return bytes(fs.cat_file(path)).decode("utf-8", errors="replace")
    return None


# ----------------------------------------------------------------------------------------------
# What the report loads from each stage


@dataclasses.dataclass
class Loaded:
    """A stage the report reads: its URI, the job that writes it, and the loaded value or why there is none."""

    uri: str
    job: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None

    def note(self) -> str:
        """The 'not run' or 'could not read' note for a section that has no value."""
        return failed(self.uri, self.error) if self.error is not None else not_run(self.uri, self.job)


READ_ERRORS = (io.StageError, schemas.SchemaError, SectionError, OSError, ValueError, KeyError, TypeError,
               pa.ArrowException, json.JSONDecodeError)


def load(uri: str, job: str, reader: Callable[[], Any]) -> Loaded:
    """`reader()` for a published stage; a stage never published loads as 'not run', a broken one keeps its
    error. Never raises the read errors above: one bad stage must not cost the whole report."""
    if not stage_exists(uri):
        return Loaded(uri, job)
    try:
        return Loaded(uri, job, reader())
    except READ_ERRORS as err:
        return Loaded(uri, job, error=err)


@dataclasses.dataclass
class IndexView:
    """The bounded part of an index stage the report shows."""

    manifest: dict[str, Any]
    categories: list[dict[str, Any]]  # every category (no vectors), largest first
    listings: dict[str, list[dict[str, Any]]]  # shown category -> its largest listings
    rep_listing: dict[str, dict[str, Any]]  # shown category -> its representative listing's row
    listing_count: int
    names: list[str] | None  # listing names of the dense similarity matrix (None: too many listings)
    matrix: np.ndarray | None
    top_pairs: list[dict[str, Any]]
    pair_count: int
    merges: list[dict[str, Any]]
    merge_count: int
    listing_rep: dict[str, str]  # listing -> representative image id, for the merge suggestions shown


LISTING_COLUMNS = [schemas.LISTING, schemas.CATEGORY, ix.REPRESENTATIVE_IMAGE_ID, ix.ZSCORE, ix.SIZE,
                   ix.CENTRAL_IMAGE_IDS, ix.CENTRAL_ZSCORES]
CATEGORY_COLUMNS = [schemas.CATEGORY, ix.REPRESENTATIVE_LISTING, ix.REPRESENTATIVE_IMAGE_ID, ix.LABEL, ix.LISTINGS,
                    ix.SIZE, ix.CENTRAL_IMAGE_IDS]


def _by_size(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-(r.get(ix.SIZE) or 0), str(r.get(key))))


def load_index(cfg: ReportConfig, stage_uri: str) -> IndexView:
    """Categories (all, without vectors), the shown categories' largest listings, listing similarity (dense up
    to `cfg.similarity_listings` listings, top pairs above) and the top merge suggestions."""
    manifest = io.read_manifest(stage_uri, "index")
    categories = _by_size(read_index_table(stage_uri, manifest, "categories", CATEGORY_COLUMNS).to_pylist(),
                          schemas.CATEGORY)
    shown = [c[schemas.CATEGORY] for c in categories[: cfg.categories]]
    rows = read_index_table(stage_uri, manifest, "listings", LISTING_COLUMNS,
                            [(schemas.CATEGORY, "in", shown)]).to_pylist() if shown else []
    listings: dict[str, list[dict[str, Any]]] = {}
    for row in _by_size(rows, schemas.LISTING):
        listings.setdefault(row[schemas.CATEGORY], []).append(row)
    rep_names = {c[ix.REPRESENTATIVE_LISTING] for c in categories[: cfg.categories]}
    by_name = {r[schemas.LISTING]: r for r in rows if r[schemas.LISTING] in rep_names}
    rep_listing = {c[schemas.CATEGORY]: by_name[c[ix.REPRESENTATIVE_LISTING]]
                   for c in categories[: cfg.categories] if c[ix.REPRESENTATIVE_LISTING] in by_name}
    listing_names = read_index_table(stage_uri, manifest, "listings", [schemas.LISTING])[schemas.LISTING]
    view = IndexView(manifest, categories, {c: v[: cfg.listings_per_category] for c, v in listings.items()},
                     rep_listing, len(listing_names), None, None, [], 0, [], 0, {})
    _load_similarity(cfg, stage_uri, view, sorted(str(x) for x in listing_names.to_pylist()))
    _load_merges(cfg, stage_uri, view)
    return view


def _load_similarity(cfg: ReportConfig, stage_uri: str, view: IndexView, names: list[str]) -> None:
    pairs = read_index_table(stage_uri, view.manifest, "listing_similarity",
                             [ix.LISTING_A, ix.LISTING_B, ix.SIMILARITY])
    view.pair_count = pairs.num_rows
    if len(names) <= cfg.similarity_listings:
        position = {name: i for i, name in enumerate(names)}
        matrix = np.full((len(names), len(names)), np.nan, dtype=np.float32)
        np.fill_diagonal(matrix, 1.0)
        for a, b, s in zip(*(pairs[c].to_pylist() for c in pairs.column_names), strict=True):
            if a in position and b in position:
                matrix[position[a], position[b]] = matrix[position[b], position[a]] = s
        view.names, view.matrix = names, matrix
    if pairs.num_rows and cfg.pairs:
        top = pc.select_k_unstable(pairs, k=min(cfg.pairs, pairs.num_rows), sort_keys=[(ix.SIMILARITY, "descending")])
        view.top_pairs = pairs.take(top).to_pylist()


def _load_merges(cfg: ReportConfig, stage_uri: str, view: IndexView) -> None:
    merges = read_index_table(stage_uri, view.manifest, "merge_suggestions",
                              [ix.LISTING_A, ix.LISTING_B, ix.SIMILARITY, ix.CATEGORY_A, ix.CATEGORY_B])
    view.merge_count = merges.num_rows
    view.merges = merges.slice(0, cfg.pairs).to_pylist()
    pairs = view.merges or view.top_pairs[:CLOSEST_PAIRS]
    wanted = sorted({m[k] for m in pairs for k in (ix.LISTING_A, ix.LISTING_B)})
    if wanted:
        reps = read_index_table(stage_uri, view.manifest, "listings", [schemas.LISTING, ix.REPRESENTATIVE_IMAGE_ID],
                                [(schemas.LISTING, "in", wanted)])
        view.listing_rep = dict(zip(reps[schemas.LISTING].to_pylist(), reps[ix.REPRESENTATIVE_IMAGE_ID].to_pylist(),
                                    strict=True))


@dataclasses.dataclass
class QuerySample:
    """A bounded sample of a results stage, with the counts it was drawn from."""

    manifest: dict[str, Any]
    rows: list[dict[str, Any]]
    total: int
    statuses: dict[str, int]
    judged: int  # ok and labelled
    wrong: int  # ok, labelled, and the predicted category differs from the label


def _value_counts(column: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(pc.fill_null(column, "(none)"))
    return {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                                           strict=True)}


def sample_queries(cfg: ReportConfig, stage_uri: str) -> QuerySample:
    """`cfg.queries` results rows drawn with `cfg.seed`: up to half of them misclassified (labelled queries whose
    category differs from their label), the rest from all ok queries; misclassified ones are listed first."""
    manifest = io.read_manifest(stage_uri, "results")
    head = [schemas.STATUS, schemas.LABEL, schemas.CATEGORY]
    batches = list(scan(stage_uri, manifest, head))
    table = pa.Table.from_batches(batches) if batches else pa.table({c: pa.array([], pa.string()) for c in head})
    ok = np.asarray(pc.fill_null(pc.equal(table[schemas.STATUS], schemas.OK), False))
    labelled = ok & np.asarray(pc.is_valid(table[schemas.LABEL]))
    wrong = labelled & ~np.asarray(pc.fill_null(pc.equal(table[schemas.LABEL], table[schemas.CATEGORY]), False))
    rng = np.random.default_rng(cfg.seed)
    picked_wrong = _pick(np.flatnonzero(wrong), cfg.queries // 2, rng)
    rest = np.setdiff1d(np.flatnonzero(ok), picked_wrong)
    picked = np.concatenate([picked_wrong, _pick(rest, cfg.queries - picked_wrong.size, rng)])
    rows = take_rows(stage_uri, manifest, picked, schemas.results().names).to_pylist() if picked.size else []
    rows.sort(key=lambda r: (r[schemas.LABEL] is None or r[schemas.LABEL] == r[schemas.CATEGORY],
                             str(r[schemas.LABEL]), str(r[schemas.URI])))
    return QuerySample(manifest, rows, table.num_rows, _value_counts(table[schemas.STATUS]), int(labelled.sum()),
                       int(wrong.sum()))


def _pick(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if candidates.size <= n:
        return candidates.astype(np.int64)
    return np.sort(rng.choice(candidates, size=n, replace=False)).astype(np.int64)


@dataclasses.dataclass
class Inputs:
    """From one pass over the embeddings stage: URIs of the images shown, counts by status, bad examples."""

    manifest: dict[str, Any]
    uri_of: dict[str, str]
    category_of: dict[str, str | None]
    counts: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]


def scan_inputs(stage_uri: str, wanted: set[str], per_status: int) -> Inputs:
    """Stream the embeddings stage once (no vectors read): the URI and category of every `wanted` image id,
    the row count of every status, and the first `per_status` rows of each status other than ok."""
    manifest = io.read_manifest(stage_uri, "embeddings")
    columns = [schemas.IMAGE_ID, schemas.URI, schemas.CATEGORY, schemas.STATUS, schemas.ERROR]
    found = Inputs(manifest, {}, {}, {}, {})
    value_set = pa.array(sorted(wanted), pa.string())
    for batch in scan(stage_uri, manifest, columns):
        for status, count in _value_counts(batch.column(schemas.STATUS)).items():
            found.counts[status] = found.counts.get(status, 0) + count
            need = per_status - len(found.examples.get(status, []))
            if status != schemas.OK and need > 0:
                mask = pc.equal(pc.fill_null(batch.column(schemas.STATUS), "(none)"), status)
                found.examples.setdefault(status, []).extend(batch.filter(mask).slice(0, need).to_pylist())
        if len(value_set):
            for row in batch.filter(pc.is_in(batch.column(schemas.IMAGE_ID), value_set=value_set)).to_pylist():
                found.uri_of.setdefault(row[schemas.IMAGE_ID], row[schemas.URI])
                found.category_of.setdefault(row[schemas.IMAGE_ID], row[schemas.CATEGORY])
    return found


@dataclasses.dataclass
class MapData:
    """A 2-D projection of sampled vectors and the group (category) of each point."""

    xy: np.ndarray
    groups: list[str]
    total: int  # rows in the stage
    source: str
    method: str
    group_count: int  # groups in the stage
    candidates: int  # rows the sample was drawn from (all, or those of the largest groups)


def project(unit: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[n, 2] coordinates of the rows of `unit`: PCA to at most 50 dimensions, then t-SNE (method 'tsne', at least
    10 rows) or the first two principal components. Refuses an unknown method."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if method not in ("tsne", "pca"):
        raise ValueError(f"map method must be tsne or pca, not {method!r}")
    n, d = unit.shape
    if n < 3 or d < 2:
        return np.column_stack([unit[:, 0] if d else np.zeros(n), np.zeros(n)]).astype(np.float64)
    reduced = PCA(min(50, d, n), random_state=seed).fit_transform(unit.astype(np.float64))
    if method == "pca" or n < 10:
        return reduced[:, :2] if reduced.shape[1] >= 2 else np.column_stack([reduced[:, 0], np.zeros(n)])
    tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed, max_iter=500)
    # One OpenMP thread: on a busy machine the threads' spin-waits made t-SNE of 2,000 points take 18 s instead of 4.
    with threadpool_limits(1):
        return np.asarray(tsne.fit_transform(reduced), dtype=np.float64)


def row_groups(stage_uri: str, manifest: dict[str, Any]) -> pa.ChunkedArray:
    """The group the map colours every row by: its category, else its listing, else '(none)'; one string column."""
    parts = [pc.fill_null(pc.coalesce(b.column(schemas.CATEGORY), b.column(schemas.LISTING)), "(none)")
             for b in scan(stage_uri, manifest, [schemas.CATEGORY, schemas.LISTING])]
    return pa.chunked_array(parts, pa.string())


def load_map(cfg: ReportConfig, stage_uri: str, stage: str, column: str) -> MapData:
    """`cfg.map_points` rows of a latents (or embeddings) stage drawn with `cfg.seed`, projected to 2-D. When there
    are more categories than map colours, the rows are drawn from the largest categories only (a uniform sample of
    thousands of categories would give each a point or two). Rows without a vector are dropped. Refuses a stage
    with no usable vector in the sample."""
    manifest = io.read_manifest(stage_uri, stage)
    groups = row_groups(stage_uri, manifest)
    counts = _value_counts(groups)
    candidates = np.arange(len(groups), dtype=np.int64)
    if len(counts) > len(PALETTE):
        largest = sorted(counts, key=lambda g: (-counts[g], g))[: len(PALETTE)]
        candidates = np.flatnonzero(np.asarray(pc.is_in(groups, value_set=pa.array(largest, pa.string()))))
    positions = candidates[sample_positions(candidates.size, cfg.map_points, cfg.seed)]
    if positions.size == 0:
        raise SectionError(f"{stage_uri} has no rows")
    table = take_rows(stage_uri, manifest, positions, [schemas.CATEGORY, schemas.LISTING, column])
    keep = pc.is_valid(table[column])
    table = table.filter(keep)
    if table.num_rows == 0:
        raise SectionError(f"{stage_uri}: none of the {positions.size} sampled rows has a {column!r} vector")
    raw = vectors(table, column)
    unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    drawn = [str(g) for g in groups.take(pa.array(positions)).filter(keep).to_pylist()]
    return MapData(project(unit, cfg.map_method, cfg.seed), drawn, len(groups), f"{stage}.{column}", cfg.map_method,
                   len(counts), int(candidates.size))


@dataclasses.dataclass
class Training:
    """Loss per epoch from a model stage's metrics.jsonl, read defensively."""

    manifest: dict[str, Any]
    epochs: list[float]
    losses: list[float]
    skipped: int  # lines that were not a JSON object with a finite numeric loss


def parse_metrics(text: str) -> tuple[list[float], list[float], int]:
    """(epochs, losses, lines skipped) from JSON lines with a numeric `loss` and an optional `epoch` (default: the
    record's 1-based position). Blank lines are ignored; malformed ones and non-finite losses are counted."""
    epochs: list[float] = []
    losses: list[float] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            loss = float(record["loss"])
            epoch = float(record.get("epoch", len(losses) + 1))
        except (ValueError, TypeError, KeyError, AttributeError):
            skipped += 1
            continue
        if not (math.isfinite(loss) and math.isfinite(epoch)):
            skipped += 1
            continue
        epochs.append(epoch)
        losses.append(loss)
    return epochs, losses, skipped


def load_training(stage_uri: str) -> Training:
    """The model stage's loss curve; a stage without metrics.jsonl gives an empty curve."""
    manifest = io.read_manifest(stage_uri, "model")
    text = read_text_file(stage_uri, manifest, "metrics.jsonl") or ""
    return Training(manifest, *parse_metrics(text))


def load_evaluation(stage_uri: str) -> dict[str, Any]:
    """The evaluation stage's evaluation.json. Refuses one without it or without a methods list."""
    manifest = io.read_manifest(stage_uri, "evaluation")
    text = read_text_file(stage_uri, manifest, "evaluation.json")
    if text is None:
        raise SectionError(f"{stage_uri}: the manifest lists no evaluation.json; rerun jobs.evaluate")
    document = json.loads(text)
    if not isinstance(document, dict) or not isinstance(document.get("methods"), list):
        raise SectionError(f"{stage_uri}/evaluation.json has no 'methods' list")
    return document


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
# Sections


STATUS_MEANING = {
    schemas.OK: "decoded and embedded",
    schemas.UNREADABLE: "the URI could not be opened or read",
    schemas.EMPTY: "zero bytes",
    schemas.NOT_AN_IMAGE: "no image format recognised",
    schemas.UNSUPPORTED_FORMAT: "an image format gatrep does not decode",
    schemas.TRUNCATED: "data ends early or is corrupt",
    schemas.TOO_LARGE: "over the pixel or byte limit",
    schemas.DECODE_ERROR: "anything else the decoder raised",
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
    label = cat.get(ix.LABEL)
    labelled = f" \u00b7 label {esc(label)}" if label is not None and label != name else ""
    head = (f"<h3>{esc(name)} <small>{num(cat.get(ix.SIZE))} images \u00b7 {num(cat.get(ix.LISTINGS))} "
            f"listing(s){labelled}</small></h3>")
    source = esc(cut(short_listing(cat.get(ix.REPRESENTATIVE_LISTING), name), 32))
    rep = ctx.figure(cat.get(ix.REPRESENTATIVE_IMAGE_ID), f"representative<br>{source}", f"{name}: representative",
                     "rep")
    blocks = [f'<div class="block">{rep}</div>']
    if rep_listing is not None:
        blocks.append(central_block(ctx, name, rep_listing))
    if len(listings) > 1 or (listings and listings[0][schemas.LISTING] != name):
        blocks.append(listings_block(ctx, name, listings, int(cat.get(ix.LISTINGS) or 0)))
    return f'<div class="card">{head}<div class="row">{"".join(blocks)}</div></div>'


def central_block(ctx: Context, name: str, rep_listing: dict[str, Any]) -> str:
    """The representative listing's top-k most central images, each with its z-score."""
    ids = (rep_listing.get(ix.CENTRAL_IMAGE_IDS) or [])[: ctx.cfg.central]
    zs = rep_listing.get(ix.CENTRAL_ZSCORES) or []
    figs = [ctx.figure(i, f"#{k + 1} z {num(zs[k] if k < len(zs) else None, 2)}", f"{name}: central #{k + 1}")
            for k, i in enumerate(ids)]
    rep_name = rep_listing[schemas.LISTING]
    where = "" if rep_name == name else f" of listing {esc(cut(short_listing(rep_name, name), 32))}"
    return (f'<div class="block"><h4>most central{where} (z-score)</h4><div class="strip">{"".join(figs)}'
            "</div></div>")


def listings_block(ctx: Context, name: str, listings: list[dict[str, Any]], listing_count: int) -> str:
    """The representatives of the category's largest listings, with each listing's size and z-score."""
    figs = [ctx.figure(r.get(ix.REPRESENTATIVE_IMAGE_ID),
                       f"{esc(cut(short_listing(r[schemas.LISTING], name), 24))}<br>{num(r.get(ix.SIZE))} img "
                       f"\u00b7 z {num(r.get(ix.ZSCORE), 2)}", f"listing {r[schemas.LISTING]}: representative")
            for r in listings]
    more = listing_count - len(listings)
    extra = f'<p class="more">+ {more:,} more listings</p>' if more > 0 else ""
    return (f'<div class="block"><h4>listing representatives</h4><div class="strip">{"".join(figs)}</div>'
            f"{extra}</div>")


def category_table(ctx: Context, categories: list[dict[str, Any]]) -> str:
    """All categories (at most `table_rows`) as a collapsed table."""
    rows = categories[: ctx.cfg.table_rows]
    body = "".join(f"<tr><td>{esc(c[schemas.CATEGORY])}</td><td>{esc(c.get(ix.LABEL))}</td>"
                   f'<td class="n">{num(c.get(ix.LISTINGS))}</td><td class="n">{num(c.get(ix.SIZE))}</td>'
                   f"<td>{esc(cut(c.get(ix.REPRESENTATIVE_LISTING), 60))}</td></tr>" for c in rows)
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
    reps = {c[schemas.CATEGORY]: c.get(ix.REPRESENTATIVE_IMAGE_ID) for c in index.value.categories} if index.ok else {}
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
    tsne = m.method == "tsne" and len(m.groups) >= 10
    how = "t-SNE after PCA to 50 dimensions" if tsne else "PCA (first 2 components)"
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
    rows = "".join(f"<tr><td>{esc(p[ix.LISTING_A])}</td><td>{esc(p[ix.LISTING_B])}</td>"
                   f'<td class="n">{num(p[ix.SIMILARITY])}</td></tr>' for p in pairs)
    return (f"<p>{caption}.</p><table><thead><tr><th>listing</th><th>listing</th><th>cosine</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def merge_card(ctx: Context, merge: dict[str, Any], listing_rep: dict[str, str]) -> str:
    """One merge suggestion: both listings' representatives side by side, with the similarity (Figure 9)."""
    a, b = merge[ix.LISTING_A], merge[ix.LISTING_B]
    captions = [(x, esc(cut(x, 24)) + (f"<br>in {esc(cut(merge.get(c), 24))}" if merge.get(c) not in (None, x) else ""))
                for x, c in ((a, ix.CATEGORY_A), (b, ix.CATEGORY_B))]
    figs = "".join(ctx.figure(listing_rep.get(x), caption, f"listing {x}: representative") for x, caption in captions)
    return f'<div class="card merge"><div class="row">{figs}</div><p>cosine {num(merge[ix.SIMILARITY])}</p></div>'


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


# ----------------------------------------------------------------------------------------------
# The page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;background:#f4f5f7}
header{background:#1f2937;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd5e1}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 24px;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#1d4ed8;text-decoration:none}
main{padding:8px 24px 40px;max-width:1500px}section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;
padding:6px 18px 16px;margin:14px 0}h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px}
h3{font-size:15px;margin:10px 0 6px}h3 small{font-weight:normal;color:#555}h4{font-size:12px;margin:0 0 4px;color:#555;
font-weight:600}.cats{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:10px}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:6px 10px;margin:6px 0;background:#fcfcfd}
.card.wrong{border-left:4px solid #dc2626}.card.right{border-left:4px solid #16a34a}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:11px;color:#444;max-width:112px;overflow-wrap:anywhere}
figure img,.ph{display:block;margin:0 auto 2px;border:2px solid transparent;border-radius:3px;background:#eee}
figure.rep img{border-color:#1f2937}figure.hit img{border-color:#16a34a}figure.miss img{border-color:#dc2626}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;font-size:10px;color:#666;
background:repeating-linear-gradient(45deg,#eee,#eee 6px,#e3e3e3 6px,#e3e3e3 12px);border:1px dashed #aaa}
.ph span{padding:2px}.scores{min-width:230px}.bar{display:flex;align-items:center;gap:6px;font-size:12px}
.bar .name{width:90px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.bar .track{flex:1;height:8px;
background:#eee;border-radius:4px;min-width:80px}.bar .track span{display:block;height:8px;background:#93c5fd;
border-radius:4px}.bar.best .name{font-weight:700}.bar.best .track span{background:#2563eb}
.bar.truth .name{text-decoration:underline #16a34a 2px}.bar .v{width:52px;text-align:right}
table{border-collapse:collapse;margin:6px 0;font-size:12px}th,td{border:1px solid #e3e3e3;padding:3px 6px}
th{background:#f6f7f9;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.matrix td{min-width:30px}th.l{white-space:nowrap}.notrun,.failed,.empty{color:#666;font-style:italic}
.failed{color:#b91c1c}.legend{list-style:none;padding:0;margin:0;font-size:12px}.legend li{margin:2px 0}
.sw{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
svg.chart text{font-size:11px;fill:#444}.bad{display:flex;gap:10px;align-items:center;margin:6px 0}
.merge p{margin:2px 0;text-align:center;font-size:12px}.more{font-size:12px;color:#555}details{margin:8px 0}
summary{cursor:pointer;color:#1d4ed8}.cats figure:not(.rep){max-width:84px}.cats .strip{gap:4px}
.cats figure:not(.rep) img{width:80px;height:80px}.cats figure:not(.rep) .ph{width:80px!important;height:80px!important}
ul.notes{font-size:13px}footer{color:#777;font-size:12px;padding:0 24px 24px}
"""

# Counts failed resources and script errors (capture phase also sees <img> load errors) into data attributes,
# so a headless browser's --dump-dom can check the page; the page works the same without it.
HEAD_SCRIPT = ("window.addEventListener('error',function(){var d=document.documentElement;"
               "d.setAttribute('data-errors',String((+d.getAttribute('data-errors')||0)+1));},true);")
TAIL_SCRIPT = ("window.addEventListener('load',function(){var im=document.images,b=0;for(var i=0;i<im.length;i++)"
               "{if(!im[i].complete||im[i].naturalWidth===0)b++;}document.body.setAttribute('data-images',"
               "String(im.length));document.body.setAttribute('data-broken-images',String(b));});")
# Nothing outside the page may load: images are data URIs, style and script are inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

SECTIONS = (("categories", "Categories", "Categories and their representatives"),
            ("queries", "Queries", "Sampled queries"), ("evaluation", "Evaluation", "Evaluation"),
            ("training", "Training", "Training"), ("map", "2-D map", "2-D map of the latents"),
            ("similarity", "Similarity", "Listing similarity and merge suggestions"),
            ("inputs", "Bad inputs", "Bad inputs"), ("about", "Sampling", "How this report was sampled"))


def page(title: str, subtitle: str, body: str) -> str:
    """The whole HTML document around `body`; `title` and `subtitle` are plain text (escaped here)."""
    nav = "".join(f'<a href="#{a}">{esc(short)}</a>' for a, short, _ in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
            f"<script>{HEAD_SCRIPT}</script><style>{CSS}</style></head>\n<body><header><h1>{esc(title)}</h1>"
            f"<p>{esc(subtitle)}</p></header><nav>{nav}</nav><main>\n{body}\n</main>"
            f"<script>{TAIL_SCRIPT}</script></body></html>\n")


def embeddings_uri(cfg: ReportConfig, index: Loaded) -> str:
    """The embeddings stage that names the images: --embeddings, else the index's source when it indexed
    embeddings, else <run>/embeddings."""
    if cfg.embeddings:
        return io.join(cfg.run, cfg.embeddings)
    index_config = index.value.manifest.get("config", {}) if index.ok else {}
    if index_config.get("source") == "embeddings":
        return io.join(cfg.run, index_config.get("input_stage") or "embeddings")
    return io.join(cfg.run, "embeddings")


def wanted_ids(cfg: ReportConfig, index: Loaded, results: Loaded) -> set[str]:
    """Every image id the page shows, so that one pass over the embeddings finds their URIs."""
    ids: set[Any] = set()
    if index.ok:
        view: IndexView = index.value
        ids.update(c.get(ix.REPRESENTATIVE_IMAGE_ID) for c in view.categories[: cfg.categories])
        ids.update(r.get(ix.REPRESENTATIVE_IMAGE_ID) for rows in view.listings.values() for r in rows)
        ids.update(i for r in view.rep_listing.values() for i in (r.get(ix.CENTRAL_IMAGE_IDS) or [])[: cfg.central])
        ids.update(view.listing_rep.values())
        if results.ok:
            predicted = {r[schemas.CATEGORY] for r in results.value.rows}
            ids.update(c.get(ix.REPRESENTATIVE_IMAGE_ID) for c in view.categories if c[schemas.CATEGORY] in predicted)
    if results.ok:
        ids.update(m[schemas.IMAGE_ID] for r in results.value.rows for m in (r[schemas.MATCHES] or [])[: cfg.matches])
    ids.discard(None)
    return {str(i) for i in ids}


def results_stage(cfg: ReportConfig) -> str:
    """The results stage whose queries the page samples: --results when published or named explicitly; else (the
    pipeline names its stages results-<index>-<scoring>) the evaluated stage searched in --index, else the first
    evaluated one, else --results (which then shows as not run)."""
    default = next(f.default for f in dataclasses.fields(ReportConfig) if f.name == "results")
    if cfg.results != default or stage_exists(io.join(cfg.run, cfg.results)):
        return cfg.results
    try:
        evaluated = [m.get("results_stage") for m in load_evaluation(io.join(cfg.run, cfg.evaluation))["methods"]]
    except READ_ERRORS:
        return cfg.results
    evaluated = [s for s in evaluated if isinstance(s, str) and stage_exists(io.join(cfg.run, s))]
    for name in evaluated:
        if io.read_manifest(io.join(cfg.run, name)).get("config", {}).get("index") == cfg.index:
            return name
    return evaluated[0] if evaluated else cfg.results


def load_all(cfg: ReportConfig) -> tuple[dict[str, Loaded], str]:
    """Every stage the report reads, as Loaded values by section, and the 2-D map's fallback note."""
    stage = lambda name: io.join(cfg.run, name)  # noqa: E731
    index = load(stage(cfg.index), "index", lambda: load_index(cfg, stage(cfg.index)))
    sampled = results_stage(cfg)
    results = load(stage(sampled), "query", lambda: sample_queries(cfg, stage(sampled)))
    emb = embeddings_uri(cfg, index)
    inputs = load(emb, "embed", lambda: scan_inputs(emb, wanted_ids(cfg, index, results), cfg.bad_examples))
    latents, note = stage(cfg.latents), ""
    if stage_exists(latents) or not stage_exists(emb):
        mapped = load(latents, "train", lambda: load_map(cfg, latents, "latents", schemas.LATENT))
    else:
        note = "No latents stage yet: the map shows the backbone embeddings instead. "
        mapped = load(emb, "embed", lambda: load_map(cfg, emb, "embeddings", schemas.EMBEDDING))
    return {
        "index": index, "results": results, "inputs": inputs, "map": mapped,
        "evaluation": load(stage(cfg.evaluation), "evaluate", lambda: load_evaluation(stage(cfg.evaluation))),
        "training": load(stage(cfg.model), "train", lambda: load_training(stage(cfg.model))),
    }, note


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
            + 2 * max(cfg.pairs, CLOSEST_PAIRS))
    return (f"Bounded whatever the run's size: at most {most:,} thumbnails ({cfg.thumb_px} px) and at most "
            f"{cfg.max_thumbnail_mb:g} MB of them (later ones become placeholders), {cfg.map_points:,} map points, a "
            f"full similarity matrix only up to {cfg.similarity_listings} listings, a confusion matrix up to "
            f"{cfg.classes} classes, {cfg.table_rows:,} rows in the category table. Every sample is drawn with seed "
            f"{cfg.seed}.")


def build(cfg: ReportConfig) -> tuple[str, dict[str, Any]]:
    """(the report's HTML, a summary: sizes, thumbnail counts, section states, seconds). Reads every stage of
    `cfg.run` it can; never fails on a missing or unreadable stage (its section says so instead)."""
    start = time.perf_counter()
    loaded, map_note = load_all(cfg)
    thumbs = Thumbnails(cfg.thumb_px, cfg.thumb_quality, int(cfg.max_thumbnail_mb * 1024 * 1024), cfg.max_image_bytes,
                        cfg.max_pixels, cfg.threads)
    ctx = Context(cfg, thumbs)
    if loaded["inputs"].ok:
        ctx.uri_of, ctx.category_of = loaded["inputs"].value.uri_of, loaded["inputs"].value.category_of
    bodies = {
        "categories": render_categories(ctx, loaded["index"]),
        "queries": render_queries(ctx, loaded["results"], loaded["index"]),
        "evaluation": render_evaluation(ctx, loaded["evaluation"]),
        "training": render_training(ctx, loaded["training"]),
        "map": render_map(ctx, loaded["map"], map_note),
        "similarity": render_similarity(ctx, loaded["index"]),
        "inputs": render_inputs(ctx, loaded["inputs"]),
    }
    bodies["about"] = render_about(ctx, loaded)
    body = "\n".join(section(anchor, title, bodies[anchor]) for anchor, _, title in SECTIONS)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    html_text = thumbs.fill(page(f"gatrep report: {cfg.run}", f"run {cfg.run} \u00b7 generated {created}", body))
    s = thumbs.stats
    stats = (f"Thumbnails: {s['embedded']:,} embedded ({s['bytes'] / 1e6:.2f} MB of the {cfg.max_thumbnail_mb:g} MB "
             f"budget, {cfg.thumb_px} px JPEG), {s['placeholders']:,} placeholders ({s['over_budget']:,} over budget).")
    html_text = html_text.replace("<!--thumbstats-->", stats, 1)
    summary = {"bytes": len(html_text.encode()), "seconds": round(time.perf_counter() - start, 2),
               "thumbnails": dict(s), "sections": {k: ("ok" if v.ok else "error" if v.error else "not run")
                                                   for k, v in loaded.items()},
               "errors": {k: f"{type(v.error).__name__}: {v.error}" for k, v in loaded.items() if v.error}}
    return html_text, summary


def write_html(text: str, out_uri: str) -> str:
    """Write the page to `out_uri` (any fsspec URI), atomically, and return it."""
    io.write_atomic(out_uri, text.encode("utf-8"))
    return out_uri
