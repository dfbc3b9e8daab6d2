"""The embed stage on Ray Data: images -> the `embeddings` stage (read and decode in CPU tasks, the backbone in
an actor pool); also the reader of that stage's usable rows."""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from gatrep import backbones, images, io, schemas, stages, vectors
from gatrep.config import ConfigError, EmbedConfig, to_dict
from gatrep.errors import UserError
from gatrep.knn import GraphInputError

NAME = "embed"
CONFIG = EmbedConfig
DESCRIPTION = "Embed every image under --input into <--run>/<--stage>."
STAGE = schemas.EMBEDDINGS
PIXELS = "pixels"  # the preprocessed uint8 crops passed from the decode tasks to the backbone actors
PAYLOAD, JPEG = "payload", "jpeg"  # instead, with JPEGs decoded in the actor: whole JPEG files or raw crops


class StageMismatch(UserError, RuntimeError):
    """An existing stage that was built with another backbone, weights or dtype."""


def prepare_batch(batch: dict[str, np.ndarray], *, backbone: str, max_pixels: int, max_bytes: int,
                  known: dict[str, str], jpegs_to_actor: bool = False) -> dict[str, np.ndarray]:
    """Read, hash and decode each file of a batch of inputs (uri, listing, category, optional fingerprint).

    Adds image_id, width, height, status, error and `pixels` ([n, size, size, channels] uint8, zeros
    for rows that did not decode). With `jpegs_to_actor`, JPEGs that gatrep.jpeg can decode are only checked
    (images.jpeg_size) and passed on whole: instead of `pixels`, `payload` holds each row's file (where
    `jpeg` is true) or its crop's raw bytes (empty for rows that did not decode). Drops rows whose uri is in
    `known` with the same image_id: they are already embedded. Never raises for a bad file: each becomes a
    row with its status and error.
    """
    prep = backbones.get(backbone).preprocess
    out: dict[str, list[Any]] = collections.defaultdict(list)
    crops, payloads, jpeg = [], [], []
    fingerprints = batch.get(schemas.FINGERPRINT, np.full(len(batch[schemas.URI]), None, dtype=object))
    for uri, listing, category, print_ in zip(batch[schemas.URI], batch[schemas.LISTING], batch[schemas.CATEGORY],
                                              fingerprints, strict=True):
        data, refused = images.read_file(str(uri), max_bytes)
        image_id = images.content_id(data) if data is not None else None
        if image_id is not None and known.get(uri) == image_id:
            continue
        size = images.jpeg_size(data, max_pixels) if jpegs_to_actor and data else None
        if size is not None:
            decoded = images.Decoded(schemas.OK, None, *size)
            payloads.append(data)
        else:
            decoded = refused or images.decode(data or b"", prep, max_pixels)
            if jpegs_to_actor:
                payloads.append(b"" if decoded.pixels is None else decoded.pixels.tobytes())
            else:
                crops.append(np.zeros(prep.shape, np.uint8) if decoded.pixels is None else decoded.pixels)
        jpeg.append(size is not None)
        for name, value in ((schemas.IMAGE_ID, image_id), (schemas.URI, uri), (schemas.LISTING, listing),
                            (schemas.CATEGORY, category), (schemas.WIDTH, decoded.width),
                            (schemas.HEIGHT, decoded.height), (schemas.STATUS, decoded.status),
                            (schemas.ERROR, decoded.error), (schemas.FINGERPRINT, print_)):
            out[name].append(value)
    columns = {name: np.array(values, dtype=object) for name, values in out.items()}
    if jpegs_to_actor:
        columns[PAYLOAD] = np.array(payloads, dtype=object)
        columns[JPEG] = np.array(jpeg, dtype=bool)
    else:
        columns[PIXELS] = np.stack(crops) if crops else np.zeros((0, *prep.shape), np.uint8)
    return columns


class Embedder:
    """A Ray Data actor: loads the backbone once, then embeds the ok rows of each batch."""

    def __init__(self, backbone: str, weights: str, dtype: str, threads: int, style: bool = False,
                 max_pixels: int = 0, fail_once: str | None = None) -> None:
        import torch

        from gatrep.jpeg import BatchDecoder

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.style_encoder = backbones.load_with_style(backbone, weights, device) if style else None
        self.encoder = self.style_encoder or backbones.get(backbone).load(weights, device)
        self.style_dim = self.style_encoder.style_dim if self.style_encoder else 0
        self.schema = schemas.embeddings(self.encoder.dim, dtype, self.style_dim)
        self.dtype = np.dtype(dtype)
        # Decodes the batches whose JPEGs the decode tasks passed on whole, on the encoder's device.
        self.decoder = BatchDecoder(backbones.get(backbone).preprocess,
                                    getattr(self.encoder, "device", None) or torch.device("cpu"), max_pixels)
        self.streams = threading.local()
        self.fail_once = fail_once

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        stages.kill_once(self.fail_once)
        ok = batch[schemas.STATUS] == schemas.OK
        n = len(ok)
        features = np.zeros((n, self.encoder.dim), self.dtype)
        style = np.zeros((n, self.style_dim), self.dtype)
        if ok.any():
            self._embed(batch, ok, features, style)
        ok = mark_blank(batch, features, ok)
        vectors = {schemas.EMBEDDING: features, **({schemas.STYLE: style} if self.style_dim else {})}
        # from_pandas: Ray hands null ints back as NaN floats; this turns them into nulls again.
        columns = {f.name: pa.array(batch[f.name], type=f.type, from_pandas=True)
                   for f in self.schema if f.name not in vectors}
        for name, values in vectors.items():
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1],
                                                              mask=pa.array(~ok))
        return pa.table(columns, schema=self.schema)

    def _embed(self, batch: dict[str, np.ndarray], ok: np.ndarray, features: np.ndarray, style: np.ndarray) -> None:
        """Fill the ok rows of `features` (and `style`); `ok` loses the rows that fail to decode here. On a GPU,
        on this thread's own CUDA stream (see embedding_dataset)."""
        import torch

        if self.decoder.device.type != "cuda":
            return self._forward(batch, ok, features, style)
        if not hasattr(self.streams, "stream"):
            self.streams.stream = torch.cuda.Stream(self.decoder.device)
        with torch.cuda.stream(self.streams.stream):
            return self._forward(batch, ok, features, style)

    def _forward(self, batch: dict[str, np.ndarray], ok: np.ndarray, features: np.ndarray, style: np.ndarray) -> None:
        pixels = self._pixels(batch, ok)
        if ok.any() and self.style_encoder is not None:
            features[ok], style[ok] = self.style_encoder.embed(pixels)
        elif ok.any():
            features[ok] = self.encoder(pixels)

    def _pixels(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> Any:
        """The ok rows' crops: from the decode tasks, or decoded here (a torch tensor on the encoder's device, or
        an array for an encoder that is not a torch module). A JPEG that fails to decode here takes the status and
        error Pillow gives it, and is left out of `ok` (which is updated in place)."""
        if PIXELS in batch:
            return batch[PIXELS][ok]
        rows = np.flatnonzero(ok)
        pixels, failed = self.decoder(batch[PAYLOAD][rows], batch[JPEG][rows])
        for name in (schemas.WIDTH, schemas.HEIGHT) if failed else ():  # float: NaN (null) for unknown sizes
            batch[name] = batch[name].astype(float)
        for i, decoded in failed.items():
            ok[rows[i]] = False
            batch[schemas.STATUS][rows[i]], batch[schemas.ERROR][rows[i]] = decoded.status, decoded.error
            batch[schemas.WIDTH][rows[i]] = batch[schemas.HEIGHT][rows[i]] = np.nan  # as images.decode leaves them
        if failed:
            pixels = pixels[[i for i in range(len(rows)) if i not in failed]]
        return pixels if hasattr(self.encoder, "device") else pixels.cpu().numpy()


def mark_blank(batch: dict[str, np.ndarray], features: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Give status `blank` to ok rows whose vector is all zeros or not finite (HOG of a blank image): a vector
    with no direction has no cosine with anything and must not enter a graph. Returns the new ok mask."""
    usable = np.isfinite(features).all(axis=1) & (np.abs(features).sum(axis=1) > 0)
    blank = ok & ~usable
    if blank.any():
        batch[schemas.STATUS] = np.where(blank, schemas.BLANK, batch[schemas.STATUS])
        batch[schemas.ERROR] = np.where(blank, "the backbone gave an all-zero or non-finite vector (a blank "
                                               "or uniform image?); it is left out of the graph", batch[schemas.ERROR])
    return ok & usable


def run(cfg: EmbedConfig, fail_once: str | None = None) -> dict[str, Any]:
    """Embed every input file of `cfg.input` into `<cfg.run>/<cfg.stage>` and publish it.

    Rows already in a published stage with the same uri and content hash are kept, not re-embedded, unless
    their status could change on a rerun (too_large under new limits, decode_error, unreadable). A rerun
    that changes nothing publishes nothing and returns the published manifest with "unchanged". Returns the
    manifest. Raises io.InputError for a bad input or when no file at all could be embedded (nothing is
    published), StageMismatch when the existing stage was built with another backbone, io.StageError when
    its manifest is unreadable, and WeightsNotFound (before any work) when weights are missing. `fail_once`
    (tests: a marker file's path) kills one backbone actor once, mid-batch.
    """
    backbone = backbones.get(cfg.backbone)
    backbone.load(cfg.weights, "cpu")  # fail fast on missing weights, before Ray starts any work
    with io.stage_lock(io.join(cfg.run, cfg.stage)):
        stage_uri = io.join(cfg.run, cfg.stage)
        timings: dict[str, float] = {}
        with io.timed(timings, "discover"):
            inputs = io.discover_inputs(cfg.input)
        # Rows are reused from this stage's last publish, or on its first run from --previous (another version's).
        source_uri = cfg.previous if cfg.previous and not io.stage_exists(stage_uri) else stage_uri
        previous = _previous_stage(source_uri, cfg)
        known, unchanged_files = _known(source_uri, previous, inputs, cfg.rehash)
        to_read = inputs.filter(pc.invert(pc.is_in(inputs[schemas.URI], pa.array(unchanged_files, pa.string()))))
        run_dir = io.new_run_dir(stage_uri)
        with io.timed(timings, "start_ray"):
            stages.init_ray()
        with io.timed(timings, "embed"):
            new_files = _embed(to_read, cfg, known, run_dir, fail_once) if to_read.num_rows else []
        with io.timed(timings, "merge"):
            new_uris = {u for f in new_files for u in io.read_column(f, schemas.URI)}
            kept_files = _retain(source_uri, previous, inputs, new_uris, run_dir, own=source_uri == stage_uri)
        files = kept_files + new_files
        counts = io.status_counts(files)
        if previous is not None and source_uri == stage_uri and _unchanged(stage_uri, previous, cfg, files):
            _discard(run_dir)
            return {**previous, "unchanged": True, "read": to_read.num_rows}
        if not counts.get(schemas.OK):
            _discard(run_dir)
            raise io.InputError(f"none of the {sum(counts.values())} files under {cfg.input} could be embedded "
                                f"({', '.join(f'{n} {s}' for s, n in counts.items())}); nothing was published")
        return io.publish(
            stage_uri, STAGE, files, to_dict(cfg), dim=backbone.dim, dtype=cfg.dtype, normalised=True,
            style_dim=backbone.style_dim if cfg.style else 0,
            rows=sum(counts.values()), counts=counts, embedded=len(new_uris),
            reused=sum(counts.values()) - len(new_uris), read=to_read.num_rows,
            timings=timings,
        )


# Settings that change how a run works, not what it publishes.
OPERATIONAL = ("batch_size", "decode_batch_size", "actors", "threads_per_actor", "device", "decode", "rehash",
               "previous")


def _unchanged(stage_uri: str, previous: dict[str, Any], cfg: EmbedConfig, files: list[str]) -> bool:
    """Whether this run's rows say what the published ones say: the same settings (operational ones aside),
    the same files with the same content hash, status, error, listing and category (a file refused again
    the same way changes nothing; an ok row is only re-embedded when its content changed)."""
    def settings(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in OPERATIONAL}

    same = settings(previous["config"]) == settings(to_dict(cfg))
    return same and rows_by_uri(files) == rows_by_uri(io.stage_file_uris(stage_uri, previous))


def rows_by_uri(files: list[str]) -> dict[str, tuple[Any, ...]]:
    """uri -> (image_id, status, error, listing, category) over embeddings files."""
    columns = [schemas.URI, schemas.IMAGE_ID, schemas.STATUS, schemas.ERROR, schemas.LISTING, schemas.CATEGORY]
    rows: dict[str, tuple[Any, ...]] = {}
    for file_uri in files:
        fs, path = io.url_to_fs(file_uri)
        table = pq.read_table(path, filesystem=fs, columns=columns)
        rows.update((r[0], r[1:]) for r in zip(*(table[c].to_pylist() for c in columns), strict=True))
    return rows


def _discard(run_dir: str) -> None:
    """Remove this run's own folder (it is not published)."""
    fs, path = io.url_to_fs(run_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _previous_stage(stage_uri: str, cfg: EmbedConfig) -> dict[str, Any] | None:
    """The manifest of an earlier run of this stage (None when there is none), if it was built compatibly;
    else StageMismatch. An unreadable manifest is refused (io.StageError), never taken for no stage: that
    would rebuild everything and delete the old data."""
    if not io.stage_exists(stage_uri):
        return None
    manifest = io.read_manifest(stage_uri, STAGE)
    for key in ("backbone", "weights", "dtype", "style"):
        if manifest["config"].get(key, False if key == "style" else None) != getattr(cfg, key):
            raise StageMismatch(
                f"{stage_uri} was built with {key}={manifest['config'].get(key)!r}, not {getattr(cfg, key)!r}; "
                f"write to another --run, or delete that stage to rebuild it"
            )
    return manifest


def _known(stage_uri: str, manifest: dict[str, Any] | None, inputs: pa.Table,
           rehash: bool) -> tuple[dict[str, str], list[str]]:
    """What a rerun need not embed again, from the published rows whose status it would not change
    (schemas.FINAL_STATUSES): (uri -> image_id, to drop after reading when the content hash is unchanged;
    the uris not to read at all, whose size and modification time (or ETag) are unchanged, unless `rehash`)."""
    if manifest is None:
        return {}, []
    columns = [schemas.URI, schemas.IMAGE_ID, schemas.STATUS]
    fingerprinted = schemas.FINGERPRINT in io.table_schema(stage_uri, manifest).names
    table, _ = io.read_table(stage_uri, STAGE, columns=columns + [schemas.FINGERPRINT] * fingerprinted)
    final = pc.is_in(table[schemas.STATUS], pa.array(schemas.FINAL_STATUSES))
    table = table.filter(pc.and_(pc.is_valid(table[schemas.IMAGE_ID]), final))
    known = dict(zip(table[schemas.URI].to_pylist(), table[schemas.IMAGE_ID].to_pylist(), strict=True))
    if rehash or not fingerprinted:
        return known, []
    published = dict(zip(table[schemas.URI].to_pylist(), table[schemas.FINGERPRINT].to_pylist(), strict=True))
    current = zip(inputs[schemas.URI].to_pylist(), inputs[schemas.FINGERPRINT].to_pylist(), strict=True)
    return known, [uri for uri, print_ in current if print_ is not None and published.get(uri) == print_]


def _embed(inputs: pa.Table, cfg: EmbedConfig, known: dict[str, str], run_dir: str,
           fail_once: str | None) -> list[str]:
    """Run the Ray Data pipeline over `inputs`; returns the Parquet files it wrote."""
    embedding_dataset(inputs, cfg, known, fail_once).write_parquet(run_dir)
    return io.list_parquet(run_dir)


def embedding_dataset(inputs: pa.Table, cfg: EmbedConfig, known: dict[str, str] | None = None,
                      fail_once: str | None = None) -> ray.data.Dataset:
    """A lazy Ray Dataset of `embeddings` rows, one per input row not in `known` (uri -> image_id)."""
    gpus = _gpus(cfg)
    actors = cfg.actors or max(gpus, 1)
    # Our own reader instead of ray.data.read_binary_files: that one fails the whole job on a
    # missing or unreadable file, and every input must get a row. One block per decode batch keeps
    # all CPUs busy decoding while the actors run the backbone.
    ds = ray.data.from_arrow(inputs).repartition(target_num_rows_per_block=cfg.decode_batch_size)
    # Decode tasks ask for half a CPU, the actors for one: besides packing two decoders beside each
    # actor, unequal resources stop Ray Data from fusing decoding into the actor, which would
    # serialise it with the forward pass.
    # On an instance with fewer CPUs both shrink together, so that an actor never waits for a CPU.
    actor_cpus, decode_cpus = stages.fit_cpus(actors, 1.0, 0.5)
    jpegs_to_actor = cfg.decode == "actor" or (cfg.decode == "auto" and gpus > 0)
    prepare = functools.partial(prepare_batch, backbone=cfg.backbone, max_pixels=cfg.max_pixels,
                                max_bytes=cfg.max_bytes, known=known or {}, jpegs_to_actor=jpegs_to_actor)
    ds = ds.map_batches(prepare, batch_size=None, batch_format="numpy", num_cpus=decode_cpus)
    # A GPU actor that decodes runs two batches at once, each on its own CUDA stream, so that one decodes while
    # the other runs the backbone: 5,200 against 3,900 images/s for a whole 240k-image job on an H100 (README).
    calls = 2 if jpegs_to_actor and gpus else 1
    return ds.map_batches(
        Embedder, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                           enable_true_multi_threading=calls > 1),
        num_gpus=min(1.0, gpus / actors) if gpus else 0,  # more actors than GPUs share them
        num_cpus=actor_cpus,
        fn_constructor_kwargs={"backbone": cfg.backbone, "weights": cfg.weights, "dtype": cfg.dtype,
                               "threads": cfg.threads_per_actor or _cpus_per_actor(actors), "style": cfg.style,
                               "max_pixels": cfg.max_pixels, "fail_once": fail_once},
    )


def _gpus(cfg: EmbedConfig) -> int:
    """How many GPU actors to ask for. With --device cuda at least one, even when the cluster has none yet:
    on a cluster (RAY_ADDRESS set, as `ray job submit` does) the request is what makes an autoscaler start a
    GPU node, and the job says it waits for one; a local instance without a GPU is refused at once
    (ConfigError), since nothing could ever add one."""
    if cfg.device == "cpu":
        return 0
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and gpus == 0:
        if not os.environ.get("RAY_ADDRESS"):
            raise ConfigError("--device cuda: this local Ray instance has no GPU and no autoscaler can add one; "
                              "use --device auto or --device cpu, or submit to a cluster with GPU nodes")
        print("--device cuda: the cluster has no GPU yet; the job waits until its autoscaler adds a GPU node "
              "(stop it with `ray job stop`, or run with --device auto)", file=sys.stderr, flush=True)
    return max(gpus, 1) if cfg.device == "cuda" else gpus


def _cpus_per_actor(actors: int) -> int:
    """Torch threads for each CPU actor: the node's cores shared among the actors on it."""
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
    return max(1, cpus // nodes // max(1, -(-actors // nodes)))


def _retain(stage_uri: str, manifest: dict[str, Any] | None, inputs: pa.Table, new_uris: set[str],
            run_dir: str, own: bool) -> list[str]:
    """Files of the previous run (of `stage_uri`) whose rows are still current, as files of this run: kept as they
    are where every row is current and they are this stage's own (`own`), else written into `run_dir` (filtered).

    A row is current when its uri is still an input and was not re-embedded (same content). Its
    listing and category are taken from the current inputs, so moving a file between categories in
    a manifest is picked up without re-embedding it. Files of another stage (--previous) are always
    written anew: a stage never lists files outside its own folder.
    """
    if manifest is None:
        return []
    current = dict(zip(inputs[schemas.URI].to_pylist(),
                       zip(inputs[schemas.LISTING].to_pylist(), inputs[schemas.CATEGORY].to_pylist(), strict=True),
                       strict=True))
    fs, _ = io.url_to_fs(stage_uri)
    kept = []
    for n, file_uri in enumerate(io.stage_file_uris(stage_uri, manifest)):
        table = pq.read_table(io.url_to_fs(file_uri)[1], filesystem=fs)
        uris = table[schemas.URI].to_pylist()
        keep = [u in current and u not in new_uris for u in uris]
        labels = [current.get(u) for u in uris]
        unchanged = all(labels[i] == (table[schemas.LISTING][i].as_py(), table[schemas.CATEGORY][i].as_py())
                        for i in range(len(uris)) if keep[i])
        if all(keep) and unchanged and own:
            kept.append(file_uri)
        elif any(keep):
            table = table.filter(pa.array(keep))
            relabelled = [current[u] for u in table[schemas.URI].to_pylist()]
            table = table.set_column(table.schema.get_field_index(schemas.LISTING), schemas.LISTING,
                                     pa.array([lc[0] for lc in relabelled], pa.string()))
            table = table.set_column(table.schema.get_field_index(schemas.CATEGORY), schemas.CATEGORY,
                                     pa.array([lc[1] for lc in relabelled], pa.string()))
            kept.append(io.write_table(table, run_dir, f"kept-{n:05d}.parquet"))
    return kept


def summary(manifest: dict[str, Any]) -> str:
    """A few human lines: rows, ok, each failure status, reused vs newly embedded, throughput."""
    counts = manifest["counts"]
    if manifest.get("unchanged"):
        return (f"embeddings: unchanged since {manifest['created']} ({manifest['rows']} rows, "
                f"{counts.get(schemas.OK, 0)} ok): nothing published")
    lines = [f"embeddings: {manifest['rows']} rows, {counts.get(schemas.OK, 0)} ok, "
             f"{manifest['embedded']} newly read, {manifest['reused']} reused from the previous run"]
    lines += [f"  {status}: {n}" for status, n in counts.items() if status != schemas.OK]
    embed_s = manifest["timings"].get("embed", 0.0)
    if manifest["embedded"] and embed_s:
        lines.append(f"  {manifest['embedded'] / embed_s:.1f} images/s over {embed_s:.1f} s (pipeline)")
    return "\n".join(lines)


def list_names() -> str:
    """`--list`: every registered backbone with its description."""
    return "\n".join(f"{name:14s} {backbones.get(name).description}" for name in backbones.names())


# ----------------------------------------------------------------------------------------------
# Reading the stage


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The ok rows of an embeddings stage, sorted by uri: row i is graph node i."""

    image_id: np.ndarray  # object array of str
    uri: np.ndarray
    listing: np.ndarray
    category: np.ndarray
    vectors: np.ndarray  # float32 [n, d], unit rows

    def __len__(self) -> int:
        return len(self.vectors)

    def groups(self, group_by: str) -> np.ndarray:
        """The group label of every node for `group_by` (none, listing, category); nulls become ''."""
        if group_by == "none":
            return np.zeros(len(self), dtype=object)
        labels = self.listing if group_by == "listing" else self.category
        return np.array(["" if v is None else v for v in labels], dtype=object)


def read_nodes(embeddings_uri: str) -> tuple[Nodes, dict[str, Any]]:
    """(Nodes, manifest) of a published embeddings stage: ok rows only, sorted by uri, vectors as float32.

    Refuses (StageError) a stage without a manifest, (SchemaError) a table that is not the embeddings
    schema, and (GraphInputError) ok rows whose vector is null, NaN/inf or all zeros, naming the uris.
    """
    table, manifest = io.read_table(embeddings_uri, STAGE)
    ok = table.filter(pc.equal(table[schemas.STATUS], schemas.OK)).sort_by(schemas.URI)
    if ok.num_rows == 0:
        raise GraphInputError(f"{embeddings_uri}: no rows with status 'ok'; nothing to build a graph from")
    nodes = Nodes(
        image_id=np.array(ok[schemas.IMAGE_ID].to_pylist(), dtype=object),
        uri=np.array(ok[schemas.URI].to_pylist(), dtype=object),
        listing=np.array(ok[schemas.LISTING].to_pylist(), dtype=object),
        category=np.array(ok[schemas.CATEGORY].to_pylist(), dtype=object),
        vectors=_usable_vectors(ok, embeddings_uri),
    )
    return nodes, manifest


def _usable_vectors(ok: pa.Table, where: str) -> np.ndarray:
    column = ok[schemas.EMBEDDING].combine_chunks()
    uris = np.asarray(ok[schemas.URI].to_pylist(), dtype=object)
    if column.null_count:
        bad = uris[np.asarray(column.is_null().to_pylist(), dtype=bool)]
        raise GraphInputError(f"{where}: {len(bad)} ok rows have no embedding, e.g. {list(bad[:3])}; "
                              "re-run the embed job")
    unit = vectors.from_arrow(column)
    finite = np.isfinite(unit).all(axis=1)
    nonzero = np.abs(unit).sum(axis=1) > 0
    for mask, what in ((finite, "NaN or infinite values"), (nonzero, "all-zero vectors")):
        if not mask.all():
            raise GraphInputError(
                f"{where}: {int((~mask).sum())} ok rows have {what}, e.g. {list(uris[~mask][:3])}; "
                "fix or re-embed those images before building the graph"
            )
    return unit
