"""The train stage on Ray Train: `graph` + `embeddings` -> the `model` stage (GAT-AE, or with `--objective
class-nodes` the GAT-AE with label-aware category nodes, or with `--objective grad-net` GRAD-Net diffusion; sampled
mini-batches, DDP, checkpoints) and the `latents` stage; also the reader of a published model."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import posixpath
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import safetensors.torch
import torch
import torch.distributed as dist

from gatrep import io, models, sampling, schemas, stages, vectors
from gatrep.config import CLASS_NODES, GRAD_NET, ConfigError, ModelConfig, TrainConfig, to_dict
from gatrep.errors import UserError
from gatrep.knn import GraphInputError
from gatrep.models import classnodes, diffusion
from gatrep.models.classnodes import CategoryNodes, ClassGraph, ClassNodeModel
from gatrep.models.diffusion import DiffusionConfig
from gatrep.models.epoch import LossFn, reconstruction_loss, train_epoch
from gatrep.stages.embed import read_nodes
from gatrep.stages.graph import read_graph
from gatrep.vectors import PAD

NAME = "train"
CONFIG = TrainConfig
DESCRIPTION = "Train the graph autoencoder (or its class nodes) on <--run>/graph; write model and latents."
LINEAGE_FILE = "_lineage.json"  # beside the checkpoints: the inputs and settings they were trained with
RUN_NAME = "train"  # Ray Train run name inside the checkpoint storage; a rerun with the same name resumes
METRICS_FILE = schemas.METRICS_FILE
OPTIMIZER_FILE = "optimizer.pt"


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint in the run's storage that was written for another model config."""


@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """Everything training reads, in graph order: graph row i is training node i."""

    node: np.ndarray  # global node ids (rows of the embeddings' ok rows sorted by uri)
    image_id: np.ndarray
    listing: np.ndarray
    category: np.ndarray
    features: np.ndarray  # float32 [n, d]
    neighbours: np.ndarray  # int64 [n, k], local ids 0..n-1, PAD where none
    similarities: np.ndarray  # float32 [n, k], the graph's cosines (NaN where PAD)
    upstream: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Inputs


def load_inputs(run: str) -> TrainInputs:
    """The graph and the features of its nodes from `<run>/graph` and `<run>/embeddings`.

    Refuses (StageError / SchemaError / GraphInputError) a stage without a manifest or with the wrong
    schema, bad vectors, and a graph that was built from other embeddings than those now published."""
    graph_uri, embeddings_uri = io.join(run, schemas.GRAPH), io.join(run, schemas.EMBEDDINGS)
    graph = read_graph(graph_uri)
    nodes, embeddings_manifest = read_nodes(embeddings_uri)
    built_from = graph.manifest.get("upstream", {}).get(schemas.EMBEDDINGS, {})
    if not io.is_current(built_from, embeddings_manifest) or graph.node.max() >= len(nodes):
        raise GraphInputError(
            f"{graph_uri} was built from embeddings published {built_from.get('created')}, but {embeddings_uri} "
            f"now holds those published {embeddings_manifest['created']}; rebuild the graph "
            f"(python -m jobs.graph --run {run})")
    if not np.array_equal(nodes.image_id[graph.node], graph.image_id):
        raise GraphInputError(f"{graph_uri}: image ids differ from {embeddings_uri}; rebuild the graph")
    padded = graph.neighbours == PAD
    local = np.searchsorted(graph.node, np.where(padded, graph.node[0], graph.neighbours))
    return TrainInputs(
        node=graph.node, image_id=graph.image_id, listing=nodes.listing[graph.node],
        category=nodes.category[graph.node], features=np.ascontiguousarray(nodes.vectors[graph.node]),
        neighbours=np.where(padded, PAD, local).astype(np.int64), similarities=graph.similarities,
        upstream={schemas.GRAPH: io.upstream_of(graph.manifest, graph_uri),
                  schemas.EMBEDDINGS: io.upstream_of(embeddings_manifest, embeddings_uri)},
    )


def check_size(inputs: TrainInputs, cfg: TrainConfig) -> None:
    """Refuse (GraphInputError) fewer nodes than workers: each worker needs at least one seed node."""
    if len(inputs.node) < cfg.workers:
        raise GraphInputError(f"{len(inputs.node)} graph nodes cannot be shared by {cfg.workers} workers")


def training_neighbours(inputs: TrainInputs, cfg: TrainConfig) -> np.ndarray:
    """The neighbour table the model aggregates over: the graph's, or all PAD (each image sees itself only) for
    class nodes without --knn-edges."""
    return inputs.neighbours if cfg.image_edges else np.full_like(inputs.neighbours, PAD)


def class_graph(inputs: TrainInputs, cfg: TrainConfig) -> ClassGraph | None:
    """The image + category-node graph of `--objective class-nodes` (None for the autoencoder): one category node per
    distinct category of the embeddings' category column; rows without one are unlabelled image nodes.

    Refuses (io.InputError) a run whose images carry no category, or only one (the contrastive loss needs another
    category to push away from)."""
    if cfg.objective != CLASS_NODES:
        return None
    where = io.join(cfg.run, schemas.EMBEDDINGS)
    labelled = sum(c is not None for c in inputs.category)
    if labelled == 0:
        raise io.InputError(f"--objective class-nodes needs categories, but no image of {where} has one; give the "
                            "input a category per image (a <root>/<category>/... tree, or a manifest's category "
                            "column) or train with --objective autoencoder")
    try:
        return classnodes.build_class_graph(training_neighbours(inputs, cfg), inputs.category)
    except ValueError as err:
        raise io.InputError(f"--objective class-nodes on {where} ({labelled} images with a category): {err}") from err


def class_settings(cfg: TrainConfig) -> classnodes.ClassNodeSettings:
    """The class-node settings these flags describe."""
    return classnodes.ClassNodeSettings(
        temperature=cfg.temperature, reconstruction_weight=cfg.reconstruction_weight, epochs=cfg.epochs, lr=cfg.lr,
        batch_size=cfg.batch_size, num_neighbors=cfg.num_neighbors, seed=cfg.seed,
        inference_batch_size=cfg.inference_batch_size)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_storage(run: str) -> str:
    """Where Ray Train keeps this run's checkpoints: `<run>/model/_checkpoints` (kept across reruns).

    Absolute, since Ray Train refuses a relative path (`--run runs/demo`) as its storage_path.
    """
    return io.full_uri(*io.url_to_fs(io.join(run, schemas.MODEL, "_checkpoints")))


# Training settings a checkpoint is only valid for (with the graph and embeddings it was trained on); --epochs may
# grow between runs (a rerun trains on from the last checkpoint), and how many workers share the work may change.
LINEAGE_SETTINGS = ("seed", "lr", "batch_size", "num_neighbors", "init_from", "max_batches")
CLASS_NODE_SETTINGS = ("objective", "temperature", "reconstruction_weight", "knn_edges")  # with class nodes only
GRAD_NET_SETTINGS = ("objective", "sextets")  # with grad-net (its --anchors, --reduce: the model config)
OBJECTIVE_SETTINGS = {CLASS_NODES: CLASS_NODE_SETTINGS, GRAD_NET: GRAD_NET_SETTINGS}


def lineage(cfg: TrainConfig, inputs: TrainInputs) -> dict[str, Any]:
    """What the run's checkpoints are valid for: the inputs and the training settings (the autoencoder's record is
    the one it always was, so its existing checkpoints stay valid)."""
    names = LINEAGE_SETTINGS + OBJECTIVE_SETTINGS.get(cfg.objective, ())
    return {"upstream": inputs.upstream, "train": {k: getattr(cfg, k) for k in names}}


def model_identity(model_cfg: ModelConfig | DiffusionConfig | dict[str, Any]) -> dict[str, Any]:
    """The config a checkpoint must have been written for, JSON form: all of it, but a DiffusionConfig's epochs
    (how long to train, which a rerun may raise, as for the autoencoder)."""
    values = model_cfg if isinstance(model_cfg, dict) else to_dict(model_cfg)
    identity = json.loads(json.dumps(values))  # tuples as lists, as they are in the file
    if "sextets" in identity:  # a DiffusionConfig's
        identity.pop("epochs")
    return identity


def check_checkpoints(storage: str, model_cfg: ModelConfig | DiffusionConfig, resume: bool,
                      lineage: dict[str, Any]) -> int:
    """The last checkpointed epoch in `storage` (0 if none), after removing them all when `resume` is False or
    they were trained on other inputs or settings than `lineage` says (printing why); `lineage` is then recorded.

    Raises CheckpointMismatch, naming the checkpoint and the fields that differ, when the checkpoints
    were written for another model config, before anything runs or is written."""
    fs, path = io.url_to_fs(io.join(storage, RUN_NAME))
    record = posixpath.join(io.url_to_fs(storage)[1], LINEAGE_FILE)
    wanted_lineage = json.loads(json.dumps(lineage))
    stale = fs.exists(path) and (not fs.exists(record) or json.loads(fs.cat_file(record)) != wanted_lineage)
    if stale and resume:
        print(f"{storage}: the checkpoints there were trained on other inputs or settings; training starts over",
              flush=True)
    if (not resume or stale) and fs.exists(path):
        fs.rm(path, recursive=True)
    configs = sorted(fs.glob(posixpath.join(path, "checkpoint_*", models.CONFIG_FILE)))
    if not configs:
        fs.makedirs(posixpath.dirname(record), exist_ok=True)
        fs.pipe_file(record, json.dumps(wanted_lineage, sort_keys=True).encode())
        return 0
    document = json.loads(fs.cat_file(configs[-1]))
    saved = model_identity(document.get("model", {}))
    wanted = model_identity(model_cfg)
    differ = sorted(k for k in wanted.keys() | saved.keys() if wanted.get(k) != saved.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, asked {wanted.get(k)!r}" for k in differ)
        raise CheckpointMismatch(
            f"{posixpath.dirname(configs[-1])} was trained with another model config ({details}); "
            "pass --resume false to start over, or train into another --run")
    return int(document.get("epoch", 0))


def _save_checkpoint(directory: str, model: torch.nn.Module, model_cfg: ModelConfig, graph: ClassGraph | None,
                     optimizer: torch.optim.Optimizer, epoch: int, history: list[dict[str, Any]]) -> None:
    module = getattr(model, "module", model)
    models.save_model(getattr(module, "autoencoder", module), model_cfg, directory, extra={"epoch": epoch})
    if graph is not None:
        classnodes.save_category_nodes(CategoryNodes.of(module, graph.names), directory)
    _save_progress(directory, optimizer, history)


def _save_progress(directory: str, optimizer: torch.optim.Optimizer, history: list[dict[str, Any]]) -> None:
    """The optimizer's state and the metrics so far, beside a checkpoint's weights."""
    torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)


def _read_progress(directory: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metrics so far, optimizer state) saved by _save_progress."""
    optimizer_state = torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True)
    with open(os.path.join(directory, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()], optimizer_state


def _restore(checkpoint: ray.train.Checkpoint | None, model: torch.nn.Module,
             model_cfg: ModelConfig) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """(epochs done, metrics so far, optimizer state) from a checkpoint, weights (and a ClassNodeModel's category
    features) loaded into `model`."""
    if checkpoint is None:
        return 0, [], None
    with checkpoint.as_directory() as directory:
        loaded, saved_cfg = models.load_model(directory)
        if saved_cfg != model_cfg:
            raise CheckpointMismatch(f"{directory}: checkpoint of {saved_cfg}, not of {model_cfg}")
        getattr(model, "autoencoder", model).load_state_dict(loaded.state_dict())
        if isinstance(model, ClassNodeModel):
            model.class_features.data.copy_(torch.from_numpy(classnodes.load_category_nodes(directory).features))
        with open(os.path.join(directory, models.CONFIG_FILE)) as f:
            epoch = json.load(f)["epoch"]
        history, optimizer_state = _read_progress(directory)
    return int(epoch), history, optimizer_state


# ----------------------------------------------------------------------------------------------
# The per-worker loop


def seed_shard(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This worker's seed nodes for `epoch`: a shuffle shared by all workers, cut into equal strided shares.

    Equal shares keep every worker at the same number of batches, which DDP needs; the up to world - 1
    nodes left over change from epoch to epoch with the shuffle."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    return order[: (n // world) * world][rank::world]


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays from the object store are read-only views of shared memory: wrapping them without a copy
    # is the point, and nothing writes to them, so torch's non-writable warning does not apply.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _mean_loss(stats_loss: float, seeds: int, device: torch.device) -> float:
    totals = torch.tensor([stats_loss * seeds, float(seeds)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def _worker_graph(loop: dict[str, Any], neighbours: torch.Tensor) -> ClassGraph | None:
    """The class-node graph over the shared neighbour table (None for the autoencoder)."""
    if loop["category"] is None:
        return None
    return ClassGraph(neighbours, _shared_tensor(ray.get(loop["category"])), np.asarray(loop["names"], dtype=object))


def _new_model(loop: dict[str, Any], features: torch.Tensor, graph: ClassGraph | None,
               checkpoint: ray.train.Checkpoint | None) -> torch.nn.Module:
    """The worker's model before restoring a checkpoint: seeded, scaling fitted, the --init-from weights loaded,
    and for class nodes the category features at the mean of their images."""
    torch.manual_seed(loop["train"].seed)
    model = models.build_model(loop["model"])
    if loop["model"].standardise:  # every worker computes the same statistics from the same shared features
        model.fit_scaling(features)
    if checkpoint is None and loop["init"] is not None:
        model.load_state_dict(safetensors.torch.load(loop["init"]))  # fine-tuning: the earlier model's weights
    if graph is None:
        return model
    return ClassNodeModel(model, classnodes.mean_features(model, features, graph))


def _loss_fn(cfg: TrainConfig, graph: ClassGraph | None) -> LossFn:
    """The mini-batch loss: reconstruction, or for class nodes [total, contrastive, reconstruction]."""
    if graph is None:
        return reconstruction_loss
    return functools.partial(classnodes.batch_losses, graph=graph, settings=class_settings(cfg))


TERMS = ("contrastive", "reconstruction")  # the terms of the class-node loss, as metrics.jsonl names them


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train worker: restore, then per epoch sample this worker's share and step; report and checkpoint
    every `checkpoint_every_s` seconds and after the last epoch."""
    cfg: TrainConfig = loop["train"]
    model_cfg: ModelConfig = loop["model"]
    torch.set_num_threads(cfg.threads_per_worker or cfg.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    features = _shared_tensor(ray.get(loop["features"]))
    neighbours = _shared_tensor(ray.get(loop["neighbours"]))
    graph = _worker_graph(loop, neighbours)
    checkpoint = ray.train.get_checkpoint()
    model = _new_model(loop, features, graph, checkpoint)
    start, history, optimizer_state = _restore(checkpoint, model, model_cfg)
    ddp_model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=cfg.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    terms = () if graph is None else TERMS
    last_checkpoint = time.monotonic()
    for epoch in range(start, cfg.epochs):
        seeds = seed_shard(len(features), epoch, cfg.seed, rank, world)
        loader = sampling.make_loader(features, neighbours, seeds, cfg.num_neighbors, cfg.batch_size,
                                      seed=_sampler_seed(cfg.seed, epoch, rank, world))
        stats = train_epoch(ddp_model, optimizer, loader, device, cfg.max_batches, _loss_fn(cfg, graph))
        record = {"epoch": epoch + 1, "loss": _mean_loss(stats.loss, stats.seeds, device),
                  **{name: _mean_loss(t, stats.seeds, device) for name, t in zip(terms, stats.terms, strict=True)},
                  "seconds": round(stats.seconds, 3), "batches_per_worker": stats.batches,
                  "seeds": stats.seeds * world, "resumed": epoch == start and start > 0}
        history.append(record)
        save = functools.partial(_save_checkpoint, model=ddp_model, model_cfg=model_cfg, graph=graph,
                                 optimizer=optimizer, epoch=record["epoch"], history=history)
        last_checkpoint = _end_epoch(loop, record, rank, device, last_checkpoint, save)


def _sampler_seed(seed: int, epoch: int, rank: int, world: int) -> int:
    """The seed of a worker's sampler in an epoch: distinct for every (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch) * world + rank


def _end_epoch(loop: dict[str, Any], record: dict[str, Any], rank: int, device: torch.device,
               last_checkpoint: float, save: Callable[[str], None]) -> float:
    """After an epoch (its `record` already in the history): print it, maybe fail (tests), and report it with a
    checkpoint written by `save` (into a directory) when due; returns the time of the last checkpoint."""
    cfg: TrainConfig = loop["train"]
    if rank == 0:
        _say(f"Epoch {record['epoch']}/{cfg.epochs} Loss: {record['loss']:.6f} ({record['seconds']:.1f} s"
             + (", resumed from checkpoint" if record["resumed"] else "") + ")")
    _maybe_fail(loop.get("fail_once"), record["epoch"], rank)
    due = record["epoch"] == cfg.epochs or time.monotonic() - last_checkpoint >= cfg.checkpoint_every_s
    if not _agree(due, device):
        return last_checkpoint
    _checkpoint(record, rank, save)
    return time.monotonic()


def grad_net_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train worker of --objective grad-net: restore, then per epoch draw this worker's sextets (seeded by
    rank and epoch) and step on their BFS subgraphs (DDP averages the gradients); report and checkpoint as the
    autoencoder does. An epoch is about N sextets over all workers."""
    cfg: TrainConfig = loop["train"]
    model_cfg: DiffusionConfig = loop["model"]
    torch.set_num_threads(cfg.threads_per_worker or cfg.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    graph = diffusion.Graph(*(_shared_tensor(array) for array in ray.get(list(loop["graph"]))))
    torch.manual_seed(model_cfg.seed)
    net = diffusion.build_net(graph.inputs.shape[1], model_cfg)
    start, history, optimizer_state = _restore_grad_net(ray.train.get_checkpoint(), net, model_cfg)
    ddp_net = ray.train.torch.prepare_model(net)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(ddp_net.parameters(), lr=cfg.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    steps = diffusion.steps_per_epoch(len(graph.inputs), model_cfg.sextets, world)
    steps = min(steps, cfg.max_batches) if cfg.max_batches else steps
    last_checkpoint = time.monotonic()
    for epoch in range(start, cfg.epochs):
        generator = torch.Generator().manual_seed(_sampler_seed(cfg.seed, epoch, rank, world))
        began = time.perf_counter()
        ddp_net.train()
        losses = [diffusion.train_step(ddp_net, graph, optimizer, model_cfg, generator, device) for _ in range(steps)]
        record = {"epoch": epoch + 1, "loss": _mean_loss(float(np.mean(losses)), steps, device),
                  "seconds": round(time.perf_counter() - began, 3), "batches_per_worker": steps,
                  "sextets": steps * model_cfg.sextets * world, "resumed": epoch == start and start > 0}
        history.append(record)
        save = functools.partial(_save_grad_net_checkpoint, net=ddp_net, model_cfg=model_cfg,
                                 fitted=loop["fitted"], optimizer=optimizer, epoch=record["epoch"], history=history)
        last_checkpoint = _end_epoch(loop, record, rank, device, last_checkpoint, save)


def _save_grad_net_checkpoint(directory: str, net: torch.nn.Module, model_cfg: DiffusionConfig,
                              fitted: diffusion.Fitted, optimizer: torch.optim.Optimizer, epoch: int,
                              history: list[dict[str, Any]]) -> None:
    diffusion.save_grad_net(directory, net, model_cfg, fitted, extra={"epoch": epoch})
    _save_progress(directory, optimizer, history)


def _restore_grad_net(checkpoint: ray.train.Checkpoint | None, net: torch.nn.Module, model_cfg: DiffusionConfig,
                      ) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """(epochs done, metrics so far, optimizer state) from a GRAD-Net checkpoint, its weights loaded into `net`."""
    if checkpoint is None:
        return 0, [], None
    with checkpoint.as_directory() as directory:
        saved = diffusion.load_grad_net(directory)
        if model_identity(saved.config) != model_identity(model_cfg):
            raise CheckpointMismatch(f"{directory}: checkpoint of {saved.config}, not of {model_cfg}")
        net.load_state_dict(saved.net.state_dict())
        history, optimizer_state = _read_progress(directory)
    return int(saved.document["epoch"]), history, optimizer_state


def _say(line: str) -> None:
    """One line on the worker's stdout. Ray Train replaces `print` in its workers with one that logs the line and,
    since Ray wraps the worker's stdout, prints it as well: every line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _agree(due: bool, device: torch.device) -> bool:
    """Rank 0's `due` on every worker: ray.train.report is a collective that all ranks must call together, and
    each worker's clock would decide differently."""
    flag = torch.tensor([due], dtype=torch.uint8, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _checkpoint(record: dict[str, Any], rank: int, save: Callable[[str], None]) -> None:
    """Report `record`; rank 0 saves the checkpoint (weights, category nodes or PCA and anchors, optimizer, the
    history so far) with it, by `save` into a directory."""
    name = f"checkpoint_epoch_{record['epoch']:06d}"
    if rank != 0:
        ray.train.report(record, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)


def _maybe_fail(fail_once: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Fault injection for tests: kill this worker process once, at the given epoch and rank."""
    if not fail_once or fail_once["epoch"] != epoch or fail_once["rank"] != rank:
        return
    if os.path.exists(fail_once["marker"]):
        return
    open(fail_once["marker"], "w").close()
    # Ray Train's controller registers reported checkpoints when it next polls the workers: a worker killed
    # sooner after a report would take that report with it, so wait until the earlier reports are in.
    ray.train.get_all_reported_checkpoints(timeout_s=60)
    os._exit(1)  # a hard kill, like an OOM-killed or preempted worker: no exception handling runs


# ----------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass(frozen=True)
class Shared:
    """Object-store references to the features and the neighbour table the model aggregates over, put there once
    per run; for class nodes also each image's category node (PAD: unlabelled) and the categories' names."""

    features: ray.ObjectRef
    neighbours: ray.ObjectRef
    category: ray.ObjectRef | None = None
    names: tuple[str, ...] = ()


def share(inputs: TrainInputs, cfg: TrainConfig, graph: ClassGraph | None) -> Shared:
    """Put features and neighbours (and category nodes) in the object store (workers on a node then map one
    shared copy)."""
    shared = Shared(ray.put(inputs.features), ray.put(training_neighbours(inputs, cfg)))
    if graph is None:
        return shared
    return dataclasses.replace(shared, category=ray.put(graph.category.numpy()), names=tuple(graph.names))


def fit(cfg: TrainConfig, shared: Shared, model_cfg: ModelConfig, storage: str,
        fail_once: dict[str, Any] | None = None, init: bytes | None = None) -> ray.train.Result:
    """Run Ray Train's TorchTrainer (DDP) over the shared features and neighbour table; returns its Result.

    Features and the neighbour table go to the object store once; workers on a node map the same
    shared memory instead of each holding a copy. `init` (safetensors bytes) are the starting weights when
    there is no checkpoint yet; `fail_once` (tests) kills one worker once."""
    loop = {"train": cfg, "model": model_cfg, "fail_once": fail_once, "init": init,
            "features": shared.features, "neighbours": shared.neighbours, "category": shared.category,
            "names": shared.names}
    return _trainer(cfg, train_loop_per_worker, loop, storage).fit()


def _trainer(cfg: TrainConfig, loop_fn: Callable[[dict[str, Any]], None], loop: dict[str, Any],
             storage: str) -> Any:
    """The TorchTrainer running `loop_fn(loop)` on cfg.workers workers, checkpoints (the last 2) in `storage`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    return TorchTrainer(
        loop_fn, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def initial_weights(cfg: TrainConfig, model_cfg: ModelConfig) -> bytes | None:
    """The weights of the model stage `cfg.init_from` (safetensors bytes), None without one. Refuses (ConfigError)
    a model of other settings: its weights would not fit."""
    if not cfg.init_from:
        return None
    model, saved_cfg = load_model_stage(cfg.init_from)
    if saved_cfg != model_cfg:
        raise ConfigError(f"--init-from {cfg.init_from} holds a model of other settings ({saved_cfg}) than asked "
                          f"({model_cfg}); train from scratch without --init-from")
    return bytes(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}))


def _latents_task(weights: bytes, model: dict[str, Any], features: np.ndarray, neighbours: np.ndarray,
                  batch_size: int, threads: int, nodes: CategoryNodes | None,
                  category: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    torch.set_num_threads(threads)
    net = models.build_model(models.model_config_from_dict(model))
    net.load_state_dict(safetensors.torch.load(weights))
    if nodes is not None and category is not None:  # image latents and category embeddings in one pass, on the CPU
        graph = ClassGraph(_shared_tensor(neighbours), _shared_tensor(category), nodes.names)
        z, embeddings = classnodes.all_latents(ClassNodeModel(net, torch.from_numpy(nodes.features)),
                                               _shared_tensor(features), graph, batch_size)
        return z.numpy(), embeddings.numpy()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    latents = models.context_aware_latents(net.to(device), _shared_tensor(features), _shared_tensor(neighbours),
                                           batch_size, device)
    return latents.numpy(), None


def compute_latents(cfg: TrainConfig, model: torch.nn.Module, model_cfg: ModelConfig, shared: Shared,
                    nodes: CategoryNodes | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(context-aware latents of every node, the category nodes' embeddings or None), layer by layer in batches,
    in a Ray task with one worker's resources."""
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    task = ray.remote(_latents_task).options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)
    ref = task.remote(weights, to_dict(model_cfg), shared.features, shared.neighbours,
                      cfg.inference_batch_size, cfg.threads_per_worker or cfg.cpus_per_worker, nodes, shared.category)
    latents, embeddings = ray.get(ref)
    return np.asarray(latents), embeddings


def run(cfg: TrainConfig, fail_once: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on `<run>/graph` + `<run>/embeddings`, publish `<run>/model` then `<run>/latents`; returns
    {"model": manifest, "latents": manifest}. Bad inputs and mismatched checkpoints raise before anything
    is written; a rerun resumes from the run's last checkpoint (epochs already done are not redone)."""
    with io.stage_lock(io.join(cfg.run, schemas.MODEL)), io.stage_lock(io.join(cfg.run, schemas.LATENTS)):
        timings: dict[str, float] = {}
        with io.timed(timings, "read"):
            inputs = load_inputs(cfg.run)
        published = up_to_date(cfg, inputs)
        if published is not None:
            return published
        check_size(inputs, cfg)
        if cfg.objective == GRAD_NET:
            return run_grad_net(cfg, inputs, timings, fail_once)
        graph = class_graph(inputs, cfg)
        model_cfg = cfg.model_config(inputs.features.shape[1])
        storage = checkpoint_storage(cfg.run)
        resumed_from = check_checkpoints(storage, model_cfg, cfg.resume, lineage(cfg, inputs))
        init = initial_weights(cfg, model_cfg)
        stages.init_ray()
        shared = share(inputs, cfg, graph)
        with io.timed(timings, "train"):
            result = fit(cfg, shared, model_cfg, storage, fail_once, init)
        if result.checkpoint is None:
            raise RuntimeError(f"training in {storage} reported no checkpoint; see the Ray Train log above")
        with result.checkpoint.as_directory() as directory:
            model, _ = models.load_model(directory)
            nodes = None if graph is None else classnodes.load_category_nodes(directory)
            with open(os.path.join(directory, METRICS_FILE)) as f:
                metrics = f.read()
        with io.timed(timings, "latents"):
            latents, embeddings = compute_latents(cfg, model, model_cfg, shared, nodes)
        if nodes is not None:
            nodes = dataclasses.replace(nodes, embeddings=embeddings)

        def save(run_dir: str, extra: dict[str, Any]) -> list[str]:
            files = models.save_model(model, model_cfg, run_dir, extra=extra)
            return files if nodes is None else [*files, classnodes.save_category_nodes(nodes, run_dir)]

        model_manifest = _publish_model(cfg, save, to_dict(model_cfg), metrics, inputs, resumed_from, timings,
                                        category_nodes=0 if nodes is None else len(nodes.names))
        return {schemas.MODEL: model_manifest, schemas.LATENTS: _publish_latents(cfg, inputs, latents, model_manifest)}


def run_grad_net(cfg: TrainConfig, inputs: TrainInputs, timings: dict[str, float],
                 fail_once: dict[str, Any] | None = None) -> dict[str, Any]:
    """`--objective grad-net` of `run`, once the inputs are read and checked: the PCA and anchors fitted here (or
    read from the checkpoint training resumes from), the mutual graph and its inputs put in the object store,
    GRAD-Net trained by Ray Train, the diffused features computed in a Ray task; publishes model and latents.
    Refuses (GraphInputError) more anchors than images and a graph without mutual neighbours before anything is
    written."""
    model_cfg = cfg.diffusion_config(inputs.neighbours.shape[1])
    check_grad_net_inputs(cfg, inputs, model_cfg)
    storage = checkpoint_storage(cfg.run)
    resumed_from = check_checkpoints(storage, model_cfg, cfg.resume, lineage(cfg, inputs))
    with io.timed(timings, "prepare"):
        fitted, graph = diffusion.prepare(inputs.features, inputs.neighbours, inputs.similarities, model_cfg,
                                          _checkpointed_inputs(storage) if resumed_from else None)
    stages.init_ray()
    arrays = tuple(ray.put(t.numpy()) for t in (graph.inputs, graph.table, graph.affinities, graph.weights))
    loop = {"train": cfg, "model": model_cfg, "fail_once": fail_once, "graph": arrays, "fitted": fitted}
    with io.timed(timings, "train"):
        result = _trainer(cfg, grad_net_loop_per_worker, loop, storage).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {storage} reported no checkpoint; see the Ray Train log above")
    with result.checkpoint.as_directory() as directory:
        trained = diffusion.load_grad_net(directory)
        with open(os.path.join(directory, METRICS_FILE)) as f:
            metrics = f.read()
    with io.timed(timings, "latents"):
        task = ray.remote(_grad_net_latents_task).options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)
        weights = safetensors.torch.save({k: v.contiguous() for k, v in trained.net.state_dict().items()})
        latents = np.asarray(ray.get(task.remote(weights, model_cfg, cfg.inference_batch_size,
                                                 cfg.threads_per_worker or cfg.cpus_per_worker, *arrays)))

    def save(run_dir: str, extra: dict[str, Any]) -> list[str]:
        return diffusion.save_grad_net(run_dir, trained.net, model_cfg, trained.fitted, extra=extra)

    model_manifest = _publish_model(cfg, save, to_dict(model_cfg), metrics, inputs, resumed_from, timings)
    return {schemas.MODEL: model_manifest,
            schemas.LATENTS: _publish_latents(cfg, inputs, latents, model_manifest, mode="diffused")}


def check_grad_net_inputs(cfg: TrainConfig, inputs: TrainInputs, model_cfg: DiffusionConfig) -> None:
    """Refuse (GraphInputError) more anchors than images, and a graph without mutual neighbours (no sextet could
    be drawn), before anything is written."""
    if model_cfg.anchors > len(inputs.node):
        raise GraphInputError(f"--objective grad-net: {model_cfg.anchors} anchors need at least as many images, "
                              f"{cfg.run} has {len(inputs.node)}; lower --anchors")
    if not bool((diffusion.mutual_knn(inputs.neighbours, inputs.similarities)[0] != PAD).any()):
        raise GraphInputError(f"--objective grad-net: the graph of {cfg.run} has no mutual neighbours (i in j's list "
                              "and j in i's); rebuild it with a larger --k")


def _checkpointed_inputs(storage: str) -> diffusion.Fitted:
    """The PCA and anchors of the newest GRAD-Net checkpoint in `storage` (training resumes with those)."""
    fs, path = io.url_to_fs(io.join(storage, RUN_NAME))
    newest = sorted(fs.glob(posixpath.join(path, "checkpoint_*", models.CONFIG_FILE)))[-1]
    return diffusion.load_grad_net(io.full_uri(fs, posixpath.dirname(newest))).fitted


def _grad_net_latents_task(weights: bytes, model_cfg: DiffusionConfig, batch_size: int, threads: int,
                           *arrays: np.ndarray) -> np.ndarray:
    """The unit diffused features [N, D] of every node (diffusion.diffuse on the CPU), from the net's weights and
    the graph's four arrays (inputs, mutual table, affinities, S)."""
    torch.set_num_threads(threads)
    graph = diffusion.Graph(*(_shared_tensor(array) for array in arrays))
    net = diffusion.build_net(graph.inputs.shape[1], model_cfg)
    net.load_state_dict(safetensors.torch.load(weights))
    return vectors.normalise(diffusion.diffuse(net, graph, batch_size).numpy())


def _publish_model(cfg: TrainConfig, save: Callable[[str, dict[str, Any]], list[str]], model: dict[str, Any],
                   metrics: str, inputs: TrainInputs, resumed_from: int, timings: dict[str, float],
                   category_nodes: int = 0) -> dict[str, Any]:
    """Publish the model (the files `save(run_dir, extra)` writes: the autoencoder and any category nodes, or
    GRAD-Net) with its metrics; `model` is its config's dict form."""
    stage = io.join(cfg.run, schemas.MODEL)
    run_dir = io.new_run_dir(stage)
    history = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    files = save(run_dir, {"epoch": history[-1]["epoch"], "train": to_dict(cfg), "objective": cfg.objective})
    fs, path = io.url_to_fs(run_dir)
    fs.pipe_file(posixpath.join(path, METRICS_FILE), metrics.encode())
    return io.publish(stage, schemas.MODEL, [*files, io.join(run_dir, METRICS_FILE)], config=to_dict(cfg),
                      upstream=inputs.upstream, rows=len(inputs.node), model=model,
                      epochs=history[-1]["epoch"], final_loss=history[-1]["loss"], resumed_from_epoch=resumed_from,
                      timings=timings, objective=cfg.objective, image_edges=cfg.image_edges,
                      category_nodes=category_nodes)


def _publish_latents(cfg: TrainConfig, inputs: TrainInputs, latents: np.ndarray,
                     model_manifest: dict[str, Any], mode: str = "context-aware") -> dict[str, Any]:
    stage = io.join(cfg.run, schemas.LATENTS)
    table = pa.table({
        schemas.NODE: pa.array(inputs.node, pa.int64()),
        schemas.IMAGE_ID: pa.array(list(inputs.image_id), pa.string()),
        schemas.LISTING: pa.array(list(inputs.listing), pa.string()),
        schemas.CATEGORY: pa.array(list(inputs.category), pa.string()),
        schemas.LATENT: vectors.to_arrow(latents),
    }, schema=schemas.latents(latents.shape[1]))
    file_uri = io.write_table(table, io.new_run_dir(stage))
    return io.publish(stage, schemas.LATENTS, [file_uri], config=to_dict(cfg),
                      upstream=latents_upstream(cfg, inputs, model_manifest), rows=len(inputs.node),
                      mode=mode, latent_dim=latents.shape[1])


def latents_upstream(cfg: TrainConfig, inputs: TrainInputs, model_manifest: dict[str, Any]) -> dict[str, Any]:
    """The latents stage's lineage: the model it was encoded with and the graph it was encoded over."""
    return {schemas.MODEL: io.upstream_of(model_manifest, io.join(cfg.run, schemas.MODEL)),
            schemas.GRAPH: inputs.upstream[schemas.GRAPH]}


def up_to_date(cfg: TrainConfig, inputs: TrainInputs) -> dict[str, Any] | None:
    """{"model", "latents"} manifests, reused, when both were published with this config from these inputs."""
    model = io.up_to_date(io.join(cfg.run, schemas.MODEL), schemas.MODEL, to_dict(cfg), inputs.upstream)
    if model is None:
        return None
    model = {k: v for k, v in model.items() if k != "reused"}
    latents = io.up_to_date(io.join(cfg.run, schemas.LATENTS), schemas.LATENTS, to_dict(cfg),
                            latents_upstream(cfg, inputs, model))
    return None if latents is None else {schemas.MODEL: {**model, "reused": True}, schemas.LATENTS: latents}


def _model_dir(stage_uri: str, manifest: dict[str, Any]) -> str:
    """The run directory of a published model stage (the one its manifest lists the weights in)."""
    weights = [f for f in manifest["files"] if posixpath.basename(f) == schemas.WEIGHTS_FILE]
    if not weights:
        raise models.ModelLoadError(f"{stage_uri}: the model manifest lists no {schemas.WEIGHTS_FILE}")
    return io.join(stage_uri, posixpath.dirname(weights[0]))


def load_model_stage(stage_uri: str) -> tuple[models.GraphAutoencoder, ModelConfig]:
    """The model a published model stage holds (for class nodes: its autoencoder, which gives image and query
    latents). Refuses (ModelLoadError) a GRAD-Net model stage: load_grad_net_stage reads those."""
    manifest = io.read_manifest(stage_uri, schemas.MODEL)
    if manifest.get("objective") == GRAD_NET:
        raise models.ModelLoadError(f"{stage_uri} holds a GRAD-Net model (--objective grad-net), not a graph "
                                    "autoencoder; its latents are diffused features, queried by QFE")
    return models.load_model(_model_dir(stage_uri, manifest))


def load_grad_net_stage(stage_uri: str) -> diffusion.GradNet:
    """The GRAD-Net a published model stage holds (weights, DiffusionConfig, PCA, anchors). Refuses
    (ModelLoadError) a model stage of another objective."""
    manifest = io.read_manifest(stage_uri, schemas.MODEL)
    if manifest.get("objective") != GRAD_NET:
        raise models.ModelLoadError(f"{stage_uri} holds a model of --objective {manifest.get('objective')}, not "
                                    "grad-net")
    return diffusion.load_grad_net(_model_dir(stage_uri, manifest))


def load_category_nodes(stage_uri: str, manifest: dict[str, Any] | None = None) -> CategoryNodes | None:
    """The names and learned embeddings of a published class-nodes model's categories; None for an autoencoder.
    `manifest` (the stage's, when the caller has read it already) saves reading it again."""
    manifest = manifest or io.read_manifest(stage_uri, schemas.MODEL)
    if manifest.get("objective") != CLASS_NODES:
        return None
    return classnodes.load_category_nodes(_model_dir(stage_uri, manifest))


def summary(manifests: dict[str, Any]) -> str:
    """A few lines for the console: nodes, epochs, final loss, where the model and latents are."""
    model, latents = manifests[schemas.MODEL], manifests[schemas.LATENTS]
    grad_net = model.get("objective") == GRAD_NET
    return "\n".join([
        (f"model: GRAD-Net (layers {model['model']['sizes']}, {model['model']['anchors']} anchors)" if grad_net else
         f"model: {model['model']['encoder']} autoencoder")
        + (f" with {model['category_nodes']} category nodes (class-nodes"
           + ("" if model["image_edges"] else ", no image k-NN edges") + ")" if model.get("category_nodes") else "")
        + f", {model['rows']} nodes, {model['epochs']} epochs, "
        f"final loss {model['final_loss']:.6f}"
        + (f" (resumed from epoch {model['resumed_from_epoch']})" if model["resumed_from_epoch"] else "")
        + (f", fine-tuned from {model['config']['init_from']}" if model["config"].get("init_from") else "")
        + (" [already published: reused]" if model.get("reused") else ""),
        f"  latents: {latents['rows']} {latents.get('mode', 'context-aware')} latents of {latents['latent_dim']} dims",
        f"  timings (s): {model['timings']}",
    ])
