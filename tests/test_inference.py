"""Query latents: context-free, insertion neighbours and context-aware, against brute force on tiny graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gatrep import sampling
from gatrep.categorize import CategoryIndex, Searcher
from gatrep.config import ModelConfig
from gatrep.models import build_model, context_aware_latents, query_latents
from gatrep.models.query_latents import LATENT_MODES, QueryEncoder
from gatrep.represent import represent_groups
from gatrep.vectors import normalise


@pytest.fixture(params=["gat", "sage"])
def setup(request):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, d, k = 30, 8, 4
    features = rng.normal(size=(n, d)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    neighbours = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    neighbours[3, 2:] = -1  # a padded row
    model = build_model(ModelConfig(in_dim=d, encoder=request.param, hidden=6, heads=2, latent_dim=5,
                                    decoder_hidden=(7,)))
    categories = np.array(["a" if i < 15 else "b" for i in range(n)], dtype=object)
    return model, features, neighbours, categories


def test_context_aware_equals_the_whole_graph_with_the_queries_appended(setup):
    model, features, neighbours, categories = setup
    queries = np.random.default_rng(1).normal(size=(3, features.shape[1])).astype(np.float32)
    query_neighbours = np.array([[0, 5, 7, 3], [3, 20, -1, -1], [29, 28, 27, 26]])
    encoder = QueryEncoder(model, features, neighbours, categories)
    got = encoder.context_aware(queries, query_neighbours)
    # Reference: append the queries as nodes 30..32 of the full graph, run the encoder on everything.
    table = np.concatenate([neighbours, query_neighbours])
    with torch.no_grad():
        full = model.encode(torch.tensor(np.concatenate([features, queries])),
                            sampling.edge_index_of(torch.tensor(table)))
    assert got.shape == (3, 5)
    assert np.allclose(got, full[30:].numpy(), atol=1e-5)


def test_context_free_is_the_latent_of_a_node_that_only_sees_itself(setup):
    """Built independently of context_free's own graph: the queries are appended to the indexed graph as nodes
    whose one neighbour is themselves, and the whole graph is encoded."""
    model, features, neighbours, _ = setup
    x = features[:4] + 0.1
    own = np.full((4, neighbours.shape[1]), -1)
    own[:, 0] = np.arange(30, 34)
    with torch.no_grad():
        full = model.encode(torch.tensor(np.concatenate([features, x])),
                            sampling.edge_index_of(torch.tensor(np.concatenate([neighbours, own]))))
    got = QueryEncoder(model, features, neighbours).context_free(x)
    assert np.allclose(got, full[30:].numpy(), atol=1e-5)


def test_insertion_neighbours_pick_the_most_similar_candidates(setup):
    model, features, neighbours, categories = setup
    encoder = QueryEncoder(model, features, neighbours, categories)
    x = features[[2, 20]] + 0.01
    seeds = np.array([[2, -1], [20, 21]])
    got = encoder.insertion_neighbours(x, seeds, k=3)
    for b in range(2):
        pool = {int(s) for s in seeds[b] if s >= 0}
        pool |= {int(m) for s in seeds[b] if s >= 0 for m in neighbours[s] if m >= 0}
        ranked = sorted(pool, key=lambda c: -float(features[c] @ x[b]))[:3]
        assert got[b].tolist() == ranked
    inside = encoder.insertion_neighbours(x, seeds, k=10, category=np.array(["a", "b"], dtype=object))
    assert all(categories[c] == "a" for c in inside[0] if c >= 0)
    assert all(categories[c] == "b" for c in inside[1] if c >= 0)
    assert (inside[0] == -1).any()  # fewer candidates than k: padded


@pytest.mark.parametrize("mode", list(LATENT_MODES))
def test_latent_queries_retrieve_by_style_inside_the_category_chosen_by_content(setup, mode):
    model, features, neighbours, categories = setup
    latents = context_aware_latents(model, torch.from_numpy(features), torch.from_numpy(neighbours),
                                    batch_size=64).numpy()
    ids = np.array([f"n{i}" for i in range(len(features))], dtype=object)
    style = normalise(np.random.default_rng(1).normal(size=(len(features), 3)))
    reps = represent_groups(latents, categories, "centroid", 1)
    searcher = Searcher(reps.groups, reps.vectors, [reps.vectors[i:i + 1] for i in range(len(reps.groups))],
                        reps.groups, CategoryIndex.build(latents, ids, categories, labels=categories),
                        CategoryIndex.build(style, ids, categories, labels=categories))
    encoder = QueryEncoder(model, features, neighbours, categories, ids)
    by_content = query_latents.search(searcher, encoder, features[:4], mode, 3, "single")
    by_style = query_latents.search(searcher, encoder, features[:4], mode, 3, "single",
                                    by=query_latents.Retrieval("style", style[:4]))
    assert by_style.category.tolist() == by_content.category.tolist()
    for b in range(4):
        rows = [int(i[1:]) for i in by_style.match_ids[b]]
        assert set(categories[rows]) == {by_style.category[b]}
        np.testing.assert_allclose(by_style.match_scores[b], style[rows] @ style[b], rtol=1e-5)
        assert list(by_style.match_scores[b]) == sorted(by_style.match_scores[b], reverse=True)
