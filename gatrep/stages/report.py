"""The report stage: a run's published stages -> one self-contained, bounded static HTML page."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gatrep import io, schemas, vectors, versions
from gatrep.config import ReportConfig
from gatrep.errors import UserError
from gatrep.report import charts, sections
from gatrep.report.html import failed, not_run
from gatrep.report.sections import CLOSEST_PAIRS, Context
from gatrep.report.thumbnails import Thumbnails

NAME = "report"
CONFIG = ReportConfig
DESCRIPTION = "Write a run's self-contained HTML report from its published stages."


class SectionError(UserError, RuntimeError):
    """A stage that exists but cannot be shown; the section renders the message instead of failing the report."""


# Errors that describe bad or missing data: UserError (io.StageError, io.InputError, schemas.SchemaError and
# SectionError), a file that cannot be read, a file that is not Parquet. A section shows them; anything else a
# loader raises is a bug, and propagates with its traceback.
READ_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError, pa.ArrowInvalid)


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


def load(uri: str, job: str, reader: Callable[[], Any]) -> Loaded:
    """`reader()` for a published stage; a stage never published loads as 'not run', one with bad data keeps its
    error (one of READ_ERRORS): one bad stage must not cost the whole report. Any other error propagates."""
    if not io.stage_exists(uri):
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


LISTING_COLUMNS = [schemas.LISTING, schemas.CATEGORY, schemas.REPRESENTATIVE_IMAGE_ID, schemas.ZSCORE, schemas.SIZE,
                   schemas.CENTRAL_IMAGE_IDS, schemas.CENTRAL_ZSCORES]
CATEGORY_COLUMNS = [schemas.CATEGORY, schemas.REPRESENTATIVE_LISTING, schemas.REPRESENTATIVE_IMAGE_ID, schemas.LABEL,
                    schemas.LISTINGS, schemas.SIZE, schemas.CENTRAL_IMAGE_IDS]
PAIR_COLUMNS = [schemas.LISTING_A, schemas.LISTING_B, schemas.SIMILARITY]


def _by_size(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-(r.get(schemas.SIZE) or 0), str(r.get(key))))


def read_index_table(stage_uri: str, manifest: dict[str, Any], name: str, columns: list[str],
                     filters: list[tuple[str, str, Any]] | None = None) -> pa.Table:
    """One table of an index stage, only `columns` (and rows passing `filters`, pyarrow's DNF form, applied while
    reading). Refuses (StageError) a table the manifest does not list and (SchemaError) a file whose schema differs
    from the data contract."""
    io.check_table_schemas(stage_uri, manifest, name)
    parts = []
    for uri in io.table_uris(stage_uri, manifest, name):
        fs, path = io.url_to_fs(uri)
        parts.append(pq.read_table(path, filesystem=fs, columns=columns, filters=filters or None))
    return pa.concat_tables(parts)


def load_index(cfg: ReportConfig, stage_uri: str) -> IndexView:
    """Categories (all, without vectors), the shown categories' largest listings, listing similarity (dense up
    to `cfg.similarity_listings` listings, top pairs above) and the top merge suggestions."""
    manifest = io.read_manifest(stage_uri, schemas.INDEX)
    categories = _by_size(read_index_table(stage_uri, manifest, "categories", CATEGORY_COLUMNS).to_pylist(),
                          schemas.CATEGORY)
    listings, rep_listing = _shown_listings(stage_uri, manifest, categories[: cfg.categories])
    listing_names = read_index_table(stage_uri, manifest, "listings", [schemas.LISTING])[schemas.LISTING]
    view = IndexView(manifest, categories, {c: v[: cfg.listings_per_category] for c, v in listings.items()},
                     rep_listing, len(listing_names), None, None, [], 0, [], 0, {})
    _load_similarity(cfg, stage_uri, view, sorted(str(x) for x in listing_names.to_pylist()))
    _load_merges(cfg, stage_uri, view)
    return view


def _shown_listings(stage_uri: str, manifest: dict[str, Any], shown: list[dict[str, Any]]
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """(shown category -> its listings, largest first; shown category -> its representative listing's row)."""
    names = [c[schemas.CATEGORY] for c in shown]
    rows = read_index_table(stage_uri, manifest, "listings", LISTING_COLUMNS,
                            [(schemas.CATEGORY, "in", names)]).to_pylist() if names else []
    listings: dict[str, list[dict[str, Any]]] = {}
    for row in _by_size(rows, schemas.LISTING):
        listings.setdefault(row[schemas.CATEGORY], []).append(row)
    rep_names = {c[schemas.REPRESENTATIVE_LISTING] for c in shown}
    by_name = {r[schemas.LISTING]: r for r in rows if r[schemas.LISTING] in rep_names}
    rep_listing = {c[schemas.CATEGORY]: by_name[c[schemas.REPRESENTATIVE_LISTING]]
                   for c in shown if c[schemas.REPRESENTATIVE_LISTING] in by_name}
    return listings, rep_listing


def _load_similarity(cfg: ReportConfig, stage_uri: str, view: IndexView, names: list[str]) -> None:
    pairs = read_index_table(stage_uri, view.manifest, "listing_similarity", PAIR_COLUMNS)
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
        top = pc.select_k_unstable(pairs, k=min(cfg.pairs, pairs.num_rows),
                                   sort_keys=[(schemas.SIMILARITY, "descending")])
        view.top_pairs = pairs.take(top).to_pylist()


def _load_merges(cfg: ReportConfig, stage_uri: str, view: IndexView) -> None:
    merges = read_index_table(stage_uri, view.manifest, "merge_suggestions",
                              [*PAIR_COLUMNS, schemas.CATEGORY_A, schemas.CATEGORY_B])
    view.merge_count = merges.num_rows
    view.merges = merges.slice(0, cfg.pairs).to_pylist()
    pairs = view.merges or view.top_pairs[:CLOSEST_PAIRS]
    wanted = sorted({m[k] for m in pairs for k in (schemas.LISTING_A, schemas.LISTING_B)})
    if wanted:
        reps = read_index_table(stage_uri, view.manifest, "listings",
                                [schemas.LISTING, schemas.REPRESENTATIVE_IMAGE_ID], [(schemas.LISTING, "in", wanted)])
        view.listing_rep = dict(zip(reps[schemas.LISTING].to_pylist(),
                                    reps[schemas.REPRESENTATIVE_IMAGE_ID].to_pylist(), strict=True))


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
    manifest = io.read_manifest(stage_uri, schemas.RESULTS)
    io.check_table_schemas(stage_uri, manifest)
    head = [schemas.STATUS, schemas.LABEL, schemas.CATEGORY]
    batches = list(io.scan(stage_uri, manifest, head))
    table = pa.Table.from_batches(batches) if batches else pa.table({c: pa.array([], pa.string()) for c in head})
    ok = np.asarray(pc.fill_null(pc.equal(table[schemas.STATUS], schemas.OK), False))
    labelled = ok & np.asarray(pc.is_valid(table[schemas.LABEL]))
    wrong = labelled & ~np.asarray(pc.fill_null(pc.equal(table[schemas.LABEL], table[schemas.CATEGORY]), False))
    rng = np.random.default_rng(cfg.seed)
    picked_wrong = _pick(np.flatnonzero(wrong), cfg.queries // 2, rng)
    rest = np.setdiff1d(np.flatnonzero(ok), picked_wrong)
    picked = np.concatenate([picked_wrong, _pick(rest, cfg.queries - picked_wrong.size, rng)])
    rows = io.take_rows(stage_uri, manifest, picked, schemas.results().names).to_pylist() if picked.size else []
    rows.sort(key=lambda r: (r[schemas.LABEL] is None or r[schemas.LABEL] == r[schemas.CATEGORY],
                             str(r[schemas.LABEL]), str(r[schemas.URI])))
    return QuerySample(manifest, rows, table.num_rows, _value_counts(table[schemas.STATUS]), int(labelled.sum()),
                       int(wrong.sum()))


def _pick(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if candidates.size <= n:
        return candidates.astype(np.int64)
    return np.sort(rng.choice(candidates, size=n, replace=False)).astype(np.int64)


@dataclasses.dataclass
class Looks:
    """The same sampled queries in several results stages (say ranked by content, by style and by both): the
    first stage's sampled rows, and for every stage its method and each sampled query's matches."""

    queries: list[dict[str, Any]]
    methods: list[str]
    matches: list[dict[str, list[dict[str, Any]]]]  # per stage: query_id -> matches, best first


def load_looks(cfg: ReportConfig) -> Looks:
    """`cfg.look_queries` queries sampled from the first of `cfg.looks`, with their matches in each of them.
    Refuses (SectionError) a stage that lacks one of the sampled queries: the stages must hold the same queries."""
    first = sample_queries(dataclasses.replace(cfg, queries=cfg.look_queries), io.join(cfg.run, cfg.looks[0]))
    wanted = pa.array([r[schemas.QUERY_ID] for r in first.rows], pa.string())
    methods, matches = [], []
    for name in cfg.looks:
        uri = io.join(cfg.run, name)
        manifest = io.read_manifest(uri, schemas.RESULTS)
        io.check_table_schemas(uri, manifest)
        found: dict[str, list[dict[str, Any]]] = {}
        for batch in io.scan(uri, manifest, [schemas.QUERY_ID, schemas.MATCHES]):
            for row in batch.filter(pc.is_in(batch.column(schemas.QUERY_ID), value_set=wanted)).to_pylist():
                found.setdefault(row[schemas.QUERY_ID], (row[schemas.MATCHES] or [])[: cfg.matches])
        missing = set(wanted.to_pylist()) - set(found)
        if missing:
            raise SectionError(f"{name} does not hold {len(missing)} of the queries sampled from {cfg.looks[0]}; "
                               "--looks needs results stages of the same queries")
        methods.append(manifest.get("method") or name)
        matches.append(found)
    return Looks(first.rows, methods, matches)


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
    manifest = io.read_manifest(stage_uri, schemas.EMBEDDINGS)
    io.check_table_schemas(stage_uri, manifest)
    columns = [schemas.IMAGE_ID, schemas.URI, schemas.CATEGORY, schemas.STATUS, schemas.ERROR]
    found = Inputs(manifest, {}, {}, {}, {})
    value_set = pa.array(sorted(wanted), pa.string())
    for batch in io.scan(stage_uri, manifest, columns):
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


def row_groups(stage_uri: str, manifest: dict[str, Any]) -> pa.ChunkedArray:
    """The group the map colours every row by: its category, else its listing, else '(none)'; one string column."""
    parts = [pc.fill_null(pc.coalesce(b.column(schemas.CATEGORY), b.column(schemas.LISTING)), "(none)")
             for b in io.scan(stage_uri, manifest, [schemas.CATEGORY, schemas.LISTING])]
    return pa.chunked_array(parts, pa.string())


def load_map(cfg: ReportConfig, stage_uri: str, stage: str, column: str) -> MapData:
    """`cfg.map_points` rows of a latents (or embeddings) stage drawn with `cfg.seed`, projected to 2-D. When there
    are more categories than map colours, the rows are drawn from the largest categories only (a uniform sample of
    thousands of categories would give each a point or two). Rows without a vector are dropped. Refuses
    (SectionError) a stage with no usable vector in the sample, (SchemaError) one that breaks the data contract."""
    manifest = io.read_manifest(stage_uri, stage)
    io.check_table_schemas(stage_uri, manifest)
    groups = row_groups(stage_uri, manifest)
    counts = _value_counts(groups)
    candidates = np.arange(len(groups), dtype=np.int64)
    if len(counts) > len(charts.PALETTE):
        largest = sorted(counts, key=lambda g: (-counts[g], g))[: len(charts.PALETTE)]
        candidates = np.flatnonzero(np.asarray(pc.is_in(groups, value_set=pa.array(largest, pa.string()))))
    positions = candidates[io.sample_positions(candidates.size, cfg.map_points, cfg.seed)]
    if positions.size == 0:
        raise SectionError(f"{stage_uri} has no rows")
    table = io.take_rows(stage_uri, manifest, positions, [schemas.CATEGORY, schemas.LISTING, column])
    keep = pc.is_valid(table[column])
    table = table.filter(keep)
    if table.num_rows == 0:
        raise SectionError(f"{stage_uri}: none of the {positions.size} sampled rows has a {column!r} vector")
    unit = vectors.normalise(vectors.from_arrow(table[column]))
    drawn = [str(g) for g in groups.take(pa.array(positions)).filter(keep).to_pylist()]
    return MapData(charts.project(unit, cfg.map_method, cfg.seed), drawn, len(groups), f"{stage}.{column}",
                   cfg.map_method, len(counts), int(candidates.size))


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
    manifest = io.read_manifest(stage_uri, schemas.MODEL)
    text = io.read_text_file(stage_uri, manifest, schemas.METRICS_FILE) or ""
    return Training(manifest, *parse_metrics(text))


def load_evaluation(stage_uri: str) -> dict[str, Any]:
    """The evaluation stage's evaluation.json. Refuses (SectionError) one without it, not JSON, or without a
    methods list."""
    manifest = io.read_manifest(stage_uri, schemas.EVALUATION)
    text = io.read_text_file(stage_uri, manifest, schemas.EVALUATION_FILE)
    if text is None:
        raise SectionError(f"{stage_uri}: the manifest lists no {schemas.EVALUATION_FILE}; rerun jobs.evaluate")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise SectionError(f"{stage_uri}/{schemas.EVALUATION_FILE} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("methods"), list):
        raise SectionError(f"{stage_uri}/{schemas.EVALUATION_FILE} has no 'methods' list")
    return document


def embeddings_uri(cfg: ReportConfig, index: Loaded) -> str:
    """The embeddings stage that names the images: --embeddings, else the index's source when it indexed
    embeddings, else <run>/embeddings."""
    if cfg.embeddings:
        return io.join(cfg.run, cfg.embeddings)
    index_config = index.value.manifest.get("config", {}) if index.ok else {}
    if index_config.get("source") == schemas.EMBEDDINGS:
        return io.join(cfg.run, index_config.get("input_stage") or schemas.EMBEDDINGS)
    return io.join(cfg.run, schemas.EMBEDDINGS)


def wanted_ids(cfg: ReportConfig, index: Loaded, results: Loaded, looks: Loaded) -> set[str]:
    """Every image id the page shows, so that one pass over the embeddings finds their URIs."""
    ids: set[Any] = set()
    if index.ok:
        view: IndexView = index.value
        rep = schemas.REPRESENTATIVE_IMAGE_ID
        ids.update(c.get(rep) for c in view.categories[: cfg.categories])
        ids.update(r.get(rep) for rows in view.listings.values() for r in rows)
        central = schemas.CENTRAL_IMAGE_IDS
        ids.update(i for r in view.rep_listing.values() for i in (r.get(central) or [])[: cfg.central])
        ids.update(view.listing_rep.values())
        if results.ok:
            predicted = {r[schemas.CATEGORY] for r in results.value.rows}
            ids.update(c.get(rep) for c in view.categories if c[schemas.CATEGORY] in predicted)
    if results.ok:
        ids.update(m[schemas.IMAGE_ID] for r in results.value.rows for m in (r[schemas.MATCHES] or [])[: cfg.matches])
    if looks.ok:
        ids.update(m[schemas.IMAGE_ID] for stage in looks.value.matches for row in stage.values() for m in row)
    ids.discard(None)
    return {str(i) for i in ids}


def results_stage(cfg: ReportConfig) -> str:
    """The results stage whose queries the page samples: --results when published or named explicitly; else (the
    pipeline names its stages results-<index>-<scoring>) the evaluated stage searched in --index, else the first
    evaluated one, else --results (which then shows as not run)."""
    default = next(f.default for f in dataclasses.fields(ReportConfig) if f.name == "results")
    if cfg.results != default or io.stage_exists(io.join(cfg.run, cfg.results)):
        return cfg.results
    try:
        evaluated = [m.get("results_stage") for m in load_evaluation(io.join(cfg.run, cfg.evaluation))["methods"]]
    except READ_ERRORS:
        return cfg.results
    evaluated = [s for s in evaluated if isinstance(s, str) and io.stage_exists(io.join(cfg.run, s))]
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
    looks = load(stage(cfg.looks[0]), "query", lambda: load_looks(cfg)) if cfg.looks else Loaded("", "")
    emb = embeddings_uri(cfg, index)
    inputs = load(emb, "embed", lambda: scan_inputs(emb, wanted_ids(cfg, index, results, looks), cfg.bad_examples))
    latents, note = stage(cfg.latents), ""
    if io.stage_exists(latents) or not io.stage_exists(emb):
        mapped = load(latents, "train", lambda: load_map(cfg, latents, schemas.LATENTS, schemas.LATENT))
    else:
        note = "No latents stage yet: the map shows the backbone embeddings instead. "
        mapped = load(emb, "embed", lambda: load_map(cfg, emb, schemas.EMBEDDINGS, schemas.EMBEDDING))
    return {
        "index": index, "results": results, **({"looks": looks} if cfg.looks else {}), "inputs": inputs, "map": mapped,
        "evaluation": load(stage(cfg.evaluation), "evaluate", lambda: load_evaluation(stage(cfg.evaluation))),
        "training": load(stage(cfg.model), "train", lambda: load_training(stage(cfg.model))),
    }, note


# ----------------------------------------------------------------------------------------------
# The page and the stage interface


def build(cfg: ReportConfig) -> tuple[str, dict[str, Any]]:
    """(the report's HTML, a summary: sizes, thumbnail counts, section states, errors, seconds). Reads every stage
    of `cfg.run` it can: a missing stage, or one with bad data, shows in its section instead of failing the report;
    a bug in a loader raises."""
    start = time.perf_counter()
    loaded, map_note = load_all(cfg)
    thumbs = Thumbnails(cfg.thumb_px, cfg.thumb_quality, int(cfg.max_thumbnail_mb * 1024 * 1024), cfg.max_image_bytes,
                        cfg.max_pixels, cfg.threads)
    ctx = Context(cfg, thumbs)
    if loaded["inputs"].ok:
        ctx.uri_of, ctx.category_of = loaded["inputs"].value.uri_of, loaded["inputs"].value.category_of
    bodies = sections.render_all(ctx, loaded, map_note)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = sections.layout(f"gatrep report: {cfg.run}", f"run {cfg.run} \u00b7 generated {created}", bodies)
    page = thumbs.fill(page).replace("<!--thumbstats-->", sections.thumbnail_note(cfg, thumbs.stats), 1)
    return page, _summary(page, loaded, thumbs.stats, start)


def _summary(page: str, loaded: dict[str, Loaded], thumb_stats: dict[str, int], start: float) -> dict[str, Any]:
    return {"bytes": len(page.encode()), "seconds": round(time.perf_counter() - start, 2),
            "thumbnails": dict(thumb_stats),
            "sections": {k: ("ok" if v.ok else "error" if v.error else "not run") for k, v in loaded.items()},
            "errors": {k: f"{type(v.error).__name__}: {v.error}" for k, v in loaded.items() if v.error}}


def write_html(text: str, out_uri: str) -> str:
    """Write the page to `out_uri` (any fsspec URI), atomically, and return it."""
    io.write_atomic(out_uri, text.encode("utf-8"))
    return out_uri


def out_uri(cfg: ReportConfig) -> str:
    """Where the page goes: --out, else <run>/report/index.html."""
    return cfg.out or io.join(cfg.run, "report", "index.html")


def run(cfg: ReportConfig) -> dict[str, Any]:
    """Build and write the report, printing a warning line on stderr for every section that could not be read;
    returns build's summary with the output URI under "out". Refuses (StageError) a run root that does not exist,
    since every section would only say "not run"."""
    cfg = dataclasses.replace(cfg, run=versions.resolve(cfg.run, cfg.version), version="")
    fs, path = io.url_to_fs(cfg.run)
    if not fs.exists(path):
        raise io.StageError(f"run root {cfg.run!r} does not exist; pass the --run of a pipeline run")
    text, result = build(cfg)
    result["out"] = write_html(text, out_uri(cfg))
    for name, error in result["errors"].items():
        print(f"warning: {name}: {error}", file=sys.stderr)
    return result


def summary(result: dict[str, Any]) -> str:
    """Two lines on what `run` wrote: the page's URI, size, time and thumbnails, then every section's state."""
    states = ", ".join(f"{name} {state}" for name, state in result["sections"].items())
    thumbs = result["thumbnails"]
    return (f"report: {result['out']} ({result['bytes'] / 1e6:.2f} MB, {result['seconds']:.1f}s; "
            f"{thumbs['embedded']} thumbnails, {thumbs['placeholders']} placeholders)\nstages: {states}")
