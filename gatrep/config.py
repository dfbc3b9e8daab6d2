"""Frozen per-stage configs (validated on construction) and their dict form; gatrep.cli builds them from
defaults < a YAML file < command-line flags."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from gatrep import schemas
from gatrep.errors import UserError

if TYPE_CHECKING:
    from gatrep.categorize import Options

C = TypeVar("C")


class ConfigError(UserError, ValueError):
    """A config file or flag that cannot be turned into a stage config."""


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """The embedding stage: images -> `embeddings` table."""

    input: str = dataclasses.field(metadata={"help": "image tree or manifest (.parquet/.csv), any fsspec URI"})
    run: str = dataclasses.field(metadata={"help": "run root URI; the stage is written to <run>/<stage>"})
    stage: str = dataclasses.field(
        default=schemas.EMBEDDINGS, metadata={"help": "stage directory under --run (e.g. query-embeddings)"}
    )
    backbone: str = dataclasses.field(default="mobilenet_v2", metadata={"help": "backbone name (see --list)"})
    weights: str = dataclasses.field(
        default="default",
        metadata={"help": "'default' (explicit caches and installed weight packages), 'random', or a file"},
    )
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per backbone batch"})
    decode_batch_size: int = dataclasses.field(default=32, metadata={"help": "files per read/decode task"})
    device: str = dataclasses.field(
        default="auto",
        metadata={"help": "auto (GPU actors if the cluster has GPUs now), cuda (ask for GPUs: lets an "
                          "autoscaler add GPU nodes), or cpu"},
    )
    decode: str = dataclasses.field(
        default="auto", metadata={"help": "where JPEGs are decoded: tasks (Pillow, in CPU tasks), actor (batched in "
                                          "the backbone actor: nvJPEG on its GPU), auto (actor when the actors have "
                                          "GPUs); other formats are always decoded in the tasks"},
    )
    actors: int = dataclasses.field(
        default=0, metadata={"help": "backbone actors; 0 = one per GPU, or one on a CPU-only cluster; more actors "
                                     "than GPUs share them"}
    )
    threads_per_actor: int = dataclasses.field(
        default=0, metadata={"help": "torch threads in each CPU actor; 0 = the node's cores"}
    )
    dtype: str = dataclasses.field(default="float32", metadata={"help": "stored vectors: float32 or float16"})
    style: bool = dataclasses.field(
        default=False, metadata={"help": "also write each image's style vector (per-channel mean and standard "
                                         "deviation of the backbone's intermediate layers), for query --similarity "
                                         "style|adaptive"},
    )
    max_pixels: int = dataclasses.field(
        default=64_000_000, metadata={"help": "images with more pixels are refused as 'too_large'"}
    )
    max_bytes: int = dataclasses.field(
        default=100_000_000, metadata={"help": "files larger than this are refused as 'too_large'"}
    )
    rehash: bool = dataclasses.field(
        default=False, metadata={"help": "on a rerun, read and hash every file, also those whose size and "
                                         "modification time (or ETag) are unchanged"},
    )
    previous: str = dataclasses.field(
        default="", metadata={"help": "an embeddings stage (URI) to reuse unchanged rows from when this stage has "
                                      "none yet (jobs.reindex: the current version's); '' = none"},
    )

    def __post_init__(self) -> None:
        from gatrep import backbones

        _choose("backbone", self.backbone, backbones.names())
        if self.style:
            _check_style(self.backbone)
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device must be auto, cuda or cpu, not {self.device!r}")
        _choose("decode", self.decode, ("auto", "tasks", "actor"))
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"dtype must be float32 or float16, not {self.dtype!r}")
        for name in ("batch_size", "decode_batch_size", "max_pixels", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.actors < 0 or self.threads_per_actor < 0:
            raise ConfigError("actors and threads_per_actor must be >= 0")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict, for manifests and checkpoints."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config from `to_dict` output; refuses unknown keys by name."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err


def _choose(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Refuse (ConfigError) a value outside a registry of names, listing them."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def _check_style(backbone: str) -> None:
    """Refuse (ConfigError) --style with a backbone that has no style vectors."""
    from gatrep import backbones

    if backbone in backbones.names() and not backbones.get(backbone).style_dim:
        raise ConfigError(f"--style: {backbone} has no convolutional feature maps to take style from; "
                          f"use one of {', '.join(backbones.with_style())}")


GROUP_BY = ("none", "listing", "category")


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """The graph stage: `embeddings` -> cosine k-NN `graph` table (pynndescent, optional mutual k-NN)."""

    run: str = dataclasses.field(metadata={"help": "run root URI; reads <run>/embeddings, writes <run>/graph"})
    k: int = dataclasses.field(default=10, metadata={"help": "neighbours per node (the node itself excluded)"})
    metric: str = dataclasses.field(default="cosine", metadata={"help": "pynndescent metric: cosine or euclidean"})
    mutual: bool = dataclasses.field(
        default=False, metadata={"help": "keep only mutual neighbours (GRAD-Net eq. 8); others become -1"}
    )
    group_by: str = dataclasses.field(
        default="none", metadata={"help": "none (whole collection), listing or category: one graph per group"}
    )
    only: str | None = dataclasses.field(
        default=None, metadata={"help": "build the graph of this one listing/category (needs --group-by)"}
    )
    n_jobs: int = dataclasses.field(default=-1, metadata={"help": "pynndescent threads; -1 = all cores"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed of pynndescent and the recall sample"})
    build_k: int = dataclasses.field(
        default=0, metadata={"help": "neighbours pynndescent keeps while building; 0 = max(2k, 30) (recall)"}
    )
    exact_below: int = dataclasses.field(
        default=4096, metadata={"help": "groups with fewer nodes use exact brute-force search"}
    )
    recall_sample: int = dataclasses.field(
        default=1000, metadata={"help": "nodes whose neighbours are checked against exact search"}
    )
    update_from: str = dataclasses.field(
        default="", metadata={"help": "a graph stage (URI) of an earlier version to update instead of building "
                                      "anew: new and changed nodes get exact neighbours, the rest are repaired "
                                      "(jobs.reindex sets it); needs --group-by none and no --mutual"},
    )
    partitions: int = dataclasses.field(
        default=1, metadata={"help": "k-means cells built as separate Ray tasks and merged (gatrep.shard); "
                                     "1 = one build in the driver, 0 = chosen from the data size and cluster "
                                     "memory; needs --group-by none and no --update-from"},
    )
    overlap: int = dataclasses.field(
        default=3, metadata={"help": "with --partitions: the k-means cells each node goes to (its nearest ones); "
                                     "more finds more neighbours across cell boundaries, and costs that many builds "
                                     "of each node"},
    )
    probe: int = dataclasses.field(
        default=0, metadata={"help": "with --partitions: the nearest cells each node is searched in, its --overlap "
                                     "cells (where it is built) and the next ones (a pynndescent search of their "
                                     "index); 0 = --overlap"},
    )
    refine: int = dataclasses.field(
        default=2, metadata={"help": "with --partitions: rounds of refinement after the cells are merged, each giving "
                                     "every node the k best of its neighbours and their neighbours by exact cosine "
                                     "(finds neighbours that shared no cell with it); 0 = none"},
    )

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ConfigError(f"k must be positive, not {self.k}")
        if self.metric not in ("cosine", "euclidean"):
            raise ConfigError(f"metric must be cosine or euclidean, not {self.metric!r}")
        if self.group_by not in GROUP_BY:
            raise ConfigError(f"group_by must be one of {', '.join(GROUP_BY)}, not {self.group_by!r}")
        if self.only is not None and self.group_by == "none":
            raise ConfigError("--only needs --group-by listing or --group-by category")
        if self.build_k and self.build_k <= self.k:
            raise ConfigError(f"build_k must exceed k ({self.k}) so that the node itself can be dropped")
        if self.exact_below < 0 or self.recall_sample < 0:
            raise ConfigError("exact_below and recall_sample must be >= 0")
        if self.update_from and (self.mutual or self.group_by != "none"):
            raise ConfigError("--update-from updates a plain k-NN graph: it needs --group-by none and no --mutual")
        if self.partitions < 0:
            raise ConfigError(f"partitions must be >= 0 (0 = chosen from the data), not {self.partitions}")
        if self.refine < 0:
            raise ConfigError(f"refine must be >= 0, not {self.refine}")
        if self.overlap < 1 or self.probe and self.probe < self.overlap:
            raise ConfigError(f"overlap must be >= 1 and probe 0 or >= overlap, not {self.overlap} and {self.probe}")
        if self.partitions != 1 and (self.update_from or self.group_by != "none"):
            raise ConfigError("--partitions shards one graph of the whole collection: it needs --group-by none and "
                              "no --update-from (use --partitions 1 with those)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The graph autoencoder's settings, declared once: ModelConfig and TrainConfig both take them. The
    defaults are the paper's GAT-AE (IV-A1) on features standardised per dimension (gatrep's one change;
    `standardise=False` is the paper's model exactly)."""

    encoder: str = dataclasses.field(default="gat", metadata={"help": "gat (the paper) or sage (GraphSAGE)"})
    hidden: int = dataclasses.field(default=256, metadata={"help": "channels per head of each graph layer"})
    heads: int = dataclasses.field(default=4, metadata={"help": "attention heads of each GATConv layer"})
    latent_dim: int = dataclasses.field(default=256, metadata={"help": "size of the latent layer"})
    decoder_hidden: tuple[int, ...] = dataclasses.field(
        default=(512,), metadata={"help": "hidden sizes of the fully connected decoder, comma separated"}
    )
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the graph layers' inputs"})
    standardise: bool = dataclasses.field(
        default=True,
        metadata={"help": "scale each feature dimension to mean 0, std 1 (statistics stored with the weights); "
                          "false = the paper's GAT-AE on unit vectors"},
    )

    def __post_init__(self) -> None:
        from gatrep.models.encoders import ENCODERS

        _choose("encoder", self.encoder, sorted(ENCODERS))
        for name in ("hidden", "heads", "latent_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if any(h <= 0 for h in self.decoder_hidden):
            raise ConfigError(f"decoder_hidden sizes must be positive, not {self.decoder_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelSettings):
    """Everything that rebuilds a graph autoencoder: its settings and the input feature size."""

    in_dim: int = dataclasses.field(metadata={"help": "input feature size (the embedding dimension)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.in_dim <= 0:
            raise ConfigError(f"in_dim must be positive, not {self.in_dim}")


AUTOENCODER, CLASS_NODES, GRAD_NET = "autoencoder", "class-nodes", "grad-net"
OBJECTIVES = (AUTOENCODER, CLASS_NODES, GRAD_NET)  # what jobs.train --objective trains for
DIFFUSION_OUTPUTS = ("concat", "last")  # gatrep.models.diffusion.OUTPUTS (that module imports torch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(ModelSettings):
    """The training stage: `graph` + `embeddings` -> `model` (GAT-AE on Ray Train) and `latents`."""

    run: str = dataclasses.field(metadata={"help": "run root URI; reads graph and embeddings, writes model, latents"})
    epochs: int = dataclasses.field(default=200, metadata={"help": "passes over the seed nodes (the paper: 200)"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Adam learning rate"})
    batch_size: int = dataclasses.field(default=512, metadata={"help": "seed nodes per mini-batch and worker"})
    num_neighbors: tuple[int, ...] = dataclasses.field(
        default=(10, 10), metadata={"help": "neighbours sampled per hop, one per graph layer; -1 = all"}
    )
    workers: int = dataclasses.field(default=1, metadata={"help": "Ray Train workers (DDP processes)"})
    cpus_per_worker: int = dataclasses.field(default=1, metadata={"help": "CPUs reserved by each worker"})
    gpus_per_worker: float = dataclasses.field(default=0.0, metadata={"help": "GPUs reserved by each worker"})
    threads_per_worker: int = dataclasses.field(
        default=0, metadata={"help": "torch threads in each worker; 0 = cpus_per_worker"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the weights and the neighbour sampler"})
    max_failures: int = dataclasses.field(
        default=2, metadata={"help": "worker failures survived by resuming from the last checkpoint"}
    )
    resume: bool = dataclasses.field(
        default=True, metadata={"help": "continue from the run's last checkpoint when one exists"}
    )
    inference_batch_size: int = dataclasses.field(
        default=4096, metadata={"help": "nodes per batch when computing the context-aware latents"}
    )
    max_batches: int = dataclasses.field(
        default=0, metadata={"help": "mini-batches per epoch and worker; 0 = all (a smaller value for smoke runs)"}
    )
    checkpoint_every_s: float = dataclasses.field(
        default=60.0, metadata={"help": "seconds between checkpoints (a rerun or a failed worker resumes from the "
                                        "last one); the last epoch is always checkpointed; 0 = every epoch"},
    )
    init_from: str = dataclasses.field(
        default="", metadata={"help": "a model stage (URI) whose weights training starts from: --epochs more epochs "
                                      "of fine-tuning (jobs.reindex sets it); '' = random weights"},
    )
    objective: str = dataclasses.field(
        default=AUTOENCODER,
        metadata={"help": "autoencoder (the paper's GAT-AE: reconstruction only), class-nodes (label-aware "
                          "category nodes joined to their images: InfoNCE of each image latent against them + "
                          "--reconstruction-weight x reconstruction; needs the embeddings' category column) or "
                          "grad-net (GRAD-Net graph diffusion, unsupervised: the best measured for retrieval over the "
                          "whole index; an epoch is N sextets, the benchmark trained 10; uses --lr, --epochs, --seed, "
                          "--max-batches and the grad-net flags, its other settings are DiffusionConfig's)"},
    )
    temperature: float = dataclasses.field(
        default=0.1, metadata={"help": "class-nodes: temperature of the contrastive loss (cosines are divided by it)"}
    )
    reconstruction_weight: float = dataclasses.field(
        default=0.1, metadata={"help": "class-nodes: lambda, the weight of the reconstruction loss"}
    )
    knn_edges: bool = dataclasses.field(
        default=False, metadata={"help": "class-nodes: keep the image k-NN edges; false (the best measured, README) "
                                         "joins each image to its category node only"},
    )
    anchors: int = dataclasses.field(
        default=32, metadata={"help": "grad-net: k-means anchors each image is sparse-coded over (the bi-part graph)"}
    )
    sextets: int = dataclasses.field(default=64, metadata={"help": "grad-net: sextets per mini-batch and worker"})
    reduce: int = dataclasses.field(
        default=128, metadata={"help": "grad-net: principal components of the embeddings the network reads (0 = all)"}
    )
    diffusion_output: str = dataclasses.field(
        default="concat", metadata={"help": "grad-net: the latent: concat (the input and every layer's output, each "
                                            "unit length; the benchmark's) or last (the last layer's)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _choose("objective", self.objective, OBJECTIVES)
        for name in ("epochs", "batch_size", "workers", "cpus_per_worker", "inference_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.temperature <= 0 or self.reconstruction_weight < 0:
            raise ConfigError(f"temperature must be > 0 and reconstruction_weight >= 0, not {self.temperature} "
                              f"and {self.reconstruction_weight}")
        if not self.num_neighbors or any(n == 0 or n < -1 for n in self.num_neighbors):
            raise ConfigError(f"num_neighbors needs one value per layer, each > 0 or -1, not {self.num_neighbors}")
        if len(self.num_neighbors) != 2:
            raise ConfigError(f"the encoders have 2 graph layers: give 2 num_neighbors, not {self.num_neighbors}")
        if self.lr <= 0 or self.gpus_per_worker < 0 or self.threads_per_worker < 0 or self.max_batches < 0:
            raise ConfigError("lr must be positive; gpus_per_worker, threads_per_worker and max_batches >= 0")
        if self.checkpoint_every_s < 0:
            raise ConfigError(f"checkpoint_every_s must be >= 0, not {self.checkpoint_every_s}")
        if self.objective == GRAD_NET:
            self._check_grad_net()

    def _check_grad_net(self) -> None:
        _choose("diffusion_output", self.diffusion_output, DIFFUSION_OUTPUTS)
        if self.init_from:
            raise ConfigError("--init-from fine-tunes a graph autoencoder; --objective grad-net trains from scratch")
        if self.sextets <= 0 or self.reduce < 0:
            raise ConfigError(f"sextets must be positive and reduce >= 0, not {self.sextets} and {self.reduce}")
        try:
            self.diffusion_config(1)
        except ValueError as err:  # e.g. fewer anchors than each image is coded over
            raise ConfigError(f"--objective grad-net: {err}") from err

    def diffusion_config(self, k: int) -> Any:
        """The gatrep.models.diffusion.DiffusionConfig these flags describe over a k-NN graph of `k` neighbours:
        its defaults (the benchmark's), with --anchors, --sextets, --reduce, --diffusion-output, --lr, --epochs and
        --seed, and QFE twice (the benchmark's best)."""
        from gatrep.models.diffusion import DiffusionConfig

        return DiffusionConfig(k=k, anchors=self.anchors, sextets=self.sextets, reduce=self.reduce,
                               output=self.diffusion_output, lr=self.lr, epochs=self.epochs, seed=self.seed,
                               qfe_rounds=2)

    def model_config(self, in_dim: int) -> ModelConfig:
        """The ModelConfig these flags describe for features of size `in_dim`."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSettings)}
        return ModelConfig(in_dim=in_dim, **settings)

    @property
    def image_edges(self) -> bool:
        """Whether the model aggregates the image k-NN edges: always as an autoencoder, by --knn-edges with class
        nodes."""
        return self.objective != CLASS_NODES or self.knn_edges


INDEX_SOURCES = (schemas.LATENTS, schemas.EMBEDDINGS)  # the stages an index can be built from


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """The index stage: `latents` (or `embeddings`, for baselines) -> representatives, categories, ANN indexes."""

    run: str = dataclasses.field(metadata={"help": "run root URI; reads <run>/<input-stage>, writes <run>/<stage>"})
    source: str = dataclasses.field(
        default=schemas.LATENTS,
        metadata={"help": "latents (GAT-AE) or embeddings (raw backbone features: baselines)"},
    )
    input_stage: str = dataclasses.field(
        default="", metadata={"help": "directory of the source stage under --run; '' = the --source name"}
    )
    stage: str = dataclasses.field(
        default=schemas.INDEX,
        metadata={"help": "output directory under --run (e.g. index-clip-centroid for a baseline)"},
    )
    method: str = dataclasses.field(
        default="most_central", metadata={"help": "listing representative: most_central, centroid or degree"}
    )
    categories: str = dataclasses.field(
        default="given", metadata={"help": "given (input's categories), or discover: threshold, kmeans, dbscan"}
    )
    top_k: int = dataclasses.field(default=5, metadata={"help": "most central images stored per listing"})
    top_m: int = dataclasses.field(
        default=3, metadata={"help": "extra representatives kept per category (max / mean scoring)"}
    )
    central: str = dataclasses.field(
        default="top", metadata={"help": "the extra representatives: top (the top-m most central images) or "
                                         "kmeans (the most central image of each of top-m K-Means clusters)"}
    )
    category_threshold: float = dataclasses.field(
        default=0.8, metadata={"help": "threshold discovery: listings with cosine >= this share a category"}
    )
    n_clusters: int = dataclasses.field(default=0, metadata={"help": "kmeans discovery: number of categories"})
    dbscan_eps: float = dataclasses.field(default=0.2, metadata={"help": "dbscan discovery: cosine distance eps"})
    dbscan_min_samples: int = dataclasses.field(default=2, metadata={"help": "dbscan discovery: min_samples"})
    degree_threshold: float = dataclasses.field(
        default=0.8, metadata={"help": "degree method: edge where cosine > this"}
    )
    exact_max: int = dataclasses.field(
        default=20_000, metadata={"help": "exact pairwise work up to this many rows per group; k-NN graph above"}
    )
    merge_threshold: float = dataclasses.field(
        default=0.8, metadata={"help": "listing pairs with representative cosine >= this are merge suggestions"}
    )
    similarity_max_listings: int = dataclasses.field(
        default=2000, metadata={"help": "all listing pairs up to this many listings; top neighbours above"}
    )
    similarity_neighbours: int = dataclasses.field(
        default=10, metadata={"help": "neighbours per listing kept above --similarity-max-listings"}
    )
    ann_min_size: int = dataclasses.field(
        default=4096, metadata={"help": "categories with at least this many images get a pynndescent index"}
    )
    ann_neighbours: int = dataclasses.field(default=30, metadata={"help": "pynndescent n_neighbors"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of pynndescent and K-Means"})

    def __post_init__(self) -> None:
        from gatrep import represent

        _choose("source", self.source, INDEX_SOURCES)
        _choose("method", self.method, sorted(represent.METHODS))
        _choose("central", self.central, represent.CENTRAL)
        _choose("categories", self.categories, ("given", *sorted(represent.DISCOVERY)))
        if self.categories == "kmeans" and self.n_clusters < 1:
            raise ConfigError("--categories kmeans needs --n-clusters >= 1")
        for name in ("top_k", "top_m", "dbscan_min_samples", "similarity_neighbours", "ann_neighbours"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.exact_max < 0 or self.similarity_max_listings < 0 or self.ann_min_size < 0:
            raise ConfigError("exact_max, similarity_max_listings and ann_min_size must be >= 0")
        if not self.stage or "/" in self.stage:
            raise ConfigError(f"stage must be a plain directory name, not {self.stage!r}")


@dataclasses.dataclass(frozen=True)
class QueryConfig:
    """The query stage: query images (or an embeddings stage) -> categories and top-k matches (`results`)."""

    run: str = dataclasses.field(metadata={"help": "run root URI holding the index (and model, graph) stages"})
    input: str = dataclasses.field(
        metadata={"help": "query images (tree or manifest, any fsspec URI), or a published embeddings stage"}
    )
    index: str = dataclasses.field(
        default="index-raw", metadata={"help": "index stage directory under --run (index-raw: raw backbone features, "
                                               "the most accurate measured; index: GAT-AE latents)"})
    stage: str = dataclasses.field(default=schemas.RESULTS, metadata={"help": "output stage directory under --run"})
    scoring: str = dataclasses.field(
        default="knn",
        metadata={"help": "category score: knn (vote of the k nearest indexed images, the most accurate measured), "
                          "single (one representative), max / mean over the category's extra representatives"},
    )
    query_latent: str = dataclasses.field(
        default="context-aware",
        metadata={"help": "latent indexes only. context-aware: insert the query into the whole graph, then "
                          "categorize and retrieve (Approach I; categorizes best, see README); category-aware: "
                          "categorize context-free, then insert into the category's graph to retrieve "
                          "(Approach II); context-free: self-loops only"},
    )
    k: int = dataclasses.field(default=10, metadata={"help": "matches returned per query"})
    similarity: str = dataclasses.field(
        default="content",
        metadata={"help": "what matches are ranked by inside the chosen category: content (the index's vectors), "
                          "style (the look: needs images embedded with --style), or adaptive (high only where both "
                          "are); categorization always uses content"},
    )
    candidates: int = dataclasses.field(
        default=100, metadata={"help": "adaptive: nearest images by content and as many by style whose adaptive "
                                       "score is computed exactly (README: recall against all)"}
    )
    vote_power: float = dataclasses.field(
        default=0.0, metadata={"help": "knn scoring: each neighbour votes its cosine ** this (0 = one vote each)"}
    )
    expand: int = dataclasses.field(
        default=2, metadata={"help": "query expansion: matches are ranked for the query moved towards its "
                                     "this-many nearest indexed images (0 = off; categorization is unchanged)"}
    )
    expand_power: float = dataclasses.field(
        default=1.0, metadata={"help": "query expansion: each added image weighs its cosine ** this"}
    )
    scope: str = dataclasses.field(
        default="category", metadata={"help": "where matches come from: category (inside the chosen category, the "
                                              "paper) or all (the whole index)"}
    )
    insert_k: int = dataclasses.field(
        default=0, metadata={"help": "graph neighbours a query is inserted with; 0 = the graph's k"}
    )
    batch_size: int = dataclasses.field(default=256, metadata={"help": "queries per search batch"})
    actors: int = dataclasses.field(default=1, metadata={"help": "search actors (each holds the index)"})
    device: str = dataclasses.field(default="auto", metadata={"help": "backbone device for image queries"})
    version: str = dataclasses.field(
        default="", metadata={"help": "version of a versioned --run (vNNNN) to read; '' = the one <run>/CURRENT "
                                      "names (or the run root itself when it has no versions)"},
    )

    def __post_init__(self) -> None:
        from gatrep.categorize import SCOPES, SCORINGS, SIMILARITIES
        from gatrep.models.query_latents import LATENT_MODES

        _choose("scoring", self.scoring, SCORINGS)
        _choose("query_latent", self.query_latent, list(LATENT_MODES))
        _choose("similarity", self.similarity, SIMILARITIES)
        _choose("scope", self.scope, SCOPES)
        for name in ("k", "candidates", "batch_size", "actors"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("vote_power", "expand", "expand_power"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.similarity == "adaptive" and self.scope == "all":
            raise ConfigError("--similarity adaptive ranks inside a category: use it with --scope category")

    def options(self) -> Options:
        """The categorize.Options these flags describe."""
        from gatrep.categorize import Options

        return Options(self.vote_power, self.expand, self.expand_power, self.scope)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation stage: results stages of labelled queries -> one table with every method side by side."""

    run: str = dataclasses.field(metadata={"help": "run root URI holding the results stages"})
    results: tuple[str, ...] = dataclasses.field(
        default=(schemas.RESULTS,), metadata={"help": "results stage directories under --run, comma separated"}
    )
    k: int = dataclasses.field(default=10, metadata={"help": "retrieval cut-off for precision/recall/mAP@k"})
    stage: str = dataclasses.field(default=schemas.EVALUATION, metadata={"help": "output stage directory under --run"})
    version: str = dataclasses.field(
        default="", metadata={"help": "version of a versioned --run (vNNNN) to read; '' = the one <run>/CURRENT "
                                      "names (or the run root itself when it has no versions)"},
    )

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ConfigError(f"k must be positive, not {self.k}")
        if not self.results:
            raise ConfigError("name at least one results stage")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The report: a run's stages -> one self-contained static HTML page, every section sampled and bounded."""

    run: str = dataclasses.field(metadata={"help": "run root URI whose stages the report shows"})
    index: str = dataclasses.field(default=schemas.INDEX, metadata={"help": "index stage directory under --run"})
    results: str = dataclasses.field(
        default=schemas.RESULTS,
        metadata={"help": "results stage under --run whose queries are sampled; when the default is absent, the "
                          "evaluated results stage searched in --index"},
    )
    evaluation: str = dataclasses.field(default=schemas.EVALUATION, metadata={"help": "evaluation stage under --run"})
    embeddings: str = dataclasses.field(
        default="", metadata={"help": "embeddings stage under --run; '' = the index's source, else embeddings"}
    )
    latents: str = dataclasses.field(
        default=schemas.LATENTS, metadata={"help": "latents stage under --run (the 2-D map)"}
    )
    model: str = dataclasses.field(default=schemas.MODEL, metadata={"help": "model stage under --run (the loss curve)"})
    out: str = dataclasses.field(default="", metadata={"help": "output HTML URI; '' = <run>/report/index.html"})
    categories: int = dataclasses.field(default=40, metadata={"help": "categories shown in full (the largest)"})
    listings_per_category: int = dataclasses.field(
        default=6, metadata={"help": "listing representatives shown per category (the largest listings)"}
    )
    central: int = dataclasses.field(default=5, metadata={"help": "most central images shown per category"})
    queries: int = dataclasses.field(default=24, metadata={"help": "queries sampled (half misclassified if any)"})
    matches: int = dataclasses.field(default=5, metadata={"help": "matches shown per sampled query"})
    looks: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "results stages under --run of the same queries whose matches are shown side "
                                      "by side, comma separated (e.g. by content, style and adaptive similarity)"},
    )
    look_queries: int = dataclasses.field(default=8, metadata={"help": "queries sampled for --looks"})
    map_points: int = dataclasses.field(default=2000, metadata={"help": "latents sampled for the 2-D map"})
    map_method: str = dataclasses.field(default="tsne", metadata={"help": "2-D map projection: tsne or pca"})
    similarity_listings: int = dataclasses.field(
        default=30, metadata={"help": "full listing similarity matrix up to this many listings; top pairs above"}
    )
    pairs: int = dataclasses.field(default=30, metadata={"help": "listing pairs / merge suggestions shown"})
    classes: int = dataclasses.field(
        default=30, metadata={"help": "confusion matrix and per-class rows up to this many classes"}
    )
    bad_examples: int = dataclasses.field(default=3, metadata={"help": "examples shown per bad-input status"})
    table_rows: int = dataclasses.field(default=1000, metadata={"help": "rows of the all-categories table"})
    thumb_px: int = dataclasses.field(default=96, metadata={"help": "thumbnail side in pixels (square crop)"})
    thumb_quality: int = dataclasses.field(default=75, metadata={"help": "thumbnail JPEG quality"})
    max_thumbnail_mb: float = dataclasses.field(
        default=8.0, metadata={"help": "total thumbnail budget; images past it become placeholders"}
    )
    max_image_bytes: int = dataclasses.field(
        default=50_000_000, metadata={"help": "images larger than this are not read for a thumbnail"}
    )
    max_pixels: int = dataclasses.field(
        default=64_000_000, metadata={"help": "images with more pixels are not decoded for a thumbnail"}
    )
    threads: int = dataclasses.field(default=8, metadata={"help": "threads reading images for thumbnails"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of every sample the report draws"})
    version: str = dataclasses.field(
        default="", metadata={"help": "version of a versioned --run (vNNNN) to read; '' = the one <run>/CURRENT "
                                      "names (or the run root itself when it has no versions)"},
    )

    def __post_init__(self) -> None:
        from gatrep.report.charts import MAP_METHODS

        _choose("map_method", self.map_method, MAP_METHODS)
        for name in ("categories", "listings_per_category", "central", "queries", "matches", "map_points",
                     "similarity_listings", "pairs", "classes", "bad_examples", "table_rows", "thumb_px", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 16 <= self.thumb_px <= 512 or not 1 <= self.thumb_quality <= 95:
            raise ConfigError("thumb_px must be in 16..512 and thumb_quality in 1..95")
        if self.max_thumbnail_mb < 0 or self.max_image_bytes <= 0 or self.max_pixels <= 0:
            raise ConfigError("max_thumbnail_mb must be >= 0; max_image_bytes and max_pixels positive")
        for name in ("index", "results", "evaluation", "latents", "model"):
            if not getattr(self, name) or "/" in getattr(self, name):
                raise ConfigError(f"{name} must be a plain stage directory name, not {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every stage in order on one labelled input; without --input, scikit-learn's digits demo."""

    input: str = dataclasses.field(
        default="", metadata={"help": "labelled image tree or manifest to index; '' = scikit-learn's digits written "
                                      "as an image tree under <run>/inputs (80%% indexed)"})
    queries: str = dataclasses.field(
        default="", metadata={"help": "labelled query images (never indexed); with the demo, the held-out 20%% of "
                                      "the digits; '' otherwise = no query and evaluate stages"})
    run: str = dataclasses.field(default="runs/demo", metadata={"help": "run root URI"})
    backbone: str = dataclasses.field(default="mobilenet_v2", metadata={"help": "backbone name (jobs.embed --list)"})
    weights: str = dataclasses.field(default="default", metadata={"help": "'default', 'random' or a weights file"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cuda or cpu (see jobs.embed --help)"})
    k: int = dataclasses.field(default=10, metadata={"help": "k-NN graph degree and matches per query"})
    epochs: int = dataclasses.field(default=200, metadata={"help": "GAT-AE training epochs (the paper: 200)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the autoencoder's weights and sampler"})
    hog: bool = dataclasses.field(default=True, metadata={"help": "also index and query the HOG baseline"})
    methods: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "the methods to query and evaluate, comma separated, named as in the evaluation "
                                      "table (index/knn/context-aware,index-raw/knn); '' = all of them"})
    style: bool = dataclasses.field(
        default=False, metadata={"help": "also embed style vectors, query index-raw/knn with retrieval by style and by "
                                         "the adaptive score, and show the three side by side in the report"})

    def __post_init__(self) -> None:
        if self.style:
            _check_style(self.backbone)
        if self.queries and not self.input:
            raise ConfigError("--queries needs --input (the demo brings its own queries)")
        if self.methods and self.input and not self.queries:
            raise ConfigError("--methods chooses which methods are queried: it needs --queries")
        if self.k <= 0 or self.epochs <= 0:
            raise ConfigError("k and epochs must be positive")


@dataclasses.dataclass(frozen=True)
class ReindexConfig:
    """The nightly re-index: images -> a new complete version of the run root, published by switching its
    CURRENT pointer last; only what changed since the current version is recomputed."""

    run: str = dataclasses.field(metadata={"help": "run root URI holding versions/ and the CURRENT pointer"})
    input: str = dataclasses.field(
        default="", metadata={"help": "image tree or manifest (any fsspec URI); required unless --rollback"})
    backbone: str = dataclasses.field(default="mobilenet_v2", metadata={"help": "backbone name (jobs.embed --list)"})
    weights: str = dataclasses.field(default="default", metadata={"help": "'default', 'random' or a weights file"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cuda or cpu (see jobs.embed --help)"})
    style: bool = dataclasses.field(
        default=False, metadata={"help": "also write style vectors (jobs.embed --style), for query --similarity "
                                         "style|adaptive; switching it re-embeds every image"})
    k: int = dataclasses.field(default=10, metadata={"help": "k-NN graph degree"})
    epochs: int = dataclasses.field(default=200, metadata={"help": "training epochs of a new model (the paper: 200)"})
    fine_tune_epochs: int = dataclasses.field(
        default=20, metadata={"help": "epochs of fine-tuning the current version's model on the new graph"})
    fine_tune_lr: float = dataclasses.field(
        default=1e-4, metadata={"help": "Adam learning rate of the fine-tuning; a tenth of training's (1e-3), since "
                                        "Adam starts without its state and its first steps are full-size"})
    retrain: bool = dataclasses.field(
        default=False, metadata={"help": "train a new model for --epochs instead of fine-tuning the current one"})
    rebuild_above: float = dataclasses.field(
        default=0.1, metadata={"help": "share of images new, changed or removed since the current version past "
                                       "which the graph is rebuilt (pynndescent) instead of updated (exact search "
                                       "of the changed nodes, cost ~ changed x all)"})
    max_shrink: float = dataclasses.field(
        default=0.2, metadata={"help": "refuse to publish when the input has lost more than this share of the "
                                       "current version's files (an empty bucket, a wrong prefix)"})
    allow_shrink: bool = dataclasses.field(
        default=False, metadata={"help": "publish even when the input shrank past --max-shrink"})
    keep: int = dataclasses.field(default=3, metadata={"help": "complete versions kept (the current one always)"})
    rollback: bool = dataclasses.field(
        default=False, metadata={"help": "point CURRENT back to the previous complete version, and do nothing else"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of pynndescent, the weights and the sampler"})

    def __post_init__(self) -> None:
        if self.style:
            _check_style(self.backbone)
        if not self.input and not self.rollback:
            raise ConfigError("--input is required (unless --rollback)")
        if self.k <= 0 or self.epochs <= 0 or self.fine_tune_epochs <= 0 or self.fine_tune_lr <= 0 or self.keep < 1:
            raise ConfigError("k, epochs, fine_tune_epochs and fine_tune_lr must be positive, keep at least 1")
        if not 0 <= self.rebuild_above <= 1 or not 0 <= self.max_shrink <= 1:
            raise ConfigError("rebuild_above and max_shrink are shares between 0 and 1")


@dataclasses.dataclass(frozen=True)
class CategorizeConfig:
    """Bulk categorization of new uploads against the current version of a run root."""

    input: str = dataclasses.field(metadata={"help": "the uploads: image tree or manifest, any fsspec URI"})
    run: str = dataclasses.field(metadata={"help": "run root URI (versioned by jobs.reindex, or a pipeline run)"})
    version: str = dataclasses.field(
        default="", metadata={"help": "version to categorize against; '' = the one <run>/CURRENT names"})
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder URI (embeddings and categorized stages); "
                                      "'' = <run>/categorized/<the input's last path part>"})
    index: str = dataclasses.field(
        default="index-raw", metadata={"help": "index stage to categorize with (index-raw: raw backbone features, "
                                               "the most accurate measured; index: GAT-AE latents)"})
    scoring: str = dataclasses.field(
        default="knn", metadata={"help": "category score: knn (vote of the k nearest indexed images, the most "
                                         "accurate measured), single, max or mean (see jobs.query --help)"})
    k: int = dataclasses.field(default=10, metadata={"help": "neighbours voting (knn)"})
    min_confidence: float = dataclasses.field(
        default=0.2, metadata={"help": "uploads whose two best category scores are closer than this need review "
                                       "(vote shares for knn, cosines otherwise)"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "uploads per search batch"})
    actors: int = dataclasses.field(default=1, metadata={"help": "search actors (each holds the index)"})
    device: str = dataclasses.field(default="auto", metadata={"help": "backbone device: auto, cuda or cpu"})

    def __post_init__(self) -> None:
        from gatrep.categorize import SCORINGS

        _choose("scoring", self.scoring, SCORINGS)
        for name in ("k", "batch_size", "actors"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.min_confidence < 0:
            raise ConfigError(f"min_confidence must be >= 0, not {self.min_confidence}")
