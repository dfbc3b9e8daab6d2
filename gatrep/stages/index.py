"""The index stage: `latents` (or `embeddings`, for the baselines) -> listing/category representatives (the learned
category nodes of a class-nodes model), listing similarity and per-category retrieval indexes; also the reader of a
published index."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gatrep import config, io, represent, schemas, vectors
from gatrep.categorize import CategoryIndex, CategoryPart, Searcher
from gatrep.config import IndexConfig
from gatrep.errors import UserError

if TYPE_CHECKING:
    from gatrep.models.classnodes import CategoryNodes

NAME = schemas.INDEX
CONFIG = IndexConfig
DESCRIPTION = "Build <--run>/<--stage> (default index) from <--run>/latents."
VECTORS_FILE = "vectors.parquet"
CATALOG_FILE = "catalog.parquet"


class IndexFileError(UserError, RuntimeError):
    """An index directory whose files are missing, do not match its catalog, or do not fit the queries."""


@dataclasses.dataclass(frozen=True)
class Source:
    """The images to index: one row per usable latent or embedding."""

    image_ids: np.ndarray
    listings: np.ndarray
    categories: np.ndarray
    vectors: np.ndarray
    skipped: int


@dataclasses.dataclass(frozen=True)
class Categories:
    """Which category every listing and image belongs to, and each category's representative."""

    of_listing: np.ndarray
    of_image: np.ndarray
    names: np.ndarray
    vectors: np.ndarray
    listing: np.ndarray
    image_id: np.ndarray
    listings: np.ndarray


# ----------------------------------------------------------------------------------------------
# Reading


def read_style(cfg: IndexConfig, source_uri: str, source: Source) -> np.ndarray | None:
    """The style vectors of the source's images, in its row order, from the embeddings stage it comes from
    (for latents, the one their graph was built from); None when that stage was embedded without --style, or
    when latents record no graph (made by hand: no way back to their images)."""
    uri, manifest = source_uri, io.read_manifest(source_uri, cfg.source)
    if cfg.source == schemas.LATENTS:
        if schemas.GRAPH not in manifest.get("upstream", {}):
            return None
        _, graph_manifest = io.upstream_stage(cfg.run, manifest, schemas.GRAPH, schemas.GRAPH)
        uri, manifest = io.upstream_stage(cfg.run, graph_manifest, schemas.EMBEDDINGS, schemas.EMBEDDINGS)
    if schemas.STYLE not in io.table_schema(uri, manifest).names:
        return None
    table, _ = io.read_table(uri, schemas.EMBEDDINGS, columns=[schemas.IMAGE_ID, schemas.STATUS, schemas.STYLE])
    table = table.filter(pc.and_(pc.equal(table[schemas.STATUS], schemas.OK), pc.is_valid(table[schemas.STYLE])))
    row = {image_id: i for i, image_id in enumerate(table[schemas.IMAGE_ID].to_pylist())}
    missing = [i for i in source.image_ids if i not in row]
    if missing:
        raise io.StageError(f"{uri} has no style vector for {len(missing)} indexed images, e.g. {missing[:3]}; "
                            "rebuild the stages after it")
    return vectors.from_arrow(table[schemas.STYLE])[[row[i] for i in source.image_ids]]


def read_source(cfg: IndexConfig, stage_uri: str) -> Source:
    """The usable rows of the source stage. Embeddings keep status-ok rows; a row needs a listing or a
    category (then that is its listing, as in Approach II); the others are counted in `skipped`."""
    column = schemas.LATENT if cfg.source == schemas.LATENTS else schemas.EMBEDDING
    wanted = [schemas.IMAGE_ID, schemas.LISTING, schemas.CATEGORY, column]
    if cfg.source == schemas.EMBEDDINGS:
        wanted.append(schemas.STATUS)
    table, _ = io.read_table(stage_uri, cfg.source, columns=wanted)
    total = table.num_rows
    usable = pc.and_(pc.is_valid(table[column]), pc.is_valid(table[schemas.IMAGE_ID]))
    if cfg.source == schemas.EMBEDDINGS:
        usable = pc.and_(usable, pc.equal(table[schemas.STATUS], schemas.OK))
    listing = pc.coalesce(table[schemas.LISTING], table[schemas.CATEGORY])
    table = table.set_column(table.schema.get_field_index(schemas.LISTING), schemas.LISTING, listing)
    table = table.filter(pc.and_(usable, pc.is_valid(table[schemas.LISTING])))
    if table.num_rows == 0:
        raise io.StageError(f"{stage_uri}: no usable rows out of {total} (need a vector and a listing or category)")
    image_ids, listings, categories = (np.asarray(table[c].to_pylist(), dtype=object) for c in wanted[:3])
    return Source(image_ids, listings, categories, vectors.from_arrow(table[column]),
                  skipped=total - table.num_rows)


# ----------------------------------------------------------------------------------------------
# Representatives and categories


def degree_options(cfg: IndexConfig) -> dict[str, Any]:
    """The keyword arguments of represent.degree, when the method is degree."""
    if cfg.method != "degree":
        return {}
    return {"threshold": cfg.degree_threshold, "exact_max": cfg.exact_max, "n_neighbors": cfg.ann_neighbours,
            "seed": cfg.seed}


def given_listing_categories(source: Source, listings: np.ndarray) -> np.ndarray:
    """The input category of each listing; refuses a listing with none or with several, naming it."""
    seen: dict[str, set] = {}
    for listing, category in zip(source.listings, source.categories, strict=True):
        seen.setdefault(listing, set()).add(category)
    out = []
    for listing in listings:
        found = seen[listing]
        if None in found or len(found) != 1:
            what = "no category" if None in found else f"several categories ({', '.join(sorted(found))})"
            raise io.InputError(f"listing {listing!r} has {what}; give each listing one category or use "
                                      f"--categories threshold|kmeans|dbscan")
        out.append(next(iter(found)))
    return np.asarray(out, dtype=object)


def discovered_listing_categories(cfg: IndexConfig, listing_vectors: np.ndarray) -> np.ndarray:
    """A discovered category name (c0000, c0001, ...) for each listing (Case 1 of III-A2). Refuses
    (ConfigError) more K-Means clusters than there are listings."""
    if cfg.categories == "kmeans" and cfg.n_clusters > len(listing_vectors):
        raise config.ConfigError(f"--n-clusters {cfg.n_clusters} is more than the {len(listing_vectors)} listings")
    labels = represent.discover_categories(
        listing_vectors, cfg.categories, threshold=cfg.category_threshold, n_clusters=cfg.n_clusters,
        eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples, exact_max=cfg.exact_max,
        n_neighbors=cfg.ann_neighbours, seed=cfg.seed)
    return np.asarray([f"c{label:04d}" for label in labels], dtype=object)


def category_nodes(cfg: IndexConfig, source_manifest: dict[str, Any]) -> CategoryNodes | None:
    """The learned category nodes of the class-nodes model (jobs.train --objective class-nodes) the latents were
    encoded with; None for embeddings, for latents of an autoencoder or made by hand (no model recorded), and with
    discovered categories. Refuses (io.StageError) a model republished since the latents were written."""
    record = source_manifest.get("upstream", {}).get(schemas.MODEL)
    if cfg.source != schemas.LATENTS or cfg.categories != "given" or not record or "stage" not in record:
        return None
    if io.read_manifest(io.join(cfg.run, record["stage"]), schemas.MODEL).get("objective") != config.CLASS_NODES:
        return None
    model_uri, model_manifest = io.upstream_stage(cfg.run, source_manifest, schemas.MODEL, schemas.MODEL)
    from gatrep.stages.train import load_category_nodes  # torch, and only for a class-nodes model

    return load_category_nodes(model_uri, model_manifest)


def class_node_targets(names: np.ndarray, nodes: CategoryNodes) -> np.ndarray:
    """The learned category-node embedding of each category of `names`, in that order: the categories'
    representatives, each with its image nearest to the embedding as the representative image. Refuses
    (io.StageError) a category the model has no node for."""
    position = {str(name): c for c, name in enumerate(nodes.names)}
    missing = [str(name) for name in names if str(name) not in position]
    if missing or nodes.embeddings is None:
        raise io.StageError(f"the class-nodes model has no category node for {', '.join(missing[:5]) or 'any category'}"
                            "; retrain it (python -m jobs.train --objective class-nodes) and rebuild the latents")
    return nodes.embeddings[[position[str(name)] for name in names]].astype(np.float32)


def listing_categories(cfg: IndexConfig, source: Source,
                       reps: represent.GroupRepresentatives) -> tuple[np.ndarray, np.ndarray]:
    """(the category of each listing, in `reps.groups` order; the category of each image): given, or discovered
    from the listing representatives (Case 1 of III-A2)."""
    if cfg.categories == "given":
        of_listing = given_listing_categories(source, reps.groups)
    else:
        of_listing = discovered_listing_categories(cfg, reps.vectors)
    lookup = dict(zip(reps.groups, of_listing, strict=True))
    return of_listing, np.asarray([lookup[listing] for listing in source.listings], dtype=object)


def discovered_representatives(source: Source, reps: represent.GroupRepresentatives, of_listing: np.ndarray,
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, listings, image ids) of discovered categories' representatives, in sorted category order: each
    category's most central listing representative (III-A2). Small: one vector per listing."""
    cat = represent.represent_groups(reps.vectors, of_listing, "most_central", 1)
    return cat.vectors, reps.groups[cat.index], source.image_ids[reps.index[cat.index]]


# ----------------------------------------------------------------------------------------------
# Per-category work: Ray tasks, one per category or per batch of small ones (in process for a small index)

# Per-category work (representatives, central images, retrieval indexes) runs in Ray tasks from this many indexed
# images up, and in this process below. The stage then starts no Ray instance for a small index: starting one
# (seconds, a worker process per CPU, their imports) costs more than the work, and the driver holds these vectors
# anyway; and each worker that builds a pynndescent index pays numba's compilation once (about a minute on a busy
# 2-CPU machine). Results are the same either way (tests/test_index_tasks.py); bench/index.py measures both.
TASK_MIN_ROWS = 50_000
# Images per task: consecutive small categories are batched until a group holds this many, so 10,000 tiny
# categories make a few tasks, not 10,000; a category this large is a task of its own.
GROUP_ROWS = 20_000
# Groups whose vectors are in the object store at once, per CPU: bounds what the driver copies out ahead.
IN_FLIGHT_PER_CPU = 2


@dataclasses.dataclass(frozen=True)
class CategoryWork:
    """What every group's task computes: the given categories' representative `method` (None: the driver chooses
    the representatives, for discovered categories), the index config's settings, and the directories the
    pickles of the retrieval indexes go to (`style_dir`: None without style vectors)."""

    method: str | None
    degree: dict[str, Any]
    top_m: int
    central: str
    seed: int
    ann_min_size: int
    ann_neighbours: int
    ann_dir: str
    style_dir: str | None


@dataclasses.dataclass(frozen=True)
class CategoryGroup:
    """The categories of one task, consecutive in sorted order: their `positions` in that order (which name their
    pickles), `names`, `sizes`, and their images' vectors category after category (with their style vectors, and
    each category's class-node embedding as its representative when the model has them)."""

    positions: np.ndarray
    names: np.ndarray
    sizes: np.ndarray
    vectors: np.ndarray
    style: np.ndarray | None = None
    targets: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """What a task returns for its group; rows index the group's vectors. Per category: the representative vector
    and image (None for discovered categories), the central images' rows, and the retrieval index's pickle
    (name, sha256), None for exact search, for the vectors and the style vectors (empty without)."""

    positions: np.ndarray
    rep_vectors: np.ndarray | None
    rep_rows: np.ndarray | None
    central: list[np.ndarray]
    ann: list[tuple[str, str] | None]
    style_ann: list[tuple[str, str] | None]


def plan_groups(sizes: np.ndarray, group_rows: int = GROUP_ROWS) -> list[np.ndarray]:
    """Category positions (0..C-1, in order) batched into groups of consecutive categories: a group closes once it
    holds `group_rows` images, and a category that large is a group of its own. Every position appears once."""
    groups: list[np.ndarray] = []
    current: list[int] = []
    rows = 0
    for position, size in enumerate(sizes):
        if size >= group_rows and current:
            groups.append(np.asarray(current, dtype=np.int64))
            current, rows = [], 0
        current.append(position)
        rows += int(size)
        if rows >= group_rows:
            groups.append(np.asarray(current, dtype=np.int64))
            current, rows = [], 0
    if current:
        groups.append(np.asarray(current, dtype=np.int64))
    return groups


def category_work(group: CategoryGroup, work: CategoryWork) -> GroupResult:
    """Each category of `group`: its representative (by `work.method`, or its image nearest to the class-node
    embedding), its top-m central images, and its retrieval index, whose pickle (pynndescent, for a category of
    at least `ann_min_size` images) is written here. The same functions, over each category's rows, as for the
    whole source at once: results equal theirs. A Ray task, or called in process for a small index."""
    labels = np.repeat(group.names, group.sizes)
    rep_vectors = rep_rows = None
    if group.targets is not None:
        rep_vectors, rep_rows = group.targets, represent.nearest_members(group.vectors, labels, group.targets)
    elif work.method is not None:
        reps = represent.represent_groups(group.vectors, labels, work.method, 1, **work.degree)
        rep_vectors, rep_rows = reps.vectors, reps.index
    central = represent.central_images(group.vectors, labels, work.top_m, work.central, work.seed)
    ann = _write_group_anns(group.vectors, labels, group, work, work.ann_dir)
    style_ann = ([] if group.style is None or work.style_dir is None
                 else _write_group_anns(group.style, labels, group, work, work.style_dir))
    return GroupResult(group.positions, rep_vectors, rep_rows, central, ann, style_ann)


def _write_group_anns(vecs: np.ndarray, labels: np.ndarray, group: CategoryGroup, work: CategoryWork,
                      dir_uri: str) -> list[tuple[str, str] | None]:
    # The categories stand in for the image ids, which the pickles do not hold (vectors.parquet does).
    index = CategoryIndex.build(vecs, labels, labels, ann_min_size=work.ann_min_size,
                                n_neighbors=work.ann_neighbours, seed=work.seed)
    out: list[tuple[str, str] | None] = []
    for position, name in zip(group.positions, group.names, strict=True):
        ann = index.parts[str(name)].ann
        out.append(None if ann is None else _write_ann(ann, dir_uri, int(position))[:2])
    return out


def run_groups(groups: Iterator[CategoryGroup], work: CategoryWork, tasks: bool) -> Iterator[GroupResult]:
    """`category_work` of every group: in this process one after the other, or (`tasks`) as Ray tasks, each
    group's vectors put in the object store once, a few groups per CPU at a time; results in completion order."""
    if not tasks:
        yield from (category_work(group, work) for group in groups)
        return
    import ray

    from gatrep.stages import init_ray

    init_ray()
    task = ray.remote(category_work)
    work_ref = ray.put(work)
    limit = max(2, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    for group in groups:
        pending.append(task.remote(ray.put(group), work_ref))
        while len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


@dataclasses.dataclass
class PerCategory:
    """Every category's results, in sorted category order, rows global: representative vectors and rows (None
    for discovered categories), central image rows, retrieval-index pickles (name, sha256) or None, per index."""

    rep_vectors: np.ndarray | None
    rep_rows: np.ndarray | None
    central: list[np.ndarray]
    ann: list[tuple[str, str] | None]
    style_ann: list[tuple[str, str] | None]
    groups: int


def per_category(cfg: IndexConfig, source: Source, of_image: np.ndarray, style: np.ndarray | None,
                 targets: np.ndarray | None, run_dir: str, tasks: bool,
                 ) -> tuple[PerCategory, dict[str, str], list[str]]:
    """Run the per-category work over the categories of `of_image` (see `run_groups`) while this process writes
    the retrieval indexes' vectors tables, group by group; then their catalogs. Returns the results, the tables
    written ({ann,style_ann}_{vectors,catalog}: URI) and the pickles' URIs."""
    names, members = vectors.group_rows(of_image)
    sizes = np.array([m.size for m in members], dtype=np.int64)
    dirs = {"ann": io.join(run_dir, "ann")} | ({} if style is None else {"style_ann": io.join(run_dir, "style-ann")})
    for dir_uri in dirs.values():
        fs, path = io.url_to_fs(dir_uri)
        fs.makedirs(path, exist_ok=True)
    work = CategoryWork(cfg.method if cfg.categories == "given" and targets is None else None, degree_options(cfg),
                        cfg.top_m, cfg.central, cfg.seed, cfg.ann_min_size, cfg.ann_neighbours, dirs["ann"],
                        dirs.get("style_ann"))
    plan = plan_groups(sizes, GROUP_ROWS)
    orders = [np.concatenate([members[p] for p in positions]) for positions in plan]
    writers = {key: _VectorsWriter(dir_uri, source, names, sizes) for key, dir_uri in dirs.items()}

    def groups() -> Iterator[CategoryGroup]:
        for positions, order in zip(plan, orders, strict=True):
            writers["ann"].write(positions, order, source.vectors)
            if style is not None:
                writers["style_ann"].write(positions, order, style)
            yield CategoryGroup(positions, names[positions], sizes[positions], source.vectors[order],
                                None if style is None else style[order],
                                None if targets is None else targets[positions])

    given = work.method is not None or targets is not None
    out = PerCategory(np.empty((len(names), source.vectors.shape[1]), np.float32) if given else None,
                      np.empty(len(names), np.int64) if given else None, [np.empty(0, np.int64)] * len(names),
                      [None] * len(names), [None] * len(names), len(plan))
    group_of = {int(positions[0]): g for g, positions in enumerate(plan)}
    for result in run_groups(groups(), work, tasks):
        _merge(out, result, orders[group_of[int(result.positions[0])]])
    tables, pickles = {}, []
    for key, writer in writers.items():
        anns = out.ann if key == "ann" else out.style_ann
        tables[f"{key}_vectors"] = writer.close()
        tables[f"{key}_catalog"] = _write_catalog(names, sizes, anns, dirs[key])
        pickles += [io.join(dirs[key], ann[0]) for ann in anns if ann is not None]
    return out, tables, pickles


def _merge(out: PerCategory, result: GroupResult, order: np.ndarray) -> None:
    """Copy a group's results into `out`, its rows made rows of the source through `order` (the group's rows)."""
    for i, position in enumerate(result.positions):
        out.central[position] = order[result.central[i]]
        out.ann[position] = result.ann[i]
        if result.style_ann:
            out.style_ann[position] = result.style_ann[i]
    if out.rep_vectors is not None and out.rep_rows is not None:
        assert result.rep_vectors is not None and result.rep_rows is not None, "a group without representatives"
        out.rep_vectors[result.positions] = result.rep_vectors
        out.rep_rows[result.positions] = order[result.rep_rows]


class _VectorsWriter:
    """vectors.parquet of a retrieval index, written group by group in category order (as `save_retrieval_index`
    writes it whole): unit vectors, so this process never holds a second copy of every vector."""

    def __init__(self, dir_uri: str, source: Source, names: np.ndarray, sizes: np.ndarray) -> None:
        self.fs, self.path = io.url_to_fs(dir_uri)
        self.path = posixpath.join(self.path, VECTORS_FILE)
        self.source, self.names, self.sizes = source, names, sizes
        self.writer: pq.ParquetWriter | None = None

    def write(self, positions: np.ndarray, order: np.ndarray, vecs: np.ndarray) -> None:
        table = pa.table({
            schemas.CATEGORY: np.repeat(self.names[positions], self.sizes[positions]).tolist(),
            schemas.IMAGE_ID: self.source.image_ids[order].tolist(),
            schemas.LISTING: self.source.listings[order].tolist(),
            schemas.LABEL: self.source.categories[order].tolist(),
            schemas.VECTOR: vectors.to_arrow(vectors.normalise(vecs[order])),
        }, schema=schemas.ann_vectors(vecs.shape[1]))
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, filesystem=self.fs)
        self.writer.write_table(table)

    def close(self) -> str:
        """Finish the file; returns its URI."""
        assert self.writer is not None, "no category was written"
        self.writer.close()
        return io.full_uri(self.fs, self.path)


def _write_catalog(names: np.ndarray, sizes: np.ndarray, anns: list[tuple[str, str] | None], dir_uri: str) -> str:
    return io.write_table(pa.table({
        schemas.CATEGORY: [str(name) for name in names], schemas.SIZE: sizes,
        schemas.ANN_FILE: [None if a is None else a[0] for a in anns],
        schemas.ANN_SHA256: [None if a is None else a[1] for a in anns],
    }, schema=schemas.ann_catalog()), dir_uri, CATALOG_FILE)


# ----------------------------------------------------------------------------------------------
# Tables


def listings_table(source: Source, reps: represent.GroupRepresentatives, cats: Categories) -> pa.Table:
    """listings.parquet: one row per listing (Remark 1's z-score and top-k central images)."""
    return pa.table({
        schemas.LISTING: reps.groups.tolist(),
        schemas.CATEGORY: cats.of_listing.tolist(),
        schemas.REPRESENTATIVE: vectors.to_arrow(reps.vectors),
        schemas.REPRESENTATIVE_IMAGE_ID: source.image_ids[reps.index].tolist(),
        schemas.ZSCORE: reps.zscore.astype(np.float32),
        schemas.SIZE: reps.sizes,
        schemas.CENTRAL_IMAGE_IDS: [source.image_ids[top].tolist() for top in reps.top],
        schemas.CENTRAL_ZSCORES: [reps.zscores[top].astype(np.float32).tolist() for top in reps.top],
    }, schema=schemas.listings(reps.vectors.shape[1]))


def majority_labels(source: Source, cats: Categories) -> list[str | None]:
    """The input category most images of each category carry (ties: alphabetical), None when unlabelled."""
    votes: dict[str, Counter] = {name: Counter() for name in cats.names}
    for category, label in zip(cats.of_image, source.categories, strict=True):
        if label is not None:
            votes[category][label] += 1
    return [min(v, key=lambda label: (-v[label], label)) if v else None for v in votes.values()]


def categories_table(source: Source, cats: Categories, central: list[np.ndarray]) -> pa.Table:
    """categories.parquet: representative, representative listing and the m extra representatives (`central`:
    their rows, per category)."""
    dim = source.vectors.shape[1]
    return pa.table({
        schemas.CATEGORY: cats.names.tolist(),
        schemas.REPRESENTATIVE: vectors.to_arrow(cats.vectors),
        schemas.REPRESENTATIVE_LISTING: cats.listing.tolist(),
        schemas.REPRESENTATIVE_IMAGE_ID: cats.image_id.tolist(),
        schemas.LABEL: majority_labels(source, cats),
        schemas.LISTINGS: cats.listings,
        schemas.SIZE: [rows.size for rows in vectors.group_rows(cats.of_image)[1]],
        schemas.CENTRAL_IMAGE_IDS: [source.image_ids[top].tolist() for top in central],
        schemas.CENTRAL_VECTORS: pa.array([source.vectors[top].tolist() for top in central],
                                     pa.list_(schemas.vector_type(dim))),
    }, schema=schemas.categories(dim))


def similarity_tables(cfg: IndexConfig, reps: represent.GroupRepresentatives,
                      cats: Categories) -> tuple[pa.Table, pa.Table]:
    """listing_similarity.parquet and merge_suggestions.parquet (Experiment IV-A2)."""
    a, b, sims = represent.listing_pairs(reps.vectors, cfg.similarity_max_listings, cfg.similarity_neighbours,
                                         cfg.exact_max, cfg.seed)
    pairs = pa.table({schemas.LISTING_A: reps.groups[a].tolist(), schemas.LISTING_B: reps.groups[b].tolist(),
                      schemas.SIMILARITY: sims.astype(np.float32)}, schema=schemas.listing_similarity())
    ma, mb, msims = represent.merge_suggestions(a, b, sims, cfg.merge_threshold)
    merges = pa.table({schemas.LISTING_A: reps.groups[ma].tolist(), schemas.LISTING_B: reps.groups[mb].tolist(),
                       schemas.SIMILARITY: msims.astype(np.float32), schemas.CATEGORY_A: cats.of_listing[ma].tolist(),
                       schemas.CATEGORY_B: cats.of_listing[mb].tolist()}, schema=schemas.merge_suggestions())
    return pairs, merges


# ----------------------------------------------------------------------------------------------
# The job


def categories_of(source: Source, reps: represent.GroupRepresentatives, of_listing: np.ndarray,
                  of_image: np.ndarray, done: PerCategory) -> Categories:
    """Every category with its representative: from the per-category work (given categories, class nodes), else
    the most central listing representative (discovered categories)."""
    names = vectors.group_rows(of_image)[0]
    counts = Counter(of_listing)
    listings = np.asarray([counts[name] for name in names], dtype=np.int64)
    if done.rep_vectors is not None and done.rep_rows is not None:
        rows = done.rep_rows
        return Categories(of_listing, of_image, names, done.rep_vectors, source.listings[rows],
                          source.image_ids[rows], listings)
    return Categories(of_listing, of_image, names, *discovered_representatives(source, reps, of_listing), listings)


def run(cfg: IndexConfig, tasks: bool | None = None) -> dict[str, Any]:
    """Build and publish the index stage; returns its manifest (the existing one when already up to date). The
    per-category work runs in Ray tasks when `tasks`, in process when not; None: tasks from TASK_MIN_ROWS images."""
    with io.stage_lock(io.join(cfg.run, cfg.stage)):
        timings: dict[str, float] = {}
        source_uri = io.join(cfg.run, cfg.input_stage or cfg.source)
        source_manifest = io.read_manifest(source_uri, cfg.source)
        upstream = {"source": io.upstream_of(source_manifest, source_uri)}
        stage_uri = io.join(cfg.run, cfg.stage)
        existing = io.up_to_date(stage_uri, NAME, config.to_dict(cfg), upstream)
        if existing is not None:
            return existing
        with io.timed(timings, "read"):
            source = read_source(cfg, source_uri)
            style = read_style(cfg, source_uri, source)
        with io.timed(timings, "listings"):
            reps = represent.represent_groups(source.vectors, source.listings, cfg.method, cfg.top_k,
                                              **degree_options(cfg))
        with io.timed(timings, "categories"):
            of_listing, of_image = listing_categories(cfg, source, reps)
            nodes = category_nodes(cfg, source_manifest)
            targets = None if nodes is None else class_node_targets(vectors.group_rows(of_image)[0], nodes)
        run_dir = io.new_run_dir(stage_uri)
        tasks = len(source.image_ids) >= TASK_MIN_ROWS if tasks is None else tasks
        with io.timed(timings, "per_category"):
            done, files, pickles = per_category(cfg, source, of_image, style, targets, run_dir, tasks)
        cats = categories_of(source, reps, of_listing, of_image, done)
        tables = {"listings": listings_table(source, reps, cats),
                  "categories": categories_table(source, cats, done.central)}
        with io.timed(timings, "similarity"):
            tables["listing_similarity"], tables["merge_suggestions"] = similarity_tables(cfg, reps, cats)
        files |= {name: io.write_table(table, run_dir, f"{name}.parquet") for name, table in tables.items()}
        stage_path = io.url_to_fs(stage_uri)[1]
        relative = {name: posixpath.relpath(io.url_to_fs(uri)[1], stage_path) for name, uri in files.items()}
        return io.publish(
            stage_uri, NAME, list(files.values()) + pickles, config.to_dict(cfg), upstream,
            tables=relative, rows=len(source.image_ids), skipped=source.skipped, listings=len(reps.groups),
            categories=len(cats.names), ann_categories=sum(a is not None for a in done.ann),
            category_representatives=("class-nodes" if nodes is not None else
                                      cfg.method if cfg.categories == "given" else "most_central"),
            category_groups=done.groups, category_tasks=tasks,
            merge_suggestions=tables["merge_suggestions"].num_rows, dim=int(source.vectors.shape[1]),
            style_dim=0 if style is None else int(style.shape[1]), timings=timings)


def summary(manifest: dict[str, Any]) -> str:
    """One line for the terminal."""
    return (f"index: {manifest['rows']} images ({manifest['skipped']} skipped), {manifest['listings']} listings, "
            f"{manifest['categories']} categories ({manifest['ann_categories']} with an ANN index"
            + (", represented by their learned class nodes" if manifest.get("category_representatives") == "class-nodes"
               else "") + "), "
            f"{manifest['merge_suggestions']} merge suggestions"
            + (f", style vectors ({manifest['style_dim']}-d)" if manifest.get("style_dim") else "")
            + (" [already published: reused]" if manifest.get("reused") else ""))


# ----------------------------------------------------------------------------------------------
# The retrieval index's files, and reading a published index


def save_retrieval_index(index: CategoryIndex, dir_uri: str) -> list[str]:
    """Write vectors.parquet, catalog.parquet and one pynndescent pickle per ANN category into `dir_uri`;
    returns the URIs written, vectors first and catalog last."""
    written = [io.write_table(_vectors_table(index), dir_uri, VECTORS_FILE)]
    anns: list[tuple[str, str] | None] = []
    for position, category in enumerate(index.categories):
        ann = index.parts[category].ann
        pickled = None if ann is None else _write_ann(ann, dir_uri, position)
        anns.append(None if pickled is None else pickled[:2])
        written += [] if pickled is None else [pickled[2]]
    names = np.asarray(index.categories, dtype=object)
    sizes = np.asarray([index.size(c) for c in index.categories], dtype=np.int64)
    written.append(_write_catalog(names, sizes, anns, dir_uri))
    return written


def _write_ann(ann: Any, dir_uri: str, position: int) -> tuple[str, str, str]:
    """Pickle one category's pynndescent index into `dir_uri` as ann-<position>.pkl; returns (file name, its
    SHA-256, its URI)."""
    name = f"ann-{position:05d}.pkl"
    data = pickle.dumps(ann, protocol=pickle.HIGHEST_PROTOCOL)
    fs, path = io.url_to_fs(dir_uri)
    fs.pipe_file(posixpath.join(path, name), data)
    return name, hashlib.sha256(data).hexdigest(), io.join(dir_uri, name)


def _vectors_table(index: CategoryIndex) -> pa.Table:
    parts = [index.parts[c] for c in index.categories]
    return pa.table({
        schemas.CATEGORY: [c for c in index.categories for _ in range(index.size(c))],
        schemas.IMAGE_ID: np.concatenate([p.ids for p in parts]).tolist(),
        schemas.LISTING: np.concatenate([p.listings for p in parts]).tolist(),
        schemas.LABEL: np.concatenate([p.labels for p in parts]).tolist(),
        schemas.VECTOR: vectors.to_arrow(np.concatenate([p.vectors for p in parts])),
    }, schema=schemas.ann_vectors(index.dim))


def load_retrieval_index(dir_uri: str, epsilon: float = 0.1) -> CategoryIndex:
    """Read an index written by `save_retrieval_index`.

    Trust: the ANN files are Python pickles, and unpickling runs code. Each file's SHA-256 is checked
    against catalog.parquet before it is unpickled, which catches partial, stale or swapped files, but
    the catalog sits in the same directory: load indexes only from storage as trusted as the run root.
    Raises IndexFileError naming the file when one is missing or does not match, SchemaError when a table
    is not of the data contract.
    """
    fs, path = io.url_to_fs(dir_uri)
    catalog = _read(fs, posixpath.join(path, CATALOG_FILE), dir_uri, "ann_catalog").to_pylist()
    table = _read(fs, posixpath.join(path, VECTORS_FILE), dir_uri, "ann_vectors")
    unit = vectors.from_arrow(table[schemas.VECTOR])
    columns = {c: np.asarray(table[c].to_pylist(), dtype=object)
               for c in (schemas.CATEGORY, schemas.IMAGE_ID, schemas.LISTING, schemas.LABEL)}
    parts, start = {}, 0
    for entry in catalog:
        rows = slice(start, start + entry[schemas.SIZE])
        start += entry[schemas.SIZE]
        if not (columns[schemas.CATEGORY][rows] == entry[schemas.CATEGORY]).all():
            raise IndexFileError(f"{dir_uri}: {VECTORS_FILE} rows do not match {CATALOG_FILE}; rebuild the index")
        part = CategoryPart(columns[schemas.IMAGE_ID][rows], columns[schemas.LABEL][rows],
                            columns[schemas.LISTING][rows], np.ascontiguousarray(unit[rows]))
        if entry[schemas.ANN_FILE]:
            part.ann = _load_ann(fs, posixpath.join(path, entry[schemas.ANN_FILE]), entry[schemas.ANN_SHA256],
                                 dir_uri)
        parts[entry[schemas.CATEGORY]] = part
    return CategoryIndex(parts, epsilon)


def _read(fs: Any, path: str, dir_uri: str, table: str) -> pa.Table:
    if not fs.exists(path):
        raise IndexFileError(f"{dir_uri}: missing {posixpath.basename(path)}; rebuild the index with jobs.index")
    try:
        data = pq.read_table(path, filesystem=fs)
    except pa.ArrowInvalid as err:
        raise IndexFileError(f"{io.join(dir_uri, posixpath.basename(path))} is not a readable Parquet file "
                             f"({err}); rebuild the index with jobs.index") from err
    schemas.validate(data.schema, schemas.STAGES[NAME].expected(table, data.schema), path)
    return data


def _load_ann(fs: Any, path: str, sha256: str | None, dir_uri: str) -> Any:
    if not fs.exists(path):
        raise IndexFileError(f"{dir_uri}: missing {posixpath.basename(path)}; rebuild the index with jobs.index")
    data = fs.cat_file(path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IndexFileError(f"{io.join(dir_uri, posixpath.basename(path))} does not match the SHA-256 in "
                             f"{CATALOG_FILE}; refusing to unpickle it. Rebuild the index with jobs.index")
    import pynndescent  # noqa: F401 - loaded (numba cache set by gatrep/__init__) before unpickling needs it

    return pickle.loads(data)  # noqa: S301 - trusted, checksummed file (see load_retrieval_index)


def check_files(stage_uri: str) -> None:
    """Refuse, before any work starts, a published index whose files are missing (IndexFileError) or whose
    tables are not of the data contract (SchemaError, StageError); reads only file listings and footers."""
    manifest = io.read_manifest(stage_uri, NAME)
    fs, _ = io.url_to_fs(stage_uri)
    missing = [f for f in manifest["files"] if not fs.exists(io.url_to_fs(io.join(stage_uri, f))[1])]
    if missing:
        raise IndexFileError(f"{stage_uri}: missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
                             + "; rebuild the index with jobs.index")
    for table in manifest.get("tables", {}):
        io.check_table_schemas(stage_uri, manifest, table)


def load_searcher(stage_uri: str, epsilon: float = 0.1) -> Searcher:
    """The Searcher of a published index stage: category representatives plus the retrieval index.
    Raises StageError when the stage is absent or incomplete."""
    table, manifest = io.read_table(stage_uri, NAME, "categories")
    reps = vectors.from_arrow(table[schemas.REPRESENTATIVE])
    dim = reps.shape[1]
    central = [np.asarray(c, dtype=np.float32).reshape(-1, dim) for c in table[schemas.CENTRAL_VECTORS].to_pylist()]
    def retrieval_index(catalog: str) -> CategoryIndex:
        return load_retrieval_index(posixpath.dirname(io.table_uris(stage_uri, manifest, catalog)[0]), epsilon)

    names = np.asarray(table[schemas.CATEGORY].to_pylist(), dtype=object)
    style = retrieval_index("style_ann_catalog") if "style_ann_catalog" in manifest.get("tables", {}) else None
    return Searcher(names, reps, central, np.asarray(table[schemas.LABEL].to_pylist(), dtype=object),
                    retrieval_index("ann_catalog"), style)
