"""The pyarrow schema of every gatrep table, the column names, the status taxonomy, and validate()."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# Column names shared by several tables.
IMAGE_ID = "image_id"
URI = "uri"
LISTING = "listing"
CATEGORY = "category"
STATUS = "status"
ERROR = "error"
EMBEDDING = "embedding"
WIDTH = "width"
HEIGHT = "height"
NODE = "node"
NEIGHBOURS = "neighbours"
SIMILARITIES = "similarities"
LATENT = "latent"

# Row statuses. Every input file gets exactly one row with one of these.
OK = "ok"
UNREADABLE = "unreadable"  # the URI could not be opened or read (missing, permission, network)
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # no image format recognised in the bytes (text named .jpg, ...)
UNSUPPORTED_FORMAT = "unsupported_format"  # an image format gatrep does not decode
TRUNCATED = "truncated"  # a recognised image whose data ends early or is corrupt
TOO_LARGE = "too_large"  # over the configured pixel or byte limit (decompression bombs)
DECODE_ERROR = "decode_error"  # anything else the decoder raised
STATUSES = (OK, UNREADABLE, EMPTY, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TRUNCATED, TOO_LARGE, DECODE_ERROR)

INPUTS = pa.schema([(URI, pa.string()), (LISTING, pa.string()), (CATEGORY, pa.string())])


def vector_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """fixed_size_list<float32|float16>[dim], the type of every stored vector."""
    value = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.list_(value, dim)


def embeddings(dim: int, dtype: str = "float32") -> pa.Schema:
    """One row per input file; `embedding` is null unless status is ok."""
    return pa.schema([
        (IMAGE_ID, pa.string()),  # content hash of the file's bytes; null when unreadable
        (URI, pa.string()),
        (LISTING, pa.string()),
        (CATEGORY, pa.string()),
        (WIDTH, pa.int32()),
        (HEIGHT, pa.int32()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (EMBEDDING, vector_type(dim, dtype)),
    ])


def graph(k: int) -> pa.Schema:
    """One row per node; neighbours are node ids padded with -1, similarities are cosine."""
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


QUERY_ID = "query_id"
LABEL = "label"
CATEGORY_SCORES = "category_scores"
MATCHES = "matches"


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
        (CATEGORY_SCORES, pa.list_(pa.struct([("category", pa.string()), ("score", pa.float32())]))),
        (MATCHES, pa.list_(pa.struct([(IMAGE_ID, pa.string()), ("score", pa.float32())]))),
    ])


class SchemaError(ValueError):
    """A table whose columns or types differ from the data contract."""


def vector_dim(schema: pa.Schema, column: str) -> int:
    """The fixed length of a vector column; SchemaError if it is not fixed_size_list."""
    if column not in schema.names:
        raise SchemaError(f"no column {column!r} (columns: {', '.join(schema.names)})")
    field_type = schema.field(column).type
    if not pa.types.is_fixed_size_list(field_type):
        raise SchemaError(f"column {column!r} is {field_type}, expected a fixed_size_list vector")
    return int(field_type.list_size)


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
