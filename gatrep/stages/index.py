"""The index stage: `latents` (or `embeddings`, for the baselines) -> listing/category representatives (the learned
category nodes of a class-nodes model), listing similarity and per-category retrieval indexes; also the reader of a
published index."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import posixpath
from collections import Counter
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


def class_node_categories(source: Source, cats: Categories, nodes: CategoryNodes) -> Categories:
    """`cats` represented by the learned category-node embeddings instead, each with its image nearest to the
    embedding as the representative image. Refuses (io.StageError) a category the model has no node for."""
    position = {str(name): c for c, name in enumerate(nodes.names)}
    missing = [str(name) for name in cats.names if str(name) not in position]
    if missing or nodes.embeddings is None:
        raise io.StageError(f"the class-nodes model has no category node for {', '.join(missing[:5]) or 'any category'}"
                            "; retrain it (python -m jobs.train --objective class-nodes) and rebuild the latents")
    embeddings = nodes.embeddings[[position[str(name)] for name in cats.names]]
    rows = represent.nearest_members(source.vectors, cats.of_image, embeddings)
    return dataclasses.replace(cats, vectors=embeddings.astype(np.float32), listing=source.listings[rows],
                               image_id=source.image_ids[rows])


def assign_categories(cfg: IndexConfig, source: Source, reps: represent.GroupRepresentatives) -> Categories:
    """Categories and their representatives: given ones are represented over their images by --method;
    discovered ones by their most central listing representative (III-A2)."""
    if cfg.categories == "given":
        of_listing = given_listing_categories(source, reps.groups)
    else:
        of_listing = discovered_listing_categories(cfg, reps.vectors)
    lookup = dict(zip(reps.groups, of_listing, strict=True))
    of_image = np.asarray([lookup[listing] for listing in source.listings], dtype=object)
    counts = Counter(of_listing)
    if cfg.categories == "given":
        cat = represent.represent_groups(source.vectors, of_image, cfg.method, 1, **degree_options(cfg))
        rep_rows = cat.index
        rep_listing, rep_image = source.listings[rep_rows], source.image_ids[rep_rows]
    else:
        cat = represent.represent_groups(reps.vectors, of_listing, "most_central", 1)
        rep_listing = reps.groups[cat.index]
        rep_image = source.image_ids[reps.index[cat.index]]
    listings = np.asarray([counts[name] for name in cat.groups], dtype=np.int64)
    return Categories(of_listing, of_image, cat.groups, cat.vectors, rep_listing, rep_image, listings)


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


def categories_table(cfg: IndexConfig, source: Source, cats: Categories) -> pa.Table:
    """categories.parquet: representative, representative listing and the m extra representatives (--central)."""
    central = represent.central_images(source.vectors, cats.of_image, cfg.top_m, cfg.central, cfg.seed)
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


def run(cfg: IndexConfig) -> dict[str, Any]:
    """Build and publish the index stage; returns its manifest (the existing one when already up to date)."""
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
        with io.timed(timings, "listings"):
            reps = represent.represent_groups(source.vectors, source.listings, cfg.method, cfg.top_k,
                                              **degree_options(cfg))
        with io.timed(timings, "categories"):
            cats = assign_categories(cfg, source, reps)
            nodes = category_nodes(cfg, source_manifest)
            if nodes is not None:
                cats = class_node_categories(source, cats, nodes)
        run_dir = io.new_run_dir(stage_uri)
        tables = {"listings": listings_table(source, reps, cats), "categories": categories_table(cfg, source, cats)}
        with io.timed(timings, "similarity"):
            tables["listing_similarity"], tables["merge_suggestions"] = similarity_tables(cfg, reps, cats)
        files = {name: io.write_table(table, run_dir, f"{name}.parquet") for name, table in tables.items()}
        with io.timed(timings, "ann"):
            index = CategoryIndex.build(source.vectors, source.image_ids, cats.of_image, source.categories,
                                        source.listings, cfg.ann_min_size, cfg.ann_neighbours, cfg.seed)
            ann_files = save_retrieval_index(index, io.join(run_dir, "ann"))
        files["ann_vectors"], files["ann_catalog"] = ann_files[0], ann_files[-1]
        pickles = ann_files[1:-1]
        style = read_style(cfg, source_uri, source)
        if style is not None:
            with io.timed(timings, "style_ann"):
                # Built over the same rows and categories, so each category's rows line up with `index`'s.
                style_index = CategoryIndex.build(style, source.image_ids, cats.of_image, source.categories,
                                                  source.listings, cfg.ann_min_size, cfg.ann_neighbours, cfg.seed)
                style_files = save_retrieval_index(style_index, io.join(run_dir, "style-ann"))
            files["style_ann_vectors"], files["style_ann_catalog"] = style_files[0], style_files[-1]
            pickles += style_files[1:-1]
        stage_path = io.url_to_fs(stage_uri)[1]
        relative = {name: posixpath.relpath(io.url_to_fs(uri)[1], stage_path) for name, uri in files.items()}
        return io.publish(
            stage_uri, NAME, list(files.values()) + pickles, config.to_dict(cfg), upstream,
            tables=relative, rows=len(source.image_ids), skipped=source.skipped, listings=len(reps.groups),
            categories=len(cats.names), ann_categories=sum(p.ann is not None for p in index.parts.values()),
            category_representatives=("class-nodes" if nodes is not None else
                                      cfg.method if cfg.categories == "given" else "most_central"),
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
    catalog: dict[str, list[Any]] = {schemas.CATEGORY: [], schemas.SIZE: [], schemas.ANN_FILE: [],
                                     schemas.ANN_SHA256: []}
    fs, path = io.url_to_fs(dir_uri)
    for position, category in enumerate(index.categories):
        part = index.parts[category]
        name = digest = None
        if part.ann is not None:
            name = f"ann-{position:05d}.pkl"
            data = pickle.dumps(part.ann, protocol=pickle.HIGHEST_PROTOCOL)
            digest = hashlib.sha256(data).hexdigest()
            fs.pipe_file(posixpath.join(path, name), data)
            written.append(io.join(dir_uri, name))
        for column, value in zip(catalog, (category, part.vectors.shape[0], name, digest), strict=True):
            catalog[column].append(value)
    written.append(io.write_table(pa.table(catalog, schema=schemas.ann_catalog()), dir_uri, CATALOG_FILE))
    return written


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
