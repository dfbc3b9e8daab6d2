"""The data contract: every stage's name, tables and files, each table's pyarrow schema, the column names
and the status taxonomy; `validate` checks a table against it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pyarrow as pa

from gatrep.errors import UserError

SCHEMA_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Column names

IMAGE_ID = "image_id"
URI = "uri"
LISTING = "listing"
CATEGORY = "category"
STATUS = "status"
ERROR = "error"
EMBEDDING = "embedding"
STYLE = "style"  # embed --style: a vector of the image's look (backbones.TorchEncoder.embed); absent without it
WIDTH = "width"
HEIGHT = "height"
NODE = "node"
NEIGHBOURS = "neighbours"
SIMILARITIES = "similarities"
LATENT = "latent"
FINGERPRINT = "fingerprint"  # "<size>:<mtime or ETag>" of an input file when listing it gave them
QUERY_ID = "query_id"
LABEL = "label"  # an input category carried along for evaluation (null when unlabelled)
CATEGORY_SCORES = "category_scores"
MATCHES = "matches"
SCORE = "score"
REPRESENTATIVE = "representative"
REPRESENTATIVE_IMAGE_ID = "representative_image_id"
REPRESENTATIVE_LISTING = "representative_listing"
ZSCORE = "zscore"
SIZE = "size"
CENTRAL_IMAGE_IDS = "central_image_ids"
CENTRAL_ZSCORES = "central_zscores"
CENTRAL_VECTORS = "central_vectors"
LISTINGS = "listings"
VECTOR = "vector"
LISTING_A = "listing_a"
LISTING_B = "listing_b"
CATEGORY_A = "category_a"
CATEGORY_B = "category_b"
SIMILARITY = "similarity"
ANN_FILE = "ann_file"
ANN_SHA256 = "ann_sha256"
CONFIDENCE = "confidence"
BEST_SIMILARITY = "best_similarity"
NEEDS_REVIEW = "needs_review"
REVIEW_REASON = "review_reason"

# ----------------------------------------------------------------------------------------------
# Row statuses. Every input file gets exactly one row with one of these.

OK = "ok"
UNREADABLE = "unreadable"  # the URI could not be opened or read (missing, permission, network)
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # no image format recognised in the bytes (text named .jpg, ...)
UNSUPPORTED_FORMAT = "unsupported_format"  # an image format gatrep does not decode
TRUNCATED = "truncated"  # a recognised image whose data ends early or is corrupt
TOO_LARGE = "too_large"  # over the configured pixel or byte limit (decompression bombs)
DECODE_ERROR = "decode_error"  # anything else the decoder raised
BLANK = "blank"  # decoded, but the backbone gave an all-zero or non-finite vector (HOG of a uniform image)
STATUSES = (OK, UNREADABLE, EMPTY, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TRUNCATED, TOO_LARGE, DECODE_ERROR, BLANK)
# Statuses that depend only on a file's bytes (and the backbone): a rerun keeps them for an unchanged file.
# The others (too_large: the limits; decode_error, unreadable: may be passing) are tried again.
FINAL_STATUSES = (OK, EMPTY, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TRUNCATED, BLANK)

# ----------------------------------------------------------------------------------------------
# Table schemas

INPUTS = pa.schema([(URI, pa.string()), (LISTING, pa.string()), (CATEGORY, pa.string()),
                    (FINGERPRINT, pa.string())])


def vector_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """fixed_size_list<float32|float16>[dim], the type of every stored vector."""
    value = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.list_(value, dim)


def embeddings(dim: int, dtype: str = "float32", style_dim: int = 0) -> pa.Schema:
    """One row per input file; `embedding` (and `style`, with a `style_dim`) is null unless status is ok."""
    schema = pa.schema([
        (IMAGE_ID, pa.string()),  # content hash of the file's bytes; null when unreadable
        (URI, pa.string()),
        (LISTING, pa.string()),
        (CATEGORY, pa.string()),
        (WIDTH, pa.int32()),
        (HEIGHT, pa.int32()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (EMBEDDING, vector_type(dim, dtype)),
        (FINGERPRINT, pa.string()),  # lets a rerun skip reading unchanged files; absent in stages before it
    ])
    return schema.append(pa.field(STYLE, vector_type(style_dim, dtype))) if style_dim else schema


def _embeddings_expected(actual: pa.Schema) -> pa.Schema:
    """The embeddings contract for a table; a stage written before `fingerprint` existed is still valid."""
    style_dim = vector_dim(actual, STYLE) if STYLE in actual.names else 0
    expected = embeddings(vector_dim(actual, EMBEDDING), vector_dtype(actual, EMBEDDING), style_dim)
    return expected if FINGERPRINT in actual.names else expected.remove(expected.get_field_index(FINGERPRINT))


def graph(k: int) -> pa.Schema:
    """One row per node; neighbours are node ids padded with -1 (vectors.PAD), similarities cosine (NaN there)."""
    return pa.schema([
        (NODE, pa.int64()),
        (IMAGE_ID, pa.string()),
        (NEIGHBOURS, pa.list_(pa.int64(), k)),
        (SIMILARITIES, pa.list_(pa.float32(), k)),
    ])


def latents(dim: int = 256) -> pa.Schema:
    """One context-aware latent per graph node."""
    return pa.schema([
        (NODE, pa.int64()),
        (IMAGE_ID, pa.string()),
        (LISTING, pa.string()),
        (CATEGORY, pa.string()),
        (LATENT, vector_type(dim)),
    ])


def results() -> pa.Schema:
    """One row per query: the chosen category, every category's score, the top-k matches inside it.

    `label` is the category the query input gave (null when unknown), for evaluation; `query_id` is
    the query file's content hash.
    """
    return pa.schema([
        (QUERY_ID, pa.string()),
        (URI, pa.string()),
        (LABEL, pa.string()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (CATEGORY, pa.string()),
        (CATEGORY_SCORES, pa.list_(pa.struct([(CATEGORY, pa.string()), (SCORE, pa.float32())]))),
        (MATCHES, pa.list_(pa.struct([(IMAGE_ID, pa.string()), (SCORE, pa.float32())]))),
    ])


def categorized() -> pa.Schema:
    """Bulk categorization of uploads (jobs.categorize): one row per upload, its category and whether a person
    should look at it. `confidence` is the margin between the two best category scores; `best_similarity` the
    upload's cosine to the most similar indexed image (raw backbone features); `review_reason` is
    low_confidence, unlike_every_category (a possible new category) or both, comma separated."""
    return pa.schema([
        (IMAGE_ID, pa.string()),
        (URI, pa.string()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (CATEGORY, pa.string()),
        (CONFIDENCE, pa.float32()),
        (BEST_SIMILARITY, pa.float32()),
        (NEEDS_REVIEW, pa.bool_()),
        (REVIEW_REASON, pa.string()),
    ])


def listings(dim: int) -> pa.Schema:
    """Index: one row per listing, its category, representative model and most central images (Remark 1)."""
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
    """Index: one row per category, its representative, the listing it came from, the top-m most central images."""
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
    """Index: listing pairs with the cosine of their representatives (all pairs, or each listing's top ones)."""
    return pa.schema([(LISTING_A, pa.string()), (LISTING_B, pa.string()), (SIMILARITY, pa.float32())])


def merge_suggestions() -> pa.Schema:
    """Index: listing pairs similar enough to be one category (Experiment IV-A2), most similar first."""
    return pa.schema([
        (LISTING_A, pa.string()),
        (LISTING_B, pa.string()),
        (SIMILARITY, pa.float32()),
        (CATEGORY_A, pa.string()),
        (CATEGORY_B, pa.string()),
    ])


def ann_vectors(dim: int) -> pa.Schema:
    """Index: every indexed image, grouped by category, in the row order the category's ANN index uses."""
    return pa.schema([
        (CATEGORY, pa.string()),
        (IMAGE_ID, pa.string()),
        (LISTING, pa.string()),
        (LABEL, pa.string()),  # the input's category of the image (null if unlabelled): relevance in evaluation
        (VECTOR, vector_type(dim)),
    ])


def ann_catalog() -> pa.Schema:
    """Index: one row per category of the retrieval index, its size and pynndescent pickle (null: exact search)."""
    return pa.schema([
        (CATEGORY, pa.string()),
        (SIZE, pa.int64()),
        (ANN_FILE, pa.string()),
        (ANN_SHA256, pa.string()),
    ])


# ----------------------------------------------------------------------------------------------
# Validation


class SchemaError(UserError, ValueError):
    """A table whose columns or types differ from the data contract."""


def vector_dim(schema: pa.Schema, column: str) -> int:
    """The fixed length of a vector column; SchemaError if it is not fixed_size_list."""
    if column not in schema.names:
        raise SchemaError(f"no column {column!r} (columns: {', '.join(schema.names)})")
    field_type = schema.field(column).type
    if not pa.types.is_fixed_size_list(field_type):
        raise SchemaError(f"column {column!r} is {field_type}, expected a fixed_size_list vector")
    return int(field_type.list_size)


def vector_dtype(schema: pa.Schema, column: str) -> str:
    """'float16' or 'float32': the value type of a vector column (anything else reads as float32 and fails
    validation)."""
    vector_dim(schema, column)
    return "float16" if schema.field(column).type.value_type == pa.float16() else "float32"


def validate(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise SchemaError naming every missing or mistyped column of `actual` against `expected`."""
    problems = []
    for field in expected:
        if field.name not in actual.names:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not actual.field(field.name).type.equals(field.type):
            problems.append(f"column {field.name!r} is {actual.field(field.name).type}, expected {field.type}")
    if problems:
        raise SchemaError(f"{where}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The stage registry: what each stage holds. A stage directory's `_manifest.json` lists its files;
# multi-table stages map table names to files under "tables".

EMBEDDINGS = "embeddings"
GRAPH = "graph"
MODEL = "model"
LATENTS = "latents"
INDEX = "index"
RESULTS = "results"
EVALUATION = "evaluation"
CATEGORIZED = "categorized"

# Files of the model and evaluation stages (not tables).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVALUATION_FILE = "evaluation.json"
TABLE_FILE = "table.txt"

# Given a table's actual schema, the schema it must have (vector widths come from the table itself).
Expected = Callable[[pa.Schema], pa.Schema]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the data contract: its name (also its default directory under a run root), its
    Parquet tables with their expected schemas, and the other files it holds."""

    name: str
    tables: dict[str, Expected]
    files: tuple[str, ...] = ()

    def expected(self, table: str, actual: pa.Schema) -> pa.Schema:
        """The schema `table` of this stage must have, given its actual schema."""
        return self.tables[table](actual)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage(EMBEDDINGS, {EMBEDDINGS: _embeddings_expected}),
    Stage(GRAPH, {GRAPH: lambda s: graph(vector_dim(s, NEIGHBOURS))}),
    Stage(MODEL, {}, (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)),
    Stage(LATENTS, {LATENTS: lambda s: latents(vector_dim(s, LATENT))}),
    Stage(INDEX, {
        "listings": lambda s: listings(vector_dim(s, REPRESENTATIVE)),
        "categories": lambda s: categories(vector_dim(s, REPRESENTATIVE)),
        "listing_similarity": lambda s: listing_similarity(),
        "merge_suggestions": lambda s: merge_suggestions(),
        "ann_vectors": lambda s: ann_vectors(vector_dim(s, VECTOR)),
        "ann_catalog": lambda s: ann_catalog(),
        "style_ann_vectors": lambda s: ann_vectors(vector_dim(s, VECTOR)),  # with embeddings of --style only
        "style_ann_catalog": lambda s: ann_catalog(),
    }, ("ann-*.pkl",)),
    Stage(RESULTS, {RESULTS: lambda s: results()}),
    Stage(EVALUATION, {}, (EVALUATION_FILE, TABLE_FILE)),
    Stage(CATEGORIZED, {CATEGORIZED: lambda s: categorized()}),
)}
