"""Label-aware class nodes (GraphCLIP's idea on the GAT-AE): category nodes joined to their images, trained so
each image's latent matches its category node's embedding against the others, with reconstruction as a regulariser.

The graph is the image k-NN table [N, k] plus one node per category, numbered N .. N+C-1. Each labelled image
is joined to its category node by one directed edge, image -> category: a category node aggregates its images
(and its own features), while an image still aggregates its k-NN neighbours only. An image's latent therefore
never sees its own label, so it is computed exactly as the plain GAT-AE computes it (same encoder, same
neighbour sampler, `context_aware_latents`), and a query, which has no label, gets its latent the same way
(`gatrep.models.query_latents`). An edge category -> image would leak the label into the training latents and
leave queries, which have no such edge, in another distribution.

A category node's input features are learned (`class_features="learned"`, the default): a parameter per category
in the model's scaled feature space, initialised to the mean of its images' scaled features. Initialised there,
the node starts as the centroid representative (the paper's Approach II); learned, the contrastive loss can move
it to where it separates its category from the others, which a fixed mean cannot. `"mean"` keeps the fixed
mean, for comparison. Images without a label (categories held out of training) stay in the graph with no
category node.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

from gatrep import io, sampling
from gatrep.categorize import CategoryIndex, Searcher, categorize, knn_vote
from gatrep.config import ConfigError, ModelConfig
from gatrep.models import ModelLoadError, build_model
from gatrep.models.autoencoder import GraphAutoencoder
from gatrep.vectors import PAD

CLASS_FEATURES = ("learned", "mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassNodeSettings:
    """How the class-node model is trained; the encoder itself is a ModelConfig (build_model)."""

    temperature: float = 0.1  # tau of the contrastive loss: cosines are divided by it
    reconstruction_weight: float = 1.0  # lambda: weight of the autoencoder's reconstruction loss
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 512  # seed images per mini-batch
    num_neighbors: tuple[int, ...] = (10, 10)  # neighbours sampled per hop, one per graph layer; -1 = all
    class_features: str = "learned"  # category-node input features: "learned" or the fixed "mean" of its images
    seed: int = 0  # weights, class features and the neighbour sampler
    inference_batch_size: int = 4096  # images per batch when computing all latents

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, not {self.temperature}")
        if self.reconstruction_weight < 0:
            raise ConfigError(f"reconstruction_weight must be >= 0, not {self.reconstruction_weight}")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size <= 0 or self.inference_batch_size <= 0:
            raise ConfigError("epochs must be >= 0; lr, batch_size and inference_batch_size > 0")
        if self.class_features not in CLASS_FEATURES:
            raise ConfigError(f"class_features must be one of {', '.join(CLASS_FEATURES)}, not {self.class_features!r}")


# ----------------------------------------------------------------------------------------------
# The image + category graph


@dataclasses.dataclass(frozen=True)
class ClassGraph:
    """The image k-NN table and each image's category node.

    `neighbours` [N, k] (PAD padded) is the image graph the encoder samples; `category[i]` is the position in
    `names` of image i's category (PAD: no label, no category node). Category c is node N + c.
    """

    neighbours: Tensor
    category: Tensor
    names: np.ndarray

    @property
    def num_images(self) -> int:
        """N: image nodes 0 .. N-1."""
        return len(self.neighbours)

    @property
    def num_classes(self) -> int:
        """C: category nodes N .. N+C-1."""
        return len(self.names)

    def class_edges(self) -> Tensor:
        """[2, L] edges image -> its category node (global ids), one per labelled image."""
        images = (self.category != PAD).nonzero().flatten()
        return torch.stack([images, self.num_images + self.category[images]])

    def edge_index(self) -> Tensor:
        """[2, E] edges of the whole image + category graph: k-NN edges neighbour -> image, then class_edges."""
        return torch.cat([sampling.edge_index_of(self.neighbours), self.class_edges()], dim=1)

    def batch_edges(self, seeds: Tensor, offset: int) -> Tensor:
        """[2, L] edges of a mini-batch: local seed j -> local node offset + c for each labelled seed of category c.

        `seeds` are the batch's seed images (global ids, local ids 0..B-1); category nodes follow the batch's
        `offset` sampled nodes. Only seeds are joined: the other sampled nodes lack their full neighbourhood."""
        category = self.category[seeds]
        local = (category != PAD).nonzero().flatten()
        return torch.stack([local, offset + category[local]])


def build_class_graph(neighbours: Any, labels: Sequence[Any] | np.ndarray,
                      names: Sequence[str] | None = None) -> ClassGraph:
    """The ClassGraph of an image k-NN table [N, k] (PAD padded) and one label per image (None: unlabelled).

    `names` (default: the sorted distinct labels) are the categories that get a node. Refuses a label count
    other than N, neighbour ids outside 0..N-1, a label that is not among `names`, a name no image carries,
    and fewer than two categories (the contrastive loss needs another category to push away from)."""
    table = torch.as_tensor(np.asarray(neighbours), dtype=torch.int64)
    values = np.asarray(labels, dtype=object)
    if table.dim() != 2 or values.shape != (len(table),):
        raise ValueError(f"need one label per image: {values.shape} labels for a neighbour table {tuple(table.shape)}")
    if ((table < PAD) | (table >= len(table))).any():
        raise ValueError(f"neighbour ids must be {PAD} (none) or 0..{len(table) - 1}")
    given = sorted({str(v) for v in values if v is not None})
    chosen = np.asarray(given if names is None else [str(n) for n in names], dtype=object)
    unknown = sorted(set(given) - set(chosen))
    if unknown:
        raise ValueError(f"labels without a category node: {', '.join(unknown[:5])}; add them to names or set "
                         "those images' labels to None")
    empty = sorted(set(chosen) - set(given))
    if empty:
        raise ValueError(f"categories without any image: {', '.join(empty[:5])}")
    if len(chosen) < 2:
        raise ValueError(f"class nodes need at least two categories, got {len(chosen)}: {list(chosen)}")
    position = {name: c for c, name in enumerate(chosen)}
    category = torch.tensor([PAD if v is None else position[str(v)] for v in values], dtype=torch.int64)
    return ClassGraph(table, category, chosen)


# ----------------------------------------------------------------------------------------------
# The model and its loss


class ClassNodeModel(nn.Module):
    """A graph autoencoder plus the category nodes' input features [C, in_dim] (scaled space)."""

    class_features: Tensor

    def __init__(self, autoencoder: GraphAutoencoder, class_features: Tensor, learned: bool = True) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        if learned:
            self.class_features = nn.Parameter(class_features.detach().clone())
        else:
            self.register_buffer("class_features", class_features.detach().clone())

    def forward(self, batch: Data, graph: ClassGraph) -> tuple[Tensor, Tensor, Tensor]:
        """(seed latents [B, L], their reconstruction [B, in_dim], category-node latents [C, L]) of one mini-batch
        (seeds first), in one pass of the encoder over the batch's nodes and the C category nodes."""
        ae = self.autoencoder
        n = len(batch.x)
        seeds = batch.batch_size
        h = torch.cat([ae.scale(batch.x.float()), self.class_features])
        joins = graph.batch_edges(batch.n_id[:seeds].cpu(), n).to(h.device)
        z = ae.encoder(h, torch.cat([batch.edge_index, joins], dim=1))
        return z[:seeds], ae.decoder(z[:seeds]), z[n:]


def mean_features(autoencoder: GraphAutoencoder, features: Tensor, graph: ClassGraph) -> Tensor:
    """[C, in_dim] mean of each category's images' scaled features (the class nodes' initial features)."""
    labelled = graph.category != PAD
    sums = torch.zeros(graph.num_classes, features.shape[1])
    sums.index_add_(0, graph.category[labelled], autoencoder.scale(features[labelled].float().cpu()))
    counts = torch.bincount(graph.category[labelled], minlength=graph.num_classes).clamp(min=1)
    return sums / counts[:, None]


def contrastive_loss(latents: Tensor, class_latents: Tensor, category: Tensor, temperature: float) -> Tensor:
    """InfoNCE of image latents against category-node latents: the mean over labelled rows (category != PAD) of
    -log softmax_c(cos(z_i, e_c) / temperature)[category_i]; 0 (with a gradient path) when no row is labelled."""
    labelled = category != PAD
    if not bool(labelled.any()):  # zero, but every parameter keeps its gradient path (DDP waits for them all)
        return latents.sum() * 0.0 + class_latents.sum() * 0.0
    logits = F.normalize(latents[labelled], dim=1) @ F.normalize(class_latents, dim=1).T / temperature
    return F.cross_entropy(logits, category[labelled])


def class_node_loss(model: nn.Module, batch: Data, graph: ClassGraph,
                    settings: ClassNodeSettings) -> tuple[Tensor, Tensor, Tensor]:
    """(total, contrastive, reconstruction) loss of one mini-batch: contrastive + lambda * reconstruction.

    The reconstruction term is the seed images' MSE of gatrep.models.epoch.reconstruction_loss, taken from the
    same forward pass (an image's latent does not depend on the category nodes, so it is the same value).
    `model` may be wrapped in DistributedDataParallel."""
    z, x_hat, class_z = model(batch, graph)
    seeds = batch.batch_size
    module: Any = getattr(model, "module", model)
    reconstruction = F.mse_loss(x_hat, module.autoencoder.scale(batch.x[:seeds].float()))
    category = graph.category[batch.n_id[:seeds].cpu()].to(z.device)
    contrast = contrastive_loss(z, class_z, category, settings.temperature)
    return contrast + settings.reconstruction_weight * reconstruction, contrast, reconstruction


def batch_losses(model: nn.Module, batch: Data, graph: ClassGraph, settings: ClassNodeSettings) -> Tensor:
    """[total, contrastive, reconstruction] of one mini-batch: the loss vector gatrep.models.epoch.train_epoch
    takes (it minimises the first entry)."""
    return torch.stack(class_node_loss(model, batch, graph, settings))


# ----------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class EpochLosses:
    """Mean losses over one epoch's seed images, and its wall-clock seconds."""

    epoch: int
    total: float
    contrastive: float
    reconstruction: float
    seconds: float


def new_model(model_config: ModelConfig, features: Tensor, graph: ClassGraph,
              settings: ClassNodeSettings) -> ClassNodeModel:
    """An untrained ClassNodeModel seeded by `settings.seed`: scaling fitted (when the config standardises)
    and category features at their images' mean."""
    torch.manual_seed(settings.seed)
    autoencoder = build_model(model_config)
    if model_config.standardise:
        autoencoder.fit_scaling(features)
    return ClassNodeModel(autoencoder, mean_features(autoencoder, features, graph),
                          learned=settings.class_features == "learned")


def train_epoch(model: ClassNodeModel, optimizer: torch.optim.Optimizer, batches: Any, graph: ClassGraph,
                settings: ClassNodeSettings, device: torch.device | str, epoch: int = 0) -> EpochLosses:
    """One pass of Adam steps over the mini-batches; returns the mean losses per seed image."""
    model.train()
    start = time.perf_counter()
    sums = torch.zeros(3, device=device)
    seeds = 0
    for batch in batches:
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        losses = class_node_loss(model, batch, graph, settings)
        losses[0].backward()
        optimizer.step()
        sums += torch.stack([loss.detach() for loss in losses]) * batch.batch_size
        seeds += batch.batch_size
    total, contrast, recon = (sums / max(seeds, 1)).tolist()
    return EpochLosses(epoch, total, contrast, recon, time.perf_counter() - start)


@dataclasses.dataclass
class TrainedClassNodes:
    """A trained class-node model (eval mode, CPU): `embeddings[c]` is category `names[c]`'s node latent over
    all its images, `latents[i]` image i's context-aware latent; `history` the losses per epoch."""

    model: ClassNodeModel
    names: np.ndarray
    embeddings: np.ndarray
    latents: np.ndarray
    history: list[EpochLosses]

    @property
    def autoencoder(self) -> GraphAutoencoder:
        """The GAT-AE whose encoder gives image and query latents (query_latents.QueryEncoder takes it)."""
        return self.model.autoencoder


def train_class_nodes(model_config: ModelConfig, features: Any, graph: ClassGraph, settings: ClassNodeSettings,
                      device: torch.device | str = "cpu",
                      on_epoch: Callable[[TrainedClassNodes], None] | None = None) -> TrainedClassNodes:
    """Train the encoder and category nodes on mini-batches of seed images (every image, labelled or not) from
    gatrep.sampling.make_loader, for `settings.epochs` epochs; returns the model with its category embeddings
    and image latents. `on_epoch`, when given, is called after every epoch with the model so far (e.g. to
    choose the epoch count on a validation split). Refuses features whose row count is not the graph's."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.dim() != 2 or len(x) != graph.num_images or x.shape[1] != model_config.in_dim:
        raise ValueError(f"features {tuple(x.shape)} do not fit {graph.num_images} images of in_dim "
                         f"{model_config.in_dim}")
    model = new_model(model_config, x, graph, settings).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loader = sampling.make_loader(x, graph.neighbours, torch.arange(graph.num_images), settings.num_neighbors,
                                  settings.batch_size, shuffle=True, seed=settings.seed)
    history: list[EpochLosses] = []
    for epoch in range(1, settings.epochs + 1):
        history.append(train_epoch(model, optimizer, loader, graph, settings, device, epoch))
        if on_epoch is not None:
            on_epoch(finish(model, x, graph, settings, history))
    return finish(model, x, graph, settings, history)


def finish(model: ClassNodeModel, features: Tensor, graph: ClassGraph, settings: ClassNodeSettings,
           history: list[EpochLosses]) -> TrainedClassNodes:
    """A copy of the model on the CPU in eval mode, with its category embeddings and image latents."""
    model = copy.deepcopy(model).cpu().eval()
    latents, embeddings = all_latents(model, features, graph, settings.inference_batch_size)
    return TrainedClassNodes(model, graph.names, embeddings.numpy(), latents.numpy(), list(history))


@torch.no_grad()
def all_latents(model: ClassNodeModel, features: Tensor, graph: ClassGraph, batch_size: int) -> tuple[Tensor, Tensor]:
    """(image latents [N, L], category-node latents [C, L]) over the whole graph, layer by layer, on the CPU.

    Image rows are computed in batches of `batch_size` targets with their full neighbourhood, as
    gatrep.models.context_aware_latents computes them (same values). Each category node then aggregates all
    its images' states of the previous layer in one call per layer: memory O(N x hidden) for that call."""
    model = model.cpu().eval()
    encoder = model.autoencoder.encoder
    h = model.autoencoder.scale(features.float().cpu())
    c = model.class_features.detach().cpu()
    joins = graph.class_edges()
    for i in range(encoder.num_layers):
        outputs = []
        for start in range(0, len(h), batch_size):
            targets = torch.arange(start, min(start + batch_size, len(h)))
            sub = sampling.sample(graph.neighbours, targets, [-1])
            outputs.append(encoder.layer(i, h[sub.node], torch.stack([sub.row, sub.col]))[:len(targets)])
        c = encoder.layer(i, torch.cat([h, c]), joins)[len(h):]
        h = torch.cat(outputs)
    z = torch.cat([encoder.head(h[s:s + batch_size]) for s in range(0, len(h), batch_size)])
    return z, encoder.head(c)


# ----------------------------------------------------------------------------------------------
# Saved category nodes


CLASSES_FILE = "class_nodes.safetensors"  # beside the autoencoder's model.safetensors and config.json


@dataclasses.dataclass(frozen=True)
class CategoryNodes:
    """A model's category nodes: category `names[c]` has the input features `features[c]` (scaled space) and,
    once computed over all its images, the embedding `embeddings[c]` (None in a training checkpoint)."""

    names: np.ndarray
    features: np.ndarray
    embeddings: np.ndarray | None = None

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str] | np.ndarray,
           embeddings: Tensor | np.ndarray | None = None) -> CategoryNodes:
        """The category nodes of a ClassNodeModel (possibly wrapped in DistributedDataParallel)."""
        module: Any = getattr(model, "module", model)
        return cls(np.asarray(names, dtype=object), module.class_features.detach().cpu().numpy(),
                   None if embeddings is None else np.asarray(embeddings, dtype=np.float32))


def save_category_nodes(nodes: CategoryNodes, dir_uri: str) -> str:
    """Write CLASSES_FILE into `dir_uri` (tensors "features" and "embeddings", the names in its metadata);
    returns its URI."""
    tensors = {"features": torch.from_numpy(np.array(nodes.features, dtype=np.float32))}  # copies: may be read-only
    if nodes.embeddings is not None:
        tensors["embeddings"] = torch.from_numpy(np.array(nodes.embeddings, dtype=np.float32))
    data = safetensors.torch.save(tensors, metadata={"categories": json.dumps([str(n) for n in nodes.names])})
    fs, path = io.url_to_fs(dir_uri)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(posixpath.join(path, CLASSES_FILE), data)
    return io.join(dir_uri, CLASSES_FILE)


def load_category_nodes(dir_uri: str) -> CategoryNodes:
    """The CategoryNodes saved in `dir_uri`. Raises ModelLoadError when the file is missing or unreadable."""
    uri = io.join(dir_uri, CLASSES_FILE)
    fs, path = io.url_to_fs(uri)
    if not fs.exists(path):
        raise ModelLoadError(f"{uri} does not exist: not a class-nodes model; train with --objective class-nodes")
    data = fs.cat_file(path)
    try:
        tensors = safetensors.torch.load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the safetensors header
        names = json.loads(header["__metadata__"]["categories"])
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ModelLoadError(f"{uri}: cannot read the category nodes ({err})") from err
    embeddings = tensors.get("embeddings")
    return CategoryNodes(np.asarray(names, dtype=object), tensors["features"].numpy(),
                         None if embeddings is None else embeddings.numpy())


# ----------------------------------------------------------------------------------------------
# Categorization


def categorize_by_class(query_latents: Any, trained: TrainedClassNodes) -> tuple[np.ndarray, np.ndarray]:
    """(category name [B], cosine [B, C] in `trained.names` order) of query latents by the nearest category node."""
    return categorize(query_latents, trained.embeddings, list(trained.names))


def knn_categorize(query_latents: Any, index_latents: np.ndarray, labels: Sequence[Any] | np.ndarray,
                   k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(category name [B], vote share [B, C] in sorted name order) by a k-NN vote among the labelled indexed
    images' latents (None labels do not vote)."""
    return knn_vote(query_latents, class_index(index_latents, labels), k)


def class_index(latents: np.ndarray, labels: Sequence[Any] | np.ndarray,
                image_ids: np.ndarray | None = None) -> CategoryIndex:
    """Exact per-category index over the labelled images' latents (ids default to the node number as text)."""
    values = np.asarray(labels, dtype=object)
    ids = np.array([str(i) for i in range(len(values))], dtype=object) if image_ids is None else image_ids
    keep = np.flatnonzero(values != None)  # noqa: E711 - elementwise comparison of an object array
    return CategoryIndex.build(latents[keep], ids[keep], values[keep], values[keep], ann_min_size=2**62)


def class_searcher(trained: TrainedClassNodes, labels: Sequence[Any] | np.ndarray,
                   image_ids: np.ndarray | None = None) -> Searcher:
    """A Searcher whose representatives are the category-node embeddings (scoring "single") and whose index holds
    the labelled images' latents (scoring "knn", retrieval), for query_latents.search or Searcher.search."""
    index = class_index(trained.latents, labels, image_ids)
    if list(index.categories) != sorted(str(n) for n in trained.names):
        raise ValueError("the labels' categories differ from the trained category nodes")
    central = [trained.embeddings[c:c + 1] for c in range(len(trained.names))]
    return Searcher(trained.names, trained.embeddings, central, trained.names, index)
