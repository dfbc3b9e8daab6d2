"""fsspec URIs, input discovery, Parquet stage directories and their manifests."""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from gatrep import schemas
from gatrep.errors import UserError

MANIFEST = "_manifest.json"
LOCK = "_lock.json"
MANIFEST_SUFFIXES = (".parquet", ".csv")


class InputError(UserError, ValueError):
    """An input location or manifest that cannot be turned into a list of images."""


class StageError(UserError, RuntimeError):
    """A stage directory that is missing, incomplete, or of an unknown schema version."""


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for any fsspec URI or local path."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") or "/"


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI that `url_to_fs` maps back to (fs, path): the protocol is kept unless local."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended, keeping its protocol."""
    return posixpath.join(uri.rstrip("/"), *parts)


# ----------------------------------------------------------------------------------------------
# Input discovery


def discover_inputs(uri: str) -> pa.Table:
    """Every input file as a row of `schemas.INPUTS` (uri, listing, category), sorted by uri.

    `uri` is an image tree `<root>/<category>/<listing>/<image>` or `<root>/<category>/<image>`
    (then the listing is the category, as in the paper's Approach II), or a .parquet/.csv manifest
    with a `uri` column and optional `listing` and `category` columns. Every non-hidden file of a
    tree becomes a row, whatever its extension, so that nothing is dropped silently. Listing names
    are qualified by their category (`shirts/listing-1`) so equal names in two categories differ.
    Raises InputError when the location does not exist, holds no files, or the manifest is bad.
    """
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        raise InputError(f"input {uri!r} does not exist")
    if fs.isfile(path):
        if not path.endswith(MANIFEST_SUFFIXES):
            raise InputError(f"input {uri!r} is a file but not a .parquet or .csv manifest")
        return _read_input_manifest(fs, path, uri)
    return _walk_tree(fs, path, uri)


def _walk_tree(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> pa.Table:
    if looks_like_stage(uri):
        raise InputError(f"input {uri!r} is a gatrep stage directory, not an image tree; give the images' folder")
    uris, listings, categories, fingerprints = [], [], [], []
    found = fs.find(root, detail=True)
    for path in sorted(found):
        parts = posixpath.relpath(path, root).split("/")
        if any(p.startswith(".") for p in parts):
            continue  # hidden files and folders (.DS_Store, .git): the only files a tree walk skips
        category = parts[0] if len(parts) > 1 else None
        listing = f"{parts[0]}/{parts[1]}" if len(parts) > 2 else category
        fingerprints.append(fingerprint(found[path]))
        if isinstance(fs, LocalFileSystem):
            category, listing, path = (None if v is None else escape_path(v) for v in (category, listing, path))
        uris.append(full_uri(fs, path))
        listings.append(listing)
        categories.append(category)
    if not uris:
        raise InputError(f"input {uri!r} holds no files (expected <root>/<category>/[<listing>/]<image>)")
    return pa.table({schemas.URI: uris, schemas.LISTING: listings, schemas.CATEGORY: categories,
                     schemas.FINGERPRINT: fingerprints}, schema=schemas.INPUTS)


def fingerprint(info: dict[str, Any]) -> str | None:
    """"<size>:<modification time or ETag>" from a listing's file info (local files, S3, GCS...), None when the
    listing gives neither: a rerun then reads and hashes the file."""
    changed = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("updated")
    if info.get("size") is None or changed is None:
        return None
    return f"{info['size']}:{changed}"


def _read_input_manifest(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> pa.Table:
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f) if path.endswith(".parquet") else pa_csv.read_csv(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"manifest {uri!r} could not be read: {err}") from err
    if schemas.URI not in table.column_names:
        raise InputError(f"manifest {uri!r} has no 'uri' column (columns: {', '.join(table.column_names)})")
    n = table.num_rows
    if n == 0:
        raise InputError(f"manifest {uri!r} has no rows")
    columns = {}
    for name in (schemas.URI, schemas.LISTING, schemas.CATEGORY):
        column = table[name] if name in table.column_names else pa.nulls(n, pa.string())
        try:
            columns[name] = column.cast(pa.string())
        except pa.ArrowInvalid as err:
            raise InputError(f"manifest {uri!r}: column {name!r} is not text: {err}") from err
    if columns[schemas.URI].null_count:
        raise InputError(f"manifest {uri!r}: {columns[schemas.URI].null_count} rows have an empty uri")
    base = posixpath.dirname(path)
    resolved = [u if "://" in u or u.startswith("/") else full_uri(fs, posixpath.join(base, u))
                for u in columns[schemas.URI].to_pylist()]
    if len(set(resolved)) != len(resolved):
        raise InputError(f"manifest {uri!r} lists the same uri more than once")
    # Empty cells (CSV) count as missing; a missing listing is its category (Approach II).
    categories = [c or None for c in columns[schemas.CATEGORY].to_pylist()]
    listings = [lst or cat for lst, cat in zip(columns[schemas.LISTING].to_pylist(), categories, strict=True)]
    table = pa.table({schemas.URI: resolved, schemas.LISTING: listings, schemas.CATEGORY: categories,
                      schemas.FINGERPRINT: pa.nulls(len(resolved), pa.string())}, schema=schemas.INPUTS)
    return table.sort_by(schemas.URI)


# ----------------------------------------------------------------------------------------------
# Stage directories


def read_manifest(stage_uri: str, expect_stage: str | None = None) -> dict[str, Any]:
    """The stage's manifest. Raises StageError if it is absent (incomplete stage) or unknown."""
    fs, path = url_to_fs(stage_uri)
    manifest_path = posixpath.join(path, MANIFEST)
    if not fs.exists(manifest_path):
        what = f"the {expect_stage} stage" if expect_stage else "a stage"
        raise StageError(
            f"{stage_uri} has no {MANIFEST}: {what} was never published there, or its run did not finish; "
            f"run the job that writes it first"
        )
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
    except json.JSONDecodeError as err:
        raise StageError(f"{join(stage_uri, MANIFEST)} is not valid JSON: {err}") from err
    if manifest.get("schema_version") != schemas.SCHEMA_VERSION:
        raise StageError(
            f"{stage_uri} has schema version {manifest.get('schema_version')!r}; this gatrep reads "
            f"version {schemas.SCHEMA_VERSION}"
        )
    if expect_stage and manifest.get("stage") != expect_stage:
        raise StageError(f"{stage_uri} holds the {manifest.get('stage')!r} stage, not {expect_stage!r}")
    return manifest


def looks_like_stage(uri: str) -> bool:
    """Whether `uri` is a stage directory, published (it has a manifest) or not (`run-*` folders of Parquet)."""
    fs, path = url_to_fs(uri)
    if not fs.isdir(path):
        return False
    return bool(fs.exists(posixpath.join(path, MANIFEST)) or fs.glob(posixpath.join(path, "run-*", "*.parquet")))


def escape_path(path: str) -> str:
    """A local path as text that Arrow can store: bytes that are not UTF-8 (os.fsdecode's surrogates) become
    `\\xNN`; valid names are unchanged."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unescape_path(path: str) -> bytes:
    """The original bytes of a local path written by `escape_path`."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), path.encode("utf-8"))


def stage_file_uris(stage_uri: str, manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest publishes, as full URIs."""
    return [join(stage_uri, f) for f in manifest["files"]]


def table_uris(stage_uri: str, manifest: dict[str, Any], table: str | None = None) -> list[str]:
    """The Parquet files of one table of a published stage: `table` of a multi-table stage (its manifest's
    "tables" mapping: one file, or a list of files read in that order), else every Parquet file the manifest
    lists. StageError when the table is not listed."""
    if table is None or table == manifest["stage"]:
        return [join(stage_uri, f) for f in manifest["files"] if f.endswith(".parquet")]
    tables = manifest.get("tables", {})
    if table not in tables:
        raise StageError(f"{stage_uri}: the {manifest['stage']} manifest lists no {table!r} table; rebuild the stage")
    files = tables[table]
    return [join(stage_uri, f) for f in ([files] if isinstance(files, str) else files)]


def read_table(stage_uri: str, stage: str, table: str | None = None,
               columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """(table, manifest) of a published stage, checked against the data contract (schemas.STAGES).

    Only the files its manifest lists are read. Refuses (StageError) a stage without a manifest, of
    another stage, or whose files are missing or not Parquet, and (SchemaError) a table whose schema
    differs from the contract. `columns` selects columns after the whole schema is checked.
    """
    manifest = read_manifest(stage_uri, stage)
    files = table_uris(stage_uri, manifest, table)
    if not files:
        raise StageError(f"{stage_uri}: the manifest lists no data files")
    check_table_schemas(stage_uri, manifest, table)
    parts = []
    for file_uri in files:
        fs, path = url_to_fs(file_uri)
        with _readable(file_uri, stage):
            parts.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(parts, promote_options="default"), manifest  # older files may lack a new column


def table_schema(stage_uri: str, manifest: dict[str, Any], table: str | None = None) -> pa.Schema:
    """The schema of a published table, from its first file's footer (StageError when it has no file)."""
    files = table_uris(stage_uri, manifest, table)
    if not files:
        raise StageError(f"{stage_uri}: the manifest lists no data files")
    fs, path = url_to_fs(files[0])
    return pq.read_schema(path, filesystem=fs)


@contextlib.contextmanager
def _readable(file_uri: str, stage: str) -> Iterator[None]:
    """Turn a missing file or one that is not Parquet into a StageError that names it and says what to do."""
    try:
        yield
    except (FileNotFoundError, pa.ArrowInvalid) as err:
        raise StageError(f"{file_uri} is missing or not a readable Parquet file ({err}); "
                         f"rebuild the {stage} stage") from err


def _check_schema(file_uri: str, stage: str, table: str | None) -> None:
    """Refuse (SchemaError) a Parquet file whose schema is not the contract's for `table` of `stage`; reads only
    the footer."""
    fs, path = url_to_fs(file_uri)
    schema = pq.read_schema(path, filesystem=fs)
    schemas.validate(schema, schemas.STAGES[stage].expected(table or stage, schema), file_uri)


def upstream_of(manifest: dict[str, Any], stage_uri: str) -> dict[str, Any]:
    """What a downstream manifest records of a stage it read: where it is, its directory name under the run
    root, when it was published and its files (run-directory names are unique per publish, so the files tell
    two publishes apart even within one second)."""
    return {"uri": stage_uri, "stage": posixpath.basename(stage_uri.rstrip("/")), "created": manifest["created"],
            "rows": manifest.get("rows"), "files": manifest["files"]}


def is_current(record: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """Whether an upstream record (from `upstream_of`) still describes the stage's published manifest."""
    return record.get("files") == manifest["files"] and record.get("created") == manifest["created"]


def upstream_stage(run: str, manifest: dict[str, Any], name: str, stage: str) -> tuple[str, dict[str, Any]]:
    """(URI, manifest) of the stage that `manifest` records as its upstream `name`, found under the same run
    root. Refuses (StageError) a record that is missing or a stage republished since (the downstream stage is
    stale and must be rebuilt)."""
    record = manifest.get("upstream", {}).get(name)
    if not record or "stage" not in record:
        raise StageError(f"the {manifest['stage']} stage records no {name} stage it was built from; rebuild it")
    uri = join(run, record["stage"])
    upstream = read_manifest(uri, stage)
    if not is_current(record, upstream):
        raise StageError(
            f"the {manifest['stage']} stage was built from {uri} as published {record.get('created')}, but it now "
            f"holds the one published {upstream['created']}; rebuild the {manifest['stage']} stage")
    return uri, upstream


def up_to_date(stage_uri: str, stage: str, config: dict[str, Any],
               upstream: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The published manifest of `stage_uri` when it was built with this config from exactly these upstream
    stages (same published files), with "reused": True added; else None. Every stage asks this one question
    the same way."""
    try:
        manifest = read_manifest(stage_uri, stage)
    except StageError:
        return None
    wanted = json.loads(json.dumps({"config": config, "upstream": upstream}))  # tuples as lists, as in the file
    if manifest.get("config") != wanted["config"] or manifest.get("upstream") != wanted["upstream"]:
        return None
    return {**manifest, "reused": True}


def new_run_dir(stage_uri: str) -> str:
    """A fresh directory name inside the stage for this run's data files."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return join(stage_uri, f"run-{stamp}-{uuid.uuid4().hex[:8]}")


def list_parquet(dir_uri: str) -> list[str]:
    """The .parquet files under a directory, as full URIs, sorted."""
    fs, path = url_to_fs(dir_uri)
    if not fs.exists(path):
        return []
    return sorted(full_uri(fs, p) for p in fs.find(path) if p.endswith(".parquet"))


def read_column(file_uri: str, column: str) -> list[Any]:
    """One column of one Parquet file, as Python values."""
    fs, path = url_to_fs(file_uri)
    return pq.read_table(path, filesystem=fs, columns=[column])[column].to_pylist()


def status_counts(files: list[str]) -> dict[str, int]:
    """Rows per `status` over Parquet files (embeddings or results), sorted by status."""
    counts = collections.Counter(s for f in files for s in read_column(f, schemas.STATUS))
    return dict(sorted(counts.items()))


def write_table(table: pa.Table, dir_uri: str, name: str = "part-00000.parquet") -> str:
    """Write one Parquet file into `dir_uri`; returns its URI."""
    fs, path = url_to_fs(dir_uri)
    fs.makedirs(path, exist_ok=True)
    file_path = posixpath.join(path, name)
    pq.write_table(table, file_path, filesystem=fs)
    return full_uri(fs, file_path)


def publish(stage_uri: str, stage: str, files: Iterable[str], config: dict[str, Any],
            upstream: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Write the stage's manifest last, making `files` (URIs inside the stage) its content. Call it holding
    the stage's lock (`stage_lock`).

    On a local filesystem the manifest is written beside and renamed into place; on object stores a single
    PUT is already atomic. The run folders the previous manifest listed and this one does not are kept for
    one more publish (recorded as "retired"), so a reader that started on the previous version can finish;
    folders retired by an earlier publish, and those of crashed runs, are removed. Read a stage through its
    manifest, never by listing its folder.
    """
    fs, path = url_to_fs(stage_uri)
    relative = [posixpath.relpath(url_to_fs(f)[1], path) for f in files]
    previous = _previous_run_dirs(stage_uri)
    manifest = {
        "stage": stage,
        "schema_version": schemas.SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "upstream": upstream or {},
        "files": relative,
        "retired": sorted(previous - _run_dirs(relative)),
        **extra,
    }
    write_atomic(join(stage_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    _remove_unlisted(fs, path, _run_dirs(relative) | set(manifest["retired"]))
    return manifest


def _run_dirs(files: Iterable[str]) -> set[str]:
    return {f.split("/")[0] for f in files if f.startswith("run-")}


def _previous_run_dirs(stage_uri: str) -> set[str]:
    """The run folders the published manifest lists (none when there is no readable manifest)."""
    try:
        return _run_dirs(read_manifest(stage_uri)["files"])
    except StageError:
        return set()


@contextlib.contextmanager
def stage_lock(stage_uri: str) -> Iterator[None]:
    """Hold `<stage>/_lock.json` while a job writes the stage: a second job on the same stage refuses at once
    (StageError, naming the holder) instead of racing it. A lock left by a process that died on this host is
    taken over. On a local filesystem the lock is created atomically (O_EXCL); object stores have no
    create-if-absent in fsspec, so there two jobs started within the same second can both get it."""
    fs, path = url_to_fs(stage_uri)
    lock = posixpath.join(path, LOCK)
    existed = fs.exists(path)
    fs.makedirs(path, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not _create_exclusive(fs, lock, json.dumps(holder).encode()):
        other = _read_lock(fs, lock)
        if not _dead_here(other):
            raise StageError(f"{stage_uri} is being written by another job (pid {other.get('pid')} on "
                             f"{other.get('host')} since {other.get('since')}); wait for it to finish, or delete "
                             f"{join(stage_uri, LOCK)} if that job is gone")
        fs.pipe_file(lock, json.dumps(holder).encode())  # a dead process's lock: take it over
    try:
        yield
    finally:
        fs.rm_file(lock)
        # A refused first run leaves no empty stage folder behind (on an object store an empty prefix is gone already).
        if not existed and fs.exists(path) and not fs.ls(path, detail=False):
            fs.rmdir(path)


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    if isinstance(fs, LocalFileSystem):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _read_lock(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    try:
        return dict(json.loads(fs.cat_file(path)))
    except (OSError, ValueError):
        return {}


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder was a process on this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def write_atomic(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old one or the new one, never half of one.

    On a local filesystem the data goes to a temporary file renamed into place; on object stores a
    single PUT is already atomic.
    """
    fs, path = url_to_fs(uri)
    fs.makedirs(posixpath.dirname(path) or "/", exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def _remove_unlisted(fs: fsspec.AbstractFileSystem, path: str, kept_dirs: set[str]) -> None:
    """Delete the run directories not in `kept_dirs`: retired an earlier publish ago, or of crashed runs."""
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith("run-") and name not in kept_dirs:
            fs.rm(entry, recursive=True)


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall-clock seconds of a block under `name`, for a manifest's timings."""
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


# ----------------------------------------------------------------------------------------------
# Reading published stages in bounded memory

BATCH_ROWS = 65_536  # rows per streamed record batch: bounded memory whatever the stage's size


def stage_exists(stage_uri: str) -> bool:
    """Whether the stage has been published (its manifest exists)."""
    fs, path = url_to_fs(stage_uri)
    return bool(fs.exists(posixpath.join(path, MANIFEST)))


def check_table_schemas(stage_uri: str, manifest: dict[str, Any], table: str | None = None) -> None:
    """Check the schema of every Parquet file of one table of a published stage (see `table_uris`) against the data
    contract (schemas.STAGES), reading only their footers. Refuses (SchemaError) a file whose schema differs, and
    (StageError) one that is missing or not Parquet."""
    for uri in table_uris(stage_uri, manifest, table):
        with _readable(uri, manifest["stage"]):
            _check_schema(uri, manifest["stage"], table)


@contextlib.contextmanager
def _parquet(file_uri: str, columns: list[str]) -> Iterator[pq.ParquetFile]:
    """One Parquet file, open; SchemaError when it lacks one of `columns` (pyarrow would silently read none)."""
    fs, path = url_to_fs(file_uri)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise schemas.SchemaError(f"{file_uri}: no column(s) {', '.join(map(repr, missing))}; rebuild its stage")
        yield parquet


def scan(stage_uri: str, manifest: dict[str, Any], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Every row of a stage's Parquet files as record batches of `columns`, one batch in memory at a time.
    Refuses (SchemaError) a file without one of `columns`."""
    for uri in table_uris(stage_uri, manifest):
        with _parquet(uri, columns) as parquet:
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def count_rows(stage_uri: str, manifest: dict[str, Any]) -> int:
    """The stage's row count from the Parquet footers (no data read)."""
    total = 0
    for uri in table_uris(stage_uri, manifest):
        with _parquet(uri, []) as parquet:
            total += parquet.metadata.num_rows
    return total


def valid_rows(stage_uri: str, manifest: dict[str, Any], column: str) -> np.ndarray:
    """Whether each row of the stage (numbered as `take_rows` numbers them) has a non-null `column`. A row group
    whose statistics count no null in the column (for a list column, a null list counts as a null of its leaf)
    is not read, so a vector column is read only where it has nulls. Refuses (StageError) a file that is missing
    or not Parquet, (SchemaError) one without `column`."""
    parts = [np.zeros(0, dtype=bool)]
    for uri in table_uris(stage_uri, manifest):
        with _readable(uri, manifest["stage"]), _parquet(uri, [column]) as parquet:
            leaves = [i for i in range(parquet.metadata.num_columns)
                      if parquet.schema.column(i).path.split(".")[0] == column]  # a list column's leaf: v.list.element
            for group in range(parquet.num_row_groups):
                meta = parquet.metadata.row_group(group)
                stats = [meta.column(i).statistics for i in leaves]
                if all(s is not None and s.has_null_count and s.null_count == 0 for s in stats):
                    parts.append(np.ones(meta.num_rows, dtype=bool))
                else:
                    valid = parquet.read_row_group(group, columns=[column])[column].is_valid()
                    parts.append(valid.to_numpy(zero_copy_only=False))
    return np.concatenate(parts)


def take_rows(stage_uri: str, manifest: dict[str, Any], rows: np.ndarray, columns: list[str]) -> pa.Table:
    """The given global row numbers (sorted, in stage file order) of `columns`; only the row groups that hold
    one of them are read. Refuses an empty `rows` (ValueError) and rows all past the stage's end (StageError)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        raise ValueError("take_rows needs at least one row")
    parts, offset = [], 0
    for uri in table_uris(stage_uri, manifest):
        with _parquet(uri, columns) as parquet:
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                inside = rows[(rows >= offset) & (rows < offset + size)] - offset
                if inside.size:
                    parts.append(parquet.read_row_group(group, columns=columns).take(pa.array(inside)))
                offset += size
    if not parts:
        raise StageError(f"{stage_uri}: rows {rows[:3].tolist()}... are past its {offset} rows")
    return pa.concat_tables(parts)


def sample_positions(total: int, n: int, seed: int) -> np.ndarray:
    """min(n, total) distinct row numbers drawn uniformly with `seed`, sorted."""
    if total <= n:
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).astype(np.int64)


def read_text_file(stage_uri: str, manifest: dict[str, Any], basename: str) -> str | None:
    """The text of the stage's published file named `basename`, or None when the manifest lists none."""
    for uri in stage_file_uris(stage_uri, manifest):
        if posixpath.basename(uri) == basename:
            fs, path = url_to_fs(uri)
            return bytes(fs.cat_file(path)).decode("utf-8", errors="replace")
    return None
