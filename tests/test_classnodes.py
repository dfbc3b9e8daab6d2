"""Class nodes on tiny graphs: graph construction by hand, the loss by hand, training beats the untrained model,
determinism by seed, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from gatrep.config import ConfigError, ModelConfig
from gatrep.models import classnodes as cn
from gatrep.models import context_aware_latents, query_latents
from gatrep.models.epoch import reconstruction_loss
from gatrep.vectors import PAD, exact_knn

# Images 0-2 and 3-4 are two triangles; image 5 has no label (a held-out category) but stays in the graph.
TABLE = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, PAD], [3, 4]])
LABELS = np.array(["b", "b", "b", "a", "a", None], dtype=object)
SMALL = {"in_dim": 4, "hidden": 3, "heads": 2, "latent_dim": 3, "decoder_hidden": (5,)}


def test_graph_joins_each_labelled_image_to_its_category_node_only() -> None:
    graph = cn.build_class_graph(TABLE, LABELS)
    assert list(graph.names) == ["a", "b"] and graph.num_images == 6 and graph.num_classes == 2
    assert graph.category.tolist() == [1, 1, 1, 0, 0, PAD]
    # image -> category node (N + c = 6 + c); nothing points from a category node to an image
    assert graph.class_edges().tolist() == [[0, 1, 2, 3, 4], [7, 7, 7, 6, 6]]
    edges = graph.edge_index()
    assert edges.shape == (2, 11 + 5)  # 11 non-PAD k-NN slots, 5 labelled images
    assert (edges[1, edges[0] >= 6] < 6).sum() == 0 and (edges[0] >= 6).sum() == 0
    # a batch whose seeds are images 5, 3, 0 (local 0, 1, 2) with 7 sampled nodes: class nodes are local 7, 8
    assert graph.batch_edges(torch.tensor([5, 3, 0]), 7).tolist() == [[1, 2], [7, 8]]


def test_names_may_order_the_category_nodes() -> None:
    graph = cn.build_class_graph(TABLE, LABELS, names=["b", "a"])
    assert graph.category.tolist() == [0, 0, 0, 1, 1, PAD]


@pytest.mark.parametrize(("labels", "names", "message"), [
    (LABELS[:5], None, "one label per image"),
    (np.array(["a"] * 5 + [None], dtype=object), None, "at least two categories"),
    (np.array([None] * 6, dtype=object), None, "at least two categories"),
    (LABELS, ["a"], "labels without a category node: b"),
    (LABELS, ["a", "b", "c"], "categories without any image: c"),
])
def test_refusals(labels: np.ndarray, names: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cn.build_class_graph(TABLE, labels, names)


def test_refuses_neighbour_ids_outside_the_graph_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="neighbour ids"):
        cn.build_class_graph(np.array([[1], [6]]), ["a", "b"])
    with pytest.raises(ConfigError, match="temperature"):
        cn.ClassNodeSettings(temperature=0.0)
    with pytest.raises(ConfigError, match="class_features"):
        cn.ClassNodeSettings(class_features="random")
    graph = cn.build_class_graph(TABLE, LABELS)
    with pytest.raises(ValueError, match="do not fit"):
        cn.train_class_nodes(ModelConfig(**SMALL), np.zeros((5, 4)), graph, cn.ClassNodeSettings(epochs=0))


def test_contrastive_loss_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    classes = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # cosines: row 0 (1, 0), row 1 (0, 1); row 2 is unlabelled and does not count
    loss = cn.contrastive_loss(z, classes, torch.tensor([0, 0, PAD]), temperature=0.5)
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    row1 = -math.log(math.exp(0) / (math.exp(0) + math.exp(2)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert cn.contrastive_loss(z, classes, torch.tensor([PAD, PAD, PAD]), 0.5).item() == 0.0


def test_batch_loss_is_contrastive_plus_lambda_times_reconstruction() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    graph = cn.build_class_graph(TABLE, LABELS)
    settings = cn.ClassNodeSettings(temperature=0.2, reconstruction_weight=0.7)
    model = cn.new_model(ModelConfig(**SMALL), x, graph, settings)
    # seeds 0 and 5 (local 0, 1), neighbours 1, 2 sampled: edges neighbour -> node in local ids
    n_id = torch.tensor([0, 5, 1, 2])
    batch = Data(x=x[n_id], edge_index=torch.tensor([[2, 3], [0, 0]]), n_id=n_id, batch_size=2)
    total, contrast, recon = cn.class_node_loss(model, batch, graph, settings)
    # by hand: category nodes (local 4, 5) get edge 0 -> 5 (image 0 is "b"); image latents ignore them
    z = model.autoencoder.encode(batch.x, batch.edge_index)[:2]
    h = torch.cat([model.autoencoder.scale(batch.x), model.class_features])
    class_z = model.autoencoder.encoder(h, torch.tensor([[2, 3, 0], [0, 0, 5]]))[4:]
    logits = torch.nn.functional.normalize(z[:1]) @ torch.nn.functional.normalize(class_z).T / 0.2
    expected = -torch.log_softmax(logits, dim=1)[0, 1]
    assert contrast.item() == pytest.approx(expected.item(), rel=1e-5)
    assert recon.item() == pytest.approx(reconstruction_loss(model.autoencoder, batch).item(), rel=1e-6)
    assert total.item() == pytest.approx(contrast.item() + 0.7 * recon.item(), rel=1e-6)


def test_class_features_start_at_the_mean_of_their_images_and_mean_mode_is_fixed() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    graph = cn.build_class_graph(TABLE, LABELS)
    model = cn.new_model(ModelConfig(**SMALL, standardise=False), x, graph, cn.ClassNodeSettings(class_features="mean"))
    assert torch.equal(model.class_features, torch.stack([x[3:5].mean(0), x[0:3].mean(0)]))
    assert "class_features" not in dict(model.named_parameters())
    learned = cn.new_model(ModelConfig(**SMALL), x, graph, cn.ClassNodeSettings())
    assert "class_features" in dict(learned.named_parameters())


def _clustered(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three categories told apart by 2 of 16 dimensions; the other 14 are louder noise, so a random encoder
    mostly sees the noise."""
    rng = np.random.default_rng(seed)
    centres = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    y = np.repeat(np.arange(3), n_per)
    x = np.concatenate([centres[y] + 0.35 * rng.standard_normal((len(y), 2)),
                        1.5 * rng.standard_normal((len(y), 14))], axis=1).astype(np.float32)
    return x, np.array([f"c{t}" for t in y], dtype=object)


TINY = ModelConfig(in_dim=16, hidden=8, heads=2, latent_dim=8, decoder_hidden=(16,))


def _trained(epochs: int, seed: int = 0) -> tuple[cn.TrainedClassNodes, np.ndarray, np.ndarray, np.ndarray]:
    x, y = _clustered(40, seed=1)
    neighbours = exact_knn(x / np.linalg.norm(x, axis=1, keepdims=True), 5)[0]
    graph = cn.build_class_graph(neighbours, y)
    settings = cn.ClassNodeSettings(epochs=epochs, lr=1e-2, batch_size=60, temperature=0.2,
                                    reconstruction_weight=0.1, seed=seed)
    return cn.train_class_nodes(TINY, x, graph, settings), x, y, neighbours


def test_training_beats_the_untrained_model_through_the_query_path() -> None:
    xq, yq = _clustered(30, seed=2)
    accuracy = {}
    for epochs in (0, 20):
        trained, x, y, neighbours = _trained(epochs)
        encoder = query_latents.QueryEncoder(trained.autoencoder, x, neighbours, y,
                                             np.array([str(i) for i in range(len(x))], dtype=object))
        found = query_latents.search(cn.class_searcher(trained, y), encoder, xq, "context-aware", 5, "single")
        accuracy[epochs] = float(np.mean(found.category == yq))
    assert accuracy[20] >= 0.7 and accuracy[20] >= accuracy[0] + 0.3, accuracy
    assert trained.history[-1].contrastive < trained.history[0].contrastive


def test_image_latents_are_the_gat_ae_latents_and_knn_vote_uses_them() -> None:
    trained, x, y, neighbours = _trained(3)
    expected = context_aware_latents(trained.autoencoder, torch.as_tensor(x), torch.as_tensor(neighbours), 50)
    assert np.allclose(trained.latents, expected.numpy(), atol=1e-5)
    queries = trained.latents[:8] + 0.01
    best, votes = cn.knn_categorize(queries, trained.latents, y, k=3)
    unit = trained.latents / np.linalg.norm(trained.latents, axis=1, keepdims=True)
    top = np.argsort(-(queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T, axis=1)[:, :3]
    shares = np.stack([(y[top] == name).mean(axis=1) for name in ["c0", "c1", "c2"]], axis=1)
    assert np.allclose(votes, shares) and all(shares[i, ["c0", "c1", "c2"].index(b)] == shares[i].max()
                                              for i, b in enumerate(best))
    names, scores = cn.categorize_by_class(trained.embeddings, trained)
    assert list(names) == list(trained.names) and scores.shape == (3, 3)


def test_same_seed_same_model_other_seed_other_model() -> None:
    a, b, c = _trained(2, seed=0)[0], _trained(2, seed=0)[0], _trained(2, seed=1)[0]
    assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.latents, b.latents)
    assert not np.allclose(a.embeddings, c.embeddings)
