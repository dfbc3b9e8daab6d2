"""`python -m jobs.index`: latents (or embeddings) -> listing/category representatives and per-category ANN indexes."""

from __future__ import annotations

import dataclasses
import posixpath
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gatrep import config, io, represent, schemas
from gatrep import index_schemas as ix
from gatrep.config import IndexConfig
from gatrep.query import CategoryIndex
from jobs import _cli


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


def vectors_of(table: pa.Table, column: str) -> np.ndarray:
    """A fixed_size_list column (no nulls) as a float32 [n, d] array."""
    dim = schemas.vector_dim(table.schema, column)
    flat = table[column].combine_chunks().flatten() if table.num_rows else pa.array([], pa.float32())
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def read_source(cfg: IndexConfig, stage_uri: str) -> Source:
    """The usable rows of the source stage. Embeddings keep status-ok rows; a row needs a listing or a
    category (then that is its listing, as in Approach II); the others are counted in `skipped`."""
    column = schemas.LATENT if cfg.source == "latents" else schemas.EMBEDDING
    wanted = [schemas.IMAGE_ID, schemas.LISTING, schemas.CATEGORY, column]
    if cfg.source == "embeddings":
        wanted.append(schemas.STATUS)
    table, _ = io.read_stage(stage_uri, cfg.source, columns=wanted)
    schemas.vector_dim(table.schema, column)
    total = table.num_rows
    usable = pc.and_(pc.is_valid(table[column]), pc.is_valid(table[schemas.IMAGE_ID]))
    if cfg.source == "embeddings":
        usable = pc.and_(usable, pc.equal(table[schemas.STATUS], schemas.OK))
    listing = pc.coalesce(table[schemas.LISTING], table[schemas.CATEGORY])
    table = table.set_column(table.schema.get_field_index(schemas.LISTING), schemas.LISTING, listing)
    table = table.filter(pc.and_(usable, pc.is_valid(table[schemas.LISTING])))
    if table.num_rows == 0:
        raise io.StageError(f"{stage_uri}: no usable rows out of {total} (need a vector and a listing or category)")
    image_ids, listings, categories = (np.asarray(table[c].to_pylist(), dtype=object) for c in wanted[:3])
    return Source(image_ids, listings, categories, vectors_of(table, column), skipped=total - table.num_rows)


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
            raise schemas.SchemaError(f"listing {listing!r} has {what}; give each listing one category or use "
                                      f"--categories threshold|kmeans|dbscan")
        out.append(next(iter(found)))
    return np.asarray(out, dtype=object)


def discovered_listing_categories(cfg: IndexConfig, listing_vectors: np.ndarray) -> np.ndarray:
    """A discovered category name (c0000, c0001, ...) for each listing (Case 1 of III-A2)."""
    labels = represent.discover_categories(
        listing_vectors, cfg.categories, threshold=cfg.category_threshold, n_clusters=cfg.n_clusters,
        eps=cfg.dbscan_eps, min_samples=cfg.dbscan_min_samples, exact_max=cfg.exact_max,
        n_neighbors=cfg.ann_neighbours, seed=cfg.seed)
    return np.asarray([f"c{label:04d}" for label in labels], dtype=object)


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


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] float32 -> fixed_size_list<float32>[d]."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])


def listings_table(source: Source, reps: represent.GroupRepresentatives, cats: Categories) -> pa.Table:
    """listings.parquet: one row per listing (Remark 1's z-score and top-k central images)."""
    return pa.table({
        ix.LISTING: reps.groups.tolist(),
        ix.CATEGORY: cats.of_listing.tolist(),
        ix.REPRESENTATIVE: vector_array(reps.vectors),
        ix.REPRESENTATIVE_IMAGE_ID: source.image_ids[reps.index].tolist(),
        ix.ZSCORE: reps.zscore.astype(np.float32),
        ix.SIZE: reps.sizes,
        ix.CENTRAL_IMAGE_IDS: [source.image_ids[top].tolist() for top in reps.top],
        ix.CENTRAL_ZSCORES: [reps.zscores[top].astype(np.float32).tolist() for top in reps.top],
    }, schema=ix.listings(reps.vectors.shape[1]))


def majority_labels(source: Source, cats: Categories) -> list[str | None]:
    """The input category most images of each category carry (ties: alphabetical), None when unlabelled."""
    votes: dict[str, Counter] = {name: Counter() for name in cats.names}
    for category, label in zip(cats.of_image, source.categories, strict=True):
        if label is not None:
            votes[category][label] += 1
    return [min(v, key=lambda label: (-v[label], label)) if v else None for v in votes.values()]


def categories_table(cfg: IndexConfig, source: Source, cats: Categories) -> pa.Table:
    """categories.parquet: representative, representative listing and the top-m most central images."""
    central = represent.represent_groups(source.vectors, cats.of_image, "most_central", cfg.top_m)
    dim = source.vectors.shape[1]
    return pa.table({
        ix.CATEGORY: cats.names.tolist(),
        ix.REPRESENTATIVE: vector_array(cats.vectors),
        ix.REPRESENTATIVE_LISTING: cats.listing.tolist(),
        ix.REPRESENTATIVE_IMAGE_ID: cats.image_id.tolist(),
        ix.LABEL: majority_labels(source, cats),
        ix.LISTINGS: cats.listings,
        ix.SIZE: central.sizes,
        ix.CENTRAL_IMAGE_IDS: [source.image_ids[top].tolist() for top in central.top],
        ix.CENTRAL_VECTORS: pa.array([source.vectors[top].tolist() for top in central.top],
                                     pa.list_(schemas.vector_type(dim))),
    }, schema=ix.categories(dim))


def similarity_tables(cfg: IndexConfig, reps: represent.GroupRepresentatives,
                      cats: Categories) -> tuple[pa.Table, pa.Table]:
    """listing_similarity.parquet and merge_suggestions.parquet (Experiment IV-A2)."""
    a, b, sims = represent.listing_pairs(reps.vectors, cfg.similarity_max_listings, cfg.similarity_neighbours,
                                         cfg.exact_max, cfg.seed)
    pairs = pa.table({ix.LISTING_A: reps.groups[a].tolist(), ix.LISTING_B: reps.groups[b].tolist(),
                      ix.SIMILARITY: sims.astype(np.float32)}, schema=ix.listing_similarity())
    ma, mb, msims = represent.merge_suggestions(a, b, sims, cfg.merge_threshold)
    merges = pa.table({ix.LISTING_A: reps.groups[ma].tolist(), ix.LISTING_B: reps.groups[mb].tolist(),
                       ix.SIMILARITY: msims.astype(np.float32), ix.CATEGORY_A: cats.of_listing[ma].tolist(),
                       ix.CATEGORY_B: cats.of_listing[mb].tolist()}, schema=ix.merge_suggestions())
    return pairs, merges


# ----------------------------------------------------------------------------------------------
# The job


def up_to_date(stage_uri: str, cfg: IndexConfig, upstream: dict[str, Any]) -> dict[str, Any] | None:
    """The published index manifest when it was built with the same config from the same source, else None."""
    try:
        manifest = io.read_manifest(stage_uri, "index")
    except io.StageError:
        return None
    same = manifest.get("config") == config.to_dict(cfg) and manifest.get("upstream", {}).get(
        "source", {}).get("created") == upstream["created"]
    return manifest if same else None


def build(cfg: IndexConfig) -> dict[str, Any]:
    """Build and publish the index stage; returns its manifest (the existing one when already up to date)."""
    timings: dict[str, float] = {}
    source_uri = io.join(cfg.run, cfg.input_stage or cfg.source)
    upstream = {"source": io.upstream_summary(io.read_manifest(source_uri, cfg.source), source_uri)}
    stage_uri = io.join(cfg.run, cfg.stage)
    existing = up_to_date(stage_uri, cfg, upstream["source"])
    if existing is not None:
        return existing
    with io.timed(timings, "read"):
        source = read_source(cfg, source_uri)
    with io.timed(timings, "listings"):
        reps = represent.represent_groups(source.vectors, source.listings, cfg.method, cfg.top_k,
                                          **degree_options(cfg))
    with io.timed(timings, "categories"):
        cats = assign_categories(cfg, source, reps)
    run_dir = io.new_run_dir(stage_uri)
    tables = {"listings": listings_table(source, reps, cats), "categories": categories_table(cfg, source, cats)}
    with io.timed(timings, "similarity"):
        tables["listing_similarity"], tables["merge_suggestions"] = similarity_tables(cfg, reps, cats)
    files = {name: io.write_table(table, run_dir, f"{name}.parquet") for name, table in tables.items()}
    with io.timed(timings, "ann"):
        index = CategoryIndex.build(source.vectors, source.image_ids, cats.of_image, source.categories,
                                    source.listings, cfg.ann_min_size, cfg.ann_neighbours, cfg.seed)
        ann_files = index.save(io.join(run_dir, "ann"))
    files["ann_vectors"], files["ann_catalog"] = ann_files[0], ann_files[-1]
    stage_path = io.url_to_fs(stage_uri)[1]
    relative = {name: posixpath.relpath(io.url_to_fs(uri)[1], stage_path) for name, uri in files.items()}
    return io.publish(
        stage_uri, "index", list(files.values()) + ann_files[1:-1], config.to_dict(cfg), upstream,
        tables=relative, rows=len(source.image_ids), skipped=source.skipped, listings=len(reps.groups),
        categories=len(cats.names), ann_categories=sum(p.ann is not None for p in index.parts.values()),
        merge_suggestions=tables["merge_suggestions"].num_rows, dim=int(source.vectors.shape[1]), timings=timings)


def summary(manifest: dict[str, Any], seconds: float) -> str:
    """One line for the terminal."""
    return (f"index: {manifest['rows']} images ({manifest['skipped']} skipped), {manifest['listings']} listings, "
            f"{manifest['categories']} categories ({manifest['ann_categories']} with an ANN index), "
            f"{manifest['merge_suggestions']} merge suggestions, in {seconds:.1f}s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.parse(IndexConfig, argv, "Build <--run>/<--stage> (default index) from <--run>/latents.")

    def job() -> None:
        start = time.perf_counter()
        print(summary(build(cfg), time.perf_counter() - start))

    return _cli.run(job, extra=(ValueError,))


if __name__ == "__main__":
    raise SystemExit(main())
