"""The index stage: `latents` (or `embeddings`, for the baselines) -> listing/category representatives (the learned
category nodes of a class-nodes model), listing similarity and per-category retrieval indexes; also the reader of a
published index."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import posixpath
from collections.abc import Callable, Iterable, Iterator
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
# A retrieval index's vectors: one file per group of categories, named by the group's first category position and
# read in that order (`load_retrieval_index`), so that each task writes its own.
VECTORS_FILE = "vectors-{:05d}.parquet"
VECTORS_GLOB = "vectors-*.parquet"
CATALOG_FILE = "catalog.parquet"


class IndexFileError(UserError, RuntimeError):
    """An index directory whose files are missing, do not match its catalog, or do not fit the queries."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """A published stage whose vectors the tasks read: its URI and manifest, the vector column and its width."""

    uri: str
    manifest: dict[str, Any]
    column: str
    dim: int


@dataclasses.dataclass(frozen=True)
class Source:
    """The images to index, one per usable latent or embedding in the source stage's row order, without their
    vectors (each task reads its own, see `read_rows`): listing and input-category codes into sorted names (-1:
    no input category), the image ids (Arrow: compact), each image's row in `stage` (as io.take_rows numbers
    them), and how many rows were unusable."""

    listing: np.ndarray
    listing_names: np.ndarray
    category: np.ndarray
    category_names: np.ndarray
    image_ids: pa.ChunkedArray
    rows: np.ndarray
    stage: Stage
    skipped: int


@dataclasses.dataclass(frozen=True)
class Style:
    """Where the source images' style vectors lie: a stage and each image's row in it, in source order."""

    stage: Stage
    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class Categories:
    """Which category every listing (in sorted listing order) and every image belongs to: codes into `names`,
    sorted."""

    names: np.ndarray
    of_listing: np.ndarray
    of_image: np.ndarray


@dataclasses.dataclass(frozen=True)
class Listings:
    """Listing representatives (Remark 1), one row per listing in sorted name order: its representative vector,
    image and z-score, its size, and its top-k central images with their z-scores."""

    names: np.ndarray
    vectors: np.ndarray
    image_id: np.ndarray
    zscore: np.ndarray
    sizes: np.ndarray
    central_ids: list[list[str]]
    central_zscores: list[list[float]]

    @classmethod
    def concat(cls, parts: list[Listings]) -> Listings:
        """The parts' listings (each listing in one part) in sorted name order."""
        names = np.concatenate([p.names for p in parts])
        order = np.argsort(names, kind="stable")
        ids = [top for p in parts for top in p.central_ids]
        zscores = [top for p in parts for top in p.central_zscores]
        return cls(names[order], np.concatenate([p.vectors for p in parts])[order],
                   np.concatenate([p.image_id for p in parts])[order],
                   np.concatenate([p.zscore for p in parts])[order], np.concatenate([p.sizes for p in parts])[order],
                   [ids[i] for i in order], [zscores[i] for i in order])


# ----------------------------------------------------------------------------------------------
# Reading: the driver reads what it plans with; each task reads its own images' vectors


def codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(each value's int32 code into the sorted distinct values, -1 for null; those values, as an object array)."""
    names = np.sort(pc.unique(column).drop_null().to_numpy(zero_copy_only=False))
    found = pc.index_in(column, value_set=pa.array(names.tolist(), column.type))
    return pc.fill_null(found, -1).to_numpy().astype(np.int32), names


def read_source(cfg: IndexConfig, stage_uri: str) -> Source:
    """The usable rows of the source stage, without their vectors. Embeddings keep status-ok rows; a row needs a
    vector and a listing or a category (then that is its listing, as in Approach II); the others are counted in
    `skipped`. Refuses (io.StageError) a stage without a usable row."""
    column = schemas.LATENT if cfg.source == schemas.LATENTS else schemas.EMBEDDING
    wanted = [schemas.IMAGE_ID, schemas.LISTING, schemas.CATEGORY]
    if cfg.source == schemas.EMBEDDINGS:
        wanted.append(schemas.STATUS)
    table, manifest = io.read_table(stage_uri, cfg.source, columns=wanted)
    listing = pc.coalesce(table[schemas.LISTING], table[schemas.CATEGORY])
    usable = pc.and_(pa.chunked_array([io.valid_rows(stage_uri, manifest, column)]),
                     pc.and_(pc.is_valid(table[schemas.IMAGE_ID]), pc.is_valid(listing)))
    if cfg.source == schemas.EMBEDDINGS:
        usable = pc.and_(usable, pc.equal(table[schemas.STATUS], schemas.OK))
    keep = pc.fill_null(usable, False)
    rows = np.flatnonzero(keep.to_numpy())
    if rows.size == 0:
        raise io.StageError(f"{stage_uri}: no usable rows out of {table.num_rows} (need a vector and a listing or "
                            "category)")
    dim = schemas.vector_dim(io.table_schema(stage_uri, manifest), column)
    return Source(*codes(listing.filter(keep)), *codes(table[schemas.CATEGORY].filter(keep)),
                  table[schemas.IMAGE_ID].filter(keep), rows, Stage(stage_uri, manifest, column, dim),
                  skipped=table.num_rows - rows.size)


def read_style(cfg: IndexConfig, source_uri: str, source: Source) -> Style | None:
    """Where the style vectors of the source's images lie, in its row order, in the embeddings stage it comes from
    (for latents, the one their graph was built from); None when that stage was embedded without --style, or
    when latents record no graph (made by hand: no way back to their images). Refuses (io.StageError) an indexed
    image without a style vector."""
    uri, manifest = source_uri, io.read_manifest(source_uri, cfg.source)
    if cfg.source == schemas.LATENTS:
        if schemas.GRAPH not in manifest.get("upstream", {}):
            return None
        _, graph_manifest = io.upstream_stage(cfg.run, manifest, schemas.GRAPH, schemas.GRAPH)
        uri, manifest = io.upstream_stage(cfg.run, graph_manifest, schemas.EMBEDDINGS, schemas.EMBEDDINGS)
    schema = io.table_schema(uri, manifest)
    if schemas.STYLE not in schema.names:
        return None
    table, manifest = io.read_table(uri, schemas.EMBEDDINGS, columns=[schemas.IMAGE_ID, schemas.STATUS])
    ok = pc.fill_null(pc.and_(pc.equal(table[schemas.STATUS], schemas.OK),
                              pa.chunked_array([io.valid_rows(uri, manifest, schemas.STYLE)])), False)
    found = pc.index_in(source.image_ids, value_set=table[schemas.IMAGE_ID].filter(ok).combine_chunks())
    if found.null_count:
        missing = source.image_ids.filter(found.is_null()).to_pylist()
        raise io.StageError(f"{uri} has no style vector for {len(missing)} indexed images, e.g. {missing[:3]}; "
                            "rebuild the stages after it")
    rows = np.flatnonzero(ok.to_numpy())[found.to_numpy()]
    return Style(Stage(uri, manifest, schemas.STYLE, schemas.vector_dim(schema, schemas.STYLE)), rows)


def read_rows(stage: Stage, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """`columns` at the stage's rows `rows` (numbered as io.take_rows numbers them), in that order; only the row
    groups that hold one of them are read. A task's read of its own images."""
    unique, back = np.unique(rows, return_inverse=True)
    return io.take_rows(stage.uri, stage.manifest, unique, columns).take(pa.array(back))


# ----------------------------------------------------------------------------------------------
# Representatives and categories


def degree_options(cfg: IndexConfig) -> dict[str, Any]:
    """The keyword arguments of represent.degree, when the method is degree."""
    if cfg.method != "degree":
        return {}
    return {"threshold": cfg.degree_threshold, "exact_max": cfg.exact_max, "n_neighbors": cfg.ann_neighbours,
            "seed": cfg.seed}


def given_categories(source: Source) -> Categories:
    """The input categories, each listing's that of its images; refuses (io.InputError) a listing with none or with
    several, naming the first in sorted order."""
    width = len(source.category_names) + 1
    pairs = np.unique(source.listing.astype(np.int64) * width + source.category + 1)
    listing, category = np.divmod(pairs, width)
    category -= 1
    several = np.bincount(listing, minlength=len(source.listing_names)) > 1
    bad = np.flatnonzero(several | np.isin(np.arange(several.size), listing[category < 0]))
    if bad.size:
        found = category[listing == bad[0]]
        what = ("no category" if (found < 0).any() else
                f"several categories ({', '.join(source.category_names[found])})")
        raise io.InputError(f"listing {source.listing_names[bad[0]]!r} has {what}; give each listing one category "
                            "or use --categories threshold|kmeans|dbscan")
    return Categories(source.category_names, category, source.category)


def discovered_categories(cfg: IndexConfig, source: Source, listings: Listings) -> Categories:
    """Categories discovered among the listing representatives (Case 1 of III-A2), named c0000, c0001, ...
    Refuses (ConfigError) more K-Means clusters than there are listings."""
    if cfg.categories == "kmeans" and cfg.n_clusters > len(listings.names):
        raise config.ConfigError(f"--n-clusters {cfg.n_clusters} is more than the {len(listings.names)} listings")
    labels = represent.discover_categories(
        listings.vectors, cfg.categories, threshold=cfg.category_threshold, n_clusters=cfg.n_clusters,
        eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples, exact_max=cfg.exact_max,
        n_neighbors=cfg.ann_neighbours, seed=cfg.seed)
    names, of_listing = np.unique([f"c{label:04d}" for label in labels], return_inverse=True)
    return Categories(names.astype(object), of_listing, of_listing[source.listing])


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


@dataclasses.dataclass(frozen=True)
class Representatives:
    """Each category's representative vector, listing and image, in sorted category order."""

    vectors: np.ndarray
    listing: np.ndarray
    image_id: np.ndarray


def discovered_representatives(listings: Listings, cats: Categories) -> Representatives:
    """Each discovered category's most central listing representative (III-A2). Small: one vector per listing."""
    cat = represent.represent_groups(listings.vectors, cats.of_listing, "most_central", 1)
    return Representatives(cat.vectors, listings.names[cat.index], listings.image_id[cat.index])


# ----------------------------------------------------------------------------------------------
# Per-group work: Ray tasks, one per category or per batch of small ones (in process for a small index). Each task
# reads its own images from the source stage, so with tasks the driver never holds their vectors.

# Per-group work (listing and category representatives, central images, retrieval indexes) runs in Ray tasks from
# this many indexed images up, and in this process below. The stage then starts no Ray instance for a small index:
# starting one (seconds, a worker process per CPU, their imports) costs more than the work; and each worker that
# builds a pynndescent index pays numba's compilation once (about a minute on a busy 2-CPU machine). Both run the
# same functions over the same groups, so results are the same (tests/test_index_tasks.py); bench/index.py
# measures both.
TASK_MIN_ROWS = 50_000
# Images per task: consecutive small categories (or listings) are batched until a group holds this many, so
# 10,000 tiny categories make a few tasks, not 10,000; a category this large is a task of its own.
GROUP_ROWS = 20_000
# Tasks in flight at once, per CPU: bounds the driver's pending work.
IN_FLIGHT_PER_CPU = 2


@dataclasses.dataclass(frozen=True)
class CategoryWork:
    """What every group's task computes and where it reads and writes: the source stage and the style vectors'
    (None: none), the listing representatives' `listing_method` (None: computed before, for discovered
    categories), the given categories' representative `method` (None: the driver chooses them, for discovered
    categories), the index config's settings, and the directories each retrieval index's files go to
    (`style_dir`: None without style vectors)."""

    source: Stage
    style: Stage | None
    listing_method: str | None
    top_k: int
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
    files), `names`, `sizes`, and their images' rows in the source stage category after category, in source
    order inside each (with their rows in the style vectors' stage, and each category's class-node embedding as
    its representative when the model has them)."""

    positions: np.ndarray
    names: np.ndarray
    sizes: np.ndarray
    rows: np.ndarray
    style_rows: np.ndarray | None = None
    targets: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """What a task returns for its group. Its listings' representatives (None when computed before), and per
    category: the representative vector, listing and image (None for discovered categories), the central images'
    ids and vectors, and the retrieval index's pickle (name, sha256), None for exact search, for the vectors and
    the style vectors (empty without); the URIs of the group's vectors files (the style one: None without)."""

    positions: np.ndarray
    listings: Listings | None
    rep_vectors: np.ndarray | None
    rep_listing: np.ndarray | None
    rep_image_id: np.ndarray | None
    central_ids: list[list[str]]
    central_vectors: list[np.ndarray]
    ann: list[tuple[str, str] | None]
    style_ann: list[tuple[str, str] | None]
    vectors_file: str
    style_vectors_file: str | None


def plan_groups(sizes: np.ndarray, group_rows: int = GROUP_ROWS) -> list[np.ndarray]:
    """Category (or listing) positions (0..C-1, in order) batched into groups of consecutive ones: a group closes
    once it holds `group_rows` images, and a category that large is a group of its own. Every position appears
    once."""
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


def read_group(stage: Stage, rows: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """(image id, listing (the category where none) and input category of the images at `rows`; their vectors)."""
    table = read_rows(stage, rows, [schemas.IMAGE_ID, schemas.LISTING, schemas.CATEGORY, stage.column])
    listing = pc.coalesce(table[schemas.LISTING], table[schemas.CATEGORY])
    table = table.set_column(table.schema.get_field_index(schemas.LISTING), schemas.LISTING, listing)
    return table.drop([stage.column]), vectors.from_arrow(table[stage.column])


def listing_representatives(table: pa.Table, vecs: np.ndarray, work: CategoryWork) -> Listings:
    """The representatives of the listings of `table` (from `read_group`), whole: no listing may lie partly
    outside it."""
    assert work.listing_method is not None, "listing representatives without a method"
    image_ids = np.asarray(table[schemas.IMAGE_ID].to_pylist(), dtype=object)
    reps = represent.represent_groups(vecs, np.asarray(table[schemas.LISTING].to_pylist(), dtype=object),
                                      work.listing_method, work.top_k, **work.degree)
    return Listings(reps.groups, reps.vectors, image_ids[reps.index], reps.zscore, reps.sizes,
                    [image_ids[top].tolist() for top in reps.top],
                    [reps.zscores[top].astype(np.float32).tolist() for top in reps.top])


def listing_work(rows: np.ndarray, work: CategoryWork) -> Listings:
    """The representatives of the listings whose images are at `rows` of the source stage (all of their images):
    the first round of tasks for discovered categories, which need them before categories exist."""
    return listing_representatives(*read_group(work.source, rows), work)


def category_work(group: CategoryGroup, work: CategoryWork) -> GroupResult:
    """Each category of `group`, from its images read here: its listings' representatives (unless computed
    before), its representative (by `work.method`, or its image nearest to the class-node embedding), its top-m
    central images, its retrieval index's vectors file and, for a category of at least `ann_min_size` images, its
    pynndescent pickle. The same functions, over each category's rows, as for the whole source at once: results
    equal theirs. A Ray task, or called in process for a small index."""
    table, vecs = read_group(work.source, group.rows)
    labels = np.repeat(group.names, group.sizes)
    listings = None if work.listing_method is None else listing_representatives(table, vecs, work)
    rep_vectors, rep_rows = group.targets, None
    if group.targets is not None:
        rep_rows = represent.nearest_members(vecs, labels, group.targets)
    elif work.method is not None:
        reps = represent.represent_groups(vecs, labels, work.method, 1, **work.degree)
        rep_vectors, rep_rows = reps.vectors, reps.index
    central = represent.central_images(vecs, labels, work.top_m, work.central, work.seed)
    ann = _write_group_anns(vecs, labels, group, work, work.ann_dir)
    vectors_file = _write_vectors(table, vecs, labels, group, work.ann_dir)
    style_ann, style_file = [], None
    if group.style_rows is not None and work.style is not None and work.style_dir is not None:
        style = vectors.from_arrow(read_rows(work.style, group.style_rows, [schemas.STYLE])[schemas.STYLE])
        style_ann = _write_group_anns(style, labels, group, work, work.style_dir)
        style_file = _write_vectors(table, style, labels, group, work.style_dir)
    image_ids, listing = (np.asarray(table[c].to_pylist(), dtype=object) for c in (schemas.IMAGE_ID, schemas.LISTING))
    return GroupResult(group.positions, listings, rep_vectors, None if rep_rows is None else listing[rep_rows],
                       None if rep_rows is None else image_ids[rep_rows], [image_ids[top].tolist() for top in central],
                       [vecs[top] for top in central], ann, style_ann, vectors_file, style_file)


def _write_group_anns(vecs: np.ndarray, labels: np.ndarray, group: CategoryGroup, work: CategoryWork,
                      dir_uri: str) -> list[tuple[str, str] | None]:
    # The categories stand in for the image ids, which the pickles do not hold (the vectors files do).
    index = CategoryIndex.build(vecs, labels, labels, ann_min_size=work.ann_min_size,
                                n_neighbors=work.ann_neighbours, seed=work.seed)
    out: list[tuple[str, str] | None] = []
    for position, name in zip(group.positions, group.names, strict=True):
        ann = index.parts[str(name)].ann
        out.append(None if ann is None else _write_ann(ann, dir_uri, int(position))[:2])
    return out


def _write_vectors(table: pa.Table, vecs: np.ndarray, labels: np.ndarray, group: CategoryGroup, dir_uri: str) -> str:
    """The group's vectors file of a retrieval index (unit vectors, as `save_retrieval_index` writes them)."""
    return io.write_table(pa.table({
        schemas.CATEGORY: labels.tolist(), schemas.IMAGE_ID: table[schemas.IMAGE_ID],
        schemas.LISTING: table[schemas.LISTING], schemas.LABEL: table[schemas.CATEGORY],
        schemas.VECTOR: vectors.to_arrow(vectors.normalise(vecs)),
    }, schema=schemas.ann_vectors(vecs.shape[1])), dir_uri, VECTORS_FILE.format(int(group.positions[0])))


def run_groups(work_of: Callable[[Any, CategoryWork], Any], groups: Iterable[Any], work: CategoryWork,
               tasks: bool) -> Iterator[Any]:
    """`work_of` each group: in this process one after the other, or (`tasks`) as Ray tasks, a few per CPU at a
    time; results in completion order."""
    if not tasks:
        yield from (work_of(group, work) for group in groups)
        return
    import ray

    from gatrep.stages import init_ray

    init_ray()
    task = ray.remote(work_of)
    work_ref = ray.put(work)
    limit = max(2, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    for group in groups:
        pending.append(task.remote(group, work_ref))
        while len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def discovered_listings(source: Source, work: CategoryWork, tasks: bool) -> Listings:
    """Every listing's representative, from tasks over groups of whole listings (see `listing_work`)."""
    members = vectors.group_rows(source.listing)[1]
    plan = plan_groups(np.array([m.size for m in members], dtype=np.int64), GROUP_ROWS)
    groups = (source.rows[np.concatenate([members[p] for p in positions])] for positions in plan)
    return Listings.concat(list(run_groups(listing_work, groups, work, tasks)))


@dataclasses.dataclass
class PerCategory:
    """Every category's results, in sorted category order (see GroupResult; `reps`: None for discovered
    categories), their listings' representatives, and how many groups the work ran in."""

    listings: list[Listings]
    reps: Representatives | None
    central_ids: list[list[str]]
    central_vectors: list[np.ndarray]
    ann: list[tuple[str, str] | None]
    style_ann: list[tuple[str, str] | None]
    groups: int


def per_category(source: Source, style: Style | None, cats: Categories, targets: np.ndarray | None,
                 work: CategoryWork, tasks: bool) -> tuple[PerCategory, dict[str, str | list[str]], list[str]]:
    """Run the per-category work over `cats` (see `run_groups`), then write the retrieval indexes' catalogs.
    Returns the results, the tables written ({ann,style_ann}_{vectors,catalog}: URI, or the URIs of the vectors
    files in category order) and the pickles' URIs."""
    members = vectors.group_rows(cats.of_image)[1]
    sizes = np.array([m.size for m in members], dtype=np.int64)
    plan = plan_groups(sizes, GROUP_ROWS)

    def groups() -> Iterator[CategoryGroup]:
        for positions in plan:
            order = np.concatenate([members[p] for p in positions])
            yield CategoryGroup(positions, cats.names[positions], sizes[positions], source.rows[order],
                                None if style is None else style.rows[order],
                                None if targets is None else targets[positions])

    given = work.method is not None or targets is not None
    n = len(cats.names)
    reps = Representatives(np.empty((n, source.stage.dim), np.float32), np.empty(n, object), np.empty(n, object))
    out = PerCategory([], reps if given else None, [[]] * n, [np.empty(0, np.float32)] * n, [None] * n, [None] * n,
                      len(plan))
    dirs = {"ann": work.ann_dir} | ({} if work.style_dir is None else {"style_ann": work.style_dir})
    for dir_uri in dirs.values():
        fs, path = io.url_to_fs(dir_uri)
        fs.makedirs(path, exist_ok=True)
    files: dict[str, list[str]] = {key: [""] * len(plan) for key in dirs}
    group_of = {int(positions[0]): g for g, positions in enumerate(plan)}
    for result in run_groups(category_work, groups(), work, tasks):
        _merge(out, result)
        files["ann"][group_of[int(result.positions[0])]] = result.vectors_file
        if result.style_vectors_file is not None:
            files["style_ann"][group_of[int(result.positions[0])]] = result.style_vectors_file
    tables: dict[str, str | list[str]] = {}
    pickles = []
    for key, dir_uri in dirs.items():
        anns = out.ann if key == "ann" else out.style_ann
        tables[f"{key}_vectors"] = files[key]
        tables[f"{key}_catalog"] = _write_catalog(cats.names, sizes, anns, dir_uri)
        pickles += [io.join(dir_uri, ann[0]) for ann in anns if ann is not None]
    return out, tables, pickles


def _merge(out: PerCategory, result: GroupResult) -> None:
    """Copy a group's results into `out`."""
    if result.listings is not None:
        out.listings.append(result.listings)
    for i, position in enumerate(result.positions):
        out.central_ids[position] = result.central_ids[i]
        out.central_vectors[position] = result.central_vectors[i]
        out.ann[position] = result.ann[i]
        if result.style_ann:
            out.style_ann[position] = result.style_ann[i]
    if out.reps is not None:
        assert result.rep_vectors is not None and result.rep_image_id is not None, "a group without representatives"
        out.reps.vectors[result.positions] = result.rep_vectors
        out.reps.listing[result.positions] = result.rep_listing
        out.reps.image_id[result.positions] = result.rep_image_id


def _write_catalog(names: np.ndarray, sizes: np.ndarray, anns: list[tuple[str, str] | None], dir_uri: str) -> str:
    return io.write_table(pa.table({
        schemas.CATEGORY: [str(name) for name in names], schemas.SIZE: sizes,
        schemas.ANN_FILE: [None if a is None else a[0] for a in anns],
        schemas.ANN_SHA256: [None if a is None else a[1] for a in anns],
    }, schema=schemas.ann_catalog()), dir_uri, CATALOG_FILE)


# ----------------------------------------------------------------------------------------------
# Tables


def listings_table(listings: Listings, cats: Categories) -> pa.Table:
    """listings.parquet: one row per listing (Remark 1's z-score and top-k central images)."""
    return pa.table({
        schemas.LISTING: listings.names.tolist(),
        schemas.CATEGORY: cats.names[cats.of_listing].tolist(),
        schemas.REPRESENTATIVE: vectors.to_arrow(listings.vectors),
        schemas.REPRESENTATIVE_IMAGE_ID: listings.image_id.tolist(),
        schemas.ZSCORE: listings.zscore.astype(np.float32),
        schemas.SIZE: listings.sizes,
        schemas.CENTRAL_IMAGE_IDS: listings.central_ids,
        schemas.CENTRAL_ZSCORES: listings.central_zscores,
    }, schema=schemas.listings(listings.vectors.shape[1]))


def majority_labels(source: Source, cats: Categories) -> list[str | None]:
    """The input category most images of each category carry (ties: alphabetical), None when unlabelled."""
    labelled = source.category >= 0
    width = len(source.category_names)
    pairs, counts = np.unique(cats.of_image[labelled].astype(np.int64) * width + source.category[labelled],
                              return_counts=True)
    category, label = np.divmod(pairs, width)
    order = np.lexsort((label, -counts, category))  # per category: the most images first, then the first name
    first = order[np.r_[True, category[order][1:] != category[order][:-1]]] if order.size else order
    out: list[str | None] = [None] * len(cats.names)
    for c, name in zip(category[first], source.category_names[label[first]], strict=True):
        out[c] = name
    return out


def categories_table(source: Source, cats: Categories, reps: Representatives, done: PerCategory) -> pa.Table:
    """categories.parquet: representative, representative listing and the m extra representatives (the central
    images, per category)."""
    dim = source.stage.dim
    return pa.table({
        schemas.CATEGORY: cats.names.tolist(),
        schemas.REPRESENTATIVE: vectors.to_arrow(reps.vectors),
        schemas.REPRESENTATIVE_LISTING: reps.listing.tolist(),
        schemas.REPRESENTATIVE_IMAGE_ID: reps.image_id.tolist(),
        schemas.LABEL: majority_labels(source, cats),
        schemas.LISTINGS: np.bincount(cats.of_listing, minlength=len(cats.names)),
        schemas.SIZE: np.bincount(cats.of_image, minlength=len(cats.names)),
        schemas.CENTRAL_IMAGE_IDS: done.central_ids,
        schemas.CENTRAL_VECTORS: pa.array([top.tolist() for top in done.central_vectors],
                                          pa.list_(schemas.vector_type(dim))),
    }, schema=schemas.categories(dim))


def similarity_tables(cfg: IndexConfig, listings: Listings, cats: Categories) -> tuple[pa.Table, pa.Table]:
    """listing_similarity.parquet and merge_suggestions.parquet (Experiment IV-A2)."""
    a, b, sims = represent.listing_pairs(listings.vectors, cfg.similarity_max_listings, cfg.similarity_neighbours,
                                         cfg.exact_max, cfg.seed)
    names, of_listing = listings.names, cats.names[cats.of_listing]
    pairs = pa.table({schemas.LISTING_A: names[a].tolist(), schemas.LISTING_B: names[b].tolist(),
                      schemas.SIMILARITY: sims.astype(np.float32)}, schema=schemas.listing_similarity())
    ma, mb, msims = represent.merge_suggestions(a, b, sims, cfg.merge_threshold)
    merges = pa.table({schemas.LISTING_A: names[ma].tolist(), schemas.LISTING_B: names[mb].tolist(),
                       schemas.SIMILARITY: msims.astype(np.float32), schemas.CATEGORY_A: of_listing[ma].tolist(),
                       schemas.CATEGORY_B: of_listing[mb].tolist()}, schema=schemas.merge_suggestions())
    return pairs, merges


# ----------------------------------------------------------------------------------------------
# The job


def category_work_of(cfg: IndexConfig, source: Source, style: Style | None, class_nodes: bool,
                     run_dir: str) -> CategoryWork:
    """The tasks' CategoryWork, the retrieval indexes' directories under `run_dir`."""
    return CategoryWork(source.stage, None if style is None else style.stage, cfg.method, cfg.top_k,
                        cfg.method if cfg.categories == "given" and not class_nodes else None, degree_options(cfg),
                        cfg.top_m, cfg.central, cfg.seed, cfg.ann_min_size, cfg.ann_neighbours,
                        io.join(run_dir, "ann"), None if style is None else io.join(run_dir, "style-ann"))


def run(cfg: IndexConfig, tasks: bool | None = None) -> dict[str, Any]:
    """Build and publish the index stage; returns its manifest (the existing one when already up to date). The
    per-group work runs in Ray tasks when `tasks`, in process when not; None: tasks from TASK_MIN_ROWS images.
    Given categories take one round of tasks (listings lie inside categories); discovered ones two: the listing
    representatives, then, once the driver has discovered the categories among them, the categories."""
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
        tasks = len(source.rows) >= TASK_MIN_ROWS if tasks is None else tasks
        nodes = category_nodes(cfg, source_manifest)
        run_dir = io.new_run_dir(stage_uri)
        work = category_work_of(cfg, source, style, nodes is not None, run_dir)
        listings = None
        if cfg.categories != "given":
            with io.timed(timings, "listings"):
                listings = discovered_listings(source, work, tasks)
            work = dataclasses.replace(work, listing_method=None)
        with io.timed(timings, "categories"):
            cats = given_categories(source) if listings is None else discovered_categories(cfg, source, listings)
            targets = None if nodes is None else class_node_targets(cats.names, nodes)
        with io.timed(timings, "per_category"):
            done, files, pickles = per_category(source, style, cats, targets, work, tasks)
        listings = listings or Listings.concat(done.listings)
        reps = done.reps or discovered_representatives(listings, cats)
        tables = {"listings": listings_table(listings, cats), "categories": categories_table(source, cats, reps, done)}
        with io.timed(timings, "similarity"):
            tables["listing_similarity"], tables["merge_suggestions"] = similarity_tables(cfg, listings, cats)
        files |= {name: io.write_table(table, run_dir, f"{name}.parquet") for name, table in tables.items()}
        return io.publish(
            stage_uri, NAME, [*_flat(files.values()), *pickles], config.to_dict(cfg), upstream,
            tables=_relative(stage_uri, files), rows=len(source.rows), skipped=source.skipped,
            listings=len(listings.names), categories=len(cats.names),
            ann_categories=sum(a is not None for a in done.ann),
            category_representatives=("class-nodes" if nodes is not None else
                                      cfg.method if cfg.categories == "given" else "most_central"),
            category_groups=done.groups, category_tasks=tasks, merge_suggestions=tables["merge_suggestions"].num_rows,
            dim=source.stage.dim, style_dim=0 if style is None else style.stage.dim, timings=timings)


def _flat(files: Iterable[str | list[str]]) -> list[str]:
    return [uri for entry in files for uri in ([entry] if isinstance(entry, str) else entry)]


def _relative(stage_uri: str, files: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    """The tables' files relative to the stage, as its manifest lists them (see io.table_uris)."""
    stage_path = io.url_to_fs(stage_uri)[1]

    def relative(uri: str) -> str:
        return posixpath.relpath(io.url_to_fs(uri)[1], stage_path)

    return {name: relative(uri) if isinstance(uri, str) else [relative(u) for u in uri] for name, uri in files.items()}


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
    """Write one vectors file (VECTORS_FILE of position 0: every category), catalog.parquet and one pynndescent
    pickle per ANN category into `dir_uri`; returns the URIs written, vectors first and catalog last."""
    written = [io.write_table(_vectors_table(index), dir_uri, VECTORS_FILE.format(0))]
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
    """Read an index written by `save_retrieval_index` or by the stage: its vectors files (one per group of
    categories) in the order of the category positions they are named after, checked against the catalog.

    Trust: the ANN files are Python pickles, and unpickling runs code. Each file's SHA-256 is checked
    against catalog.parquet before it is unpickled, which catches partial, stale or swapped files, but
    the catalog sits in the same directory: load indexes only from storage as trusted as the run root.
    Raises IndexFileError naming the file when one is missing or does not match, SchemaError when a table
    is not of the data contract.
    """
    fs, path = io.url_to_fs(dir_uri)
    catalog = _read(fs, posixpath.join(path, CATALOG_FILE), dir_uri, "ann_catalog").to_pylist()
    table = _read_vectors(fs, path, dir_uri)
    if table.num_rows != sum(entry[schemas.SIZE] for entry in catalog):
        raise IndexFileError(f"{dir_uri}: {VECTORS_GLOB} rows do not match {CATALOG_FILE}; rebuild the index")
    unit = vectors.from_arrow(table[schemas.VECTOR])
    columns = {c: np.asarray(table[c].to_pylist(), dtype=object)
               for c in (schemas.CATEGORY, schemas.IMAGE_ID, schemas.LISTING, schemas.LABEL)}
    parts, start = {}, 0
    for entry in catalog:
        rows = slice(start, start + entry[schemas.SIZE])
        start += entry[schemas.SIZE]
        if not (columns[schemas.CATEGORY][rows] == entry[schemas.CATEGORY]).all():
            raise IndexFileError(f"{dir_uri}: {VECTORS_GLOB} rows do not match {CATALOG_FILE}; rebuild the index")
        part = CategoryPart(columns[schemas.IMAGE_ID][rows], columns[schemas.LABEL][rows],
                            columns[schemas.LISTING][rows], np.ascontiguousarray(unit[rows]))
        if entry[schemas.ANN_FILE]:
            part.ann = _load_ann(fs, posixpath.join(path, entry[schemas.ANN_FILE]), entry[schemas.ANN_SHA256],
                                 dir_uri)
        parts[entry[schemas.CATEGORY]] = part
    return CategoryIndex(parts, epsilon)


def _read_vectors(fs: Any, path: str, dir_uri: str) -> pa.Table:
    """The vectors files of a retrieval index, in category order: by the position each file is named after (or the
    single vectors.parquet of an index published before the files were split per group)."""
    files = sorted(fs.glob(posixpath.join(path, VECTORS_GLOB)),
                   key=lambda name: int(posixpath.basename(name).removeprefix("vectors-").removesuffix(".parquet")))
    if not files and fs.exists(posixpath.join(path, "vectors.parquet")):
        files = [posixpath.join(path, "vectors.parquet")]
    if not files:
        raise IndexFileError(f"{dir_uri}: missing {VECTORS_GLOB}; rebuild the index with jobs.index")
    return pa.concat_tables([_read(fs, name, dir_uri, "ann_vectors") for name in files])


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
