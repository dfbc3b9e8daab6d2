"""The pyarrow schemas of the `index` stage's tables (to be merged into gatrep/schemas.py)."""

from __future__ import annotations

import pyarrow as pa

from gatrep.schemas import CATEGORY, IMAGE_ID, LISTING, vector_type

REPRESENTATIVE = "representative"
REPRESENTATIVE_IMAGE_ID = "representative_image_id"
REPRESENTATIVE_LISTING = "representative_listing"
ZSCORE = "zscore"
SIZE = "size"
CENTRAL_IMAGE_IDS = "central_image_ids"
CENTRAL_ZSCORES = "central_zscores"
CENTRAL_VECTORS = "central_vectors"
LABEL = "label"
LISTINGS = "listings"
VECTOR = "vector"
LISTING_A = "listing_a"
LISTING_B = "listing_b"
CATEGORY_A = "category_a"
CATEGORY_B = "category_b"
SIMILARITY = "similarity"
ANN_FILE = "ann_file"
ANN_SHA256 = "ann_sha256"

# The index stage's tables, by the name its manifest's "tables" mapping uses.
TABLES = ("listings", "categories", "listing_similarity", "merge_suggestions", "ann_vectors", "ann_catalog")


def listings(dim: int) -> pa.Schema:
    """One row per listing: its category, representative model and most central images (Remark 1)."""
    return pa.schema([
        (LISTING, pa.string()),
        (CATEGORY, pa.string()),
        (REPRESENTATIVE, vector_type(dim)),
        (REPRESENTATIVE_IMAGE_ID, pa.string()),  # the representative image (closest to the centroid for centroid)
        (ZSCORE, pa.float32()),  # z-score of the representative image's centrality within the listing
        (SIZE, pa.int64()),
        (CENTRAL_IMAGE_IDS, pa.list_(pa.string())),  # top-k most central, most central first
        (CENTRAL_ZSCORES, pa.list_(pa.float32())),
    ])


def categories(dim: int) -> pa.Schema:
    """One row per category: representative model, the listing it came from, the top-m most central images."""
    return pa.schema([
        (CATEGORY, pa.string()),
        (REPRESENTATIVE, vector_type(dim)),
        (REPRESENTATIVE_LISTING, pa.string()),
        (REPRESENTATIVE_IMAGE_ID, pa.string()),
        (LABEL, pa.string()),  # the input category most of its images carry (null if none): for evaluation
        (LISTINGS, pa.int64()),
        (SIZE, pa.int64()),
        (CENTRAL_IMAGE_IDS, pa.list_(pa.string())),
        (CENTRAL_VECTORS, pa.list_(vector_type(dim))),  # top-m most central images' vectors (multi-representative)
    ])


def listing_similarity() -> pa.Schema:
    """Listing pairs with the cosine of their representatives (all pairs, or each listing's top neighbours)."""
    return pa.schema([(LISTING_A, pa.string()), (LISTING_B, pa.string()), (SIMILARITY, pa.float32())])


def merge_suggestions() -> pa.Schema:
    """Listing pairs similar enough to be one category (Experiment IV-A2), most similar first."""
    return pa.schema([
        (LISTING_A, pa.string()),
        (LISTING_B, pa.string()),
        (SIMILARITY, pa.float32()),
        (CATEGORY_A, pa.string()),
        (CATEGORY_B, pa.string()),
    ])


def ann_vectors(dim: int) -> pa.Schema:
    """Every indexed image, grouped by category, in the row order the category's ANN index uses."""
    return pa.schema([
        (CATEGORY, pa.string()),
        (IMAGE_ID, pa.string()),
        (LISTING, pa.string()),
        (LABEL, pa.string()),  # the input's category of the image (null if unlabelled): relevance in evaluation
        (VECTOR, vector_type(dim)),
    ])


def ann_catalog() -> pa.Schema:
    """One row per category of the retrieval index: size and its pynndescent pickle (null: exact search)."""
    return pa.schema([
        (CATEGORY, pa.string()),
        (SIZE, pa.int64()),
        (ANN_FILE, pa.string()),
        (ANN_SHA256, pa.string()),
    ])
