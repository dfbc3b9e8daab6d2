"""Query latents from a trained graph autoencoder (context-free, or context-aware after inserting the query
into the k-NN graph of the collection or of one category, III-B2) or from GRAD-Net's diffused index (query feature
expansion), and the latent query path built on them."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gatrep import sampling
from gatrep.categorize import Searcher, SearchResults
from gatrep.models.autoencoder import GraphAutoencoder
from gatrep.models.diffusion import query_feature_expansion
from gatrep.vectors import PAD, normalise

SEEDS = 5  # best latent matches whose graph neighbourhoods are searched when inserting a query


class QueryEncoder:
    """Latents for query feature vectors, given the indexed collection's features and k-NN table.

    `features` [N, D] and `neighbours` [N, k] (-1 padded) are the graph the model was trained on and
    the index latents were computed on; `categories` [N] (optional) lets insertion stay inside a
    category. Arrays may be read-only views of Ray's object store: nothing here copies them whole.
    """

    def __init__(self, model: GraphAutoencoder, features: np.ndarray, neighbours: np.ndarray,
                 categories: np.ndarray | None = None, image_ids: np.ndarray | None = None) -> None:
        self.model = model.eval()
        self.features = features
        self.neighbours = torch.from_numpy(np.ascontiguousarray(neighbours, dtype=np.int64))
        self.categories = categories
        ids = [] if image_ids is None else list(image_ids)
        self.node_of = {image_id: node for node, image_id in reversed(list(enumerate(ids)))}

    def nodes(self, image_ids: np.ndarray) -> np.ndarray:
        """Graph node of each image id (PAD for None or an id not in the graph), same shape."""
        return np.vectorize(lambda i: self.node_of.get(i, PAD), otypes=[np.int64])(image_ids)

    @torch.no_grad()
    def context_free(self, x: np.ndarray) -> np.ndarray:
        """Latents of queries that see only themselves (self-loops), [B, latent_dim]."""
        return self.model.context_free(torch.as_tensor(x, dtype=torch.float32)).numpy()

    def insertion_neighbours(self, x: np.ndarray, seeds: np.ndarray, k: int,
                             category: np.ndarray | None = None) -> np.ndarray:
        """For each query, the k indexed nodes with the most similar raw features, [B, k] (-1 padded).

        Candidates are `seeds` [B, s] (node ids, -1 padded; e.g. the query's best latent matches) and
        their graph neighbours: one step of nearest-neighbour descent from good starting points, so no
        second index over raw features is needed. With `category` [B], candidates from other
        categories are dropped (the query joins that category's graph).
        """
        start = torch.as_tensor(seeds, dtype=torch.int64)
        hop = self.neighbours[start.clamp(min=0)]
        hop[start < 0] = PAD
        candidates = torch.cat([start, hop.flatten(1)], dim=1).numpy()
        valid = candidates >= 0
        if category is not None and self.categories is not None:
            valid &= self.categories[np.where(valid, candidates, 0)] == np.asarray(category, dtype=object)[:, None]
        feats = np.asarray(self.features[np.where(valid, candidates, 0).ravel()], dtype=np.float32)
        scores = np.einsum("bcd,bd->bc", feats.reshape(*candidates.shape, -1), np.asarray(x, np.float32))
        scores[~valid] = -np.inf
        out = np.full((len(x), k), PAD, dtype=np.int64)
        for b in range(len(x)):  # de-duplicate per row: a node can be reached from several seeds
            ids, first = np.unique(candidates[b][valid[b]], return_index=True)
            best = np.argsort(-scores[b][valid[b]][first], kind="stable")[:k]
            out[b, : len(best)] = ids[best]
        return out

    @torch.no_grad()
    def context_aware(self, x: np.ndarray, query_neighbours: np.ndarray) -> np.ndarray:
        """Latents of queries inserted into the graph with edges from `query_neighbours` [B, k], [B, latent].

        The subgraph holds the queries, their neighbours and as many further hops as the encoder has
        layers minus one, each with its full neighbourhood, so the neighbours' hidden states are the
        ones they have in the indexed graph. Only the queries' rows of the result are returned.
        """
        q = torch.as_tensor(query_neighbours, dtype=torch.int64)
        b = len(q)
        hop1 = torch.unique(q[q >= 0])
        layers = self.model.encoder.num_layers
        if layers > 1 and len(hop1):
            sub = sampling.sample(self.neighbours, hop1, [-1] * (layers - 1))
            nodes, rows, cols = sub.node, sub.row, sub.col
        else:
            nodes, rows, cols = hop1, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        local = {int(n): i for i, n in enumerate(nodes.tolist())}
        qb, qj = (q >= 0).nonzero(as_tuple=True)
        src = torch.tensor([local[int(n)] for n in q[qb, qj].tolist()], dtype=torch.int64) + b
        edge_index = torch.cat([torch.stack([rows + b, cols + b]), torch.stack([src, qb])], dim=1)
        x_all = torch.cat([torch.as_tensor(x, dtype=torch.float32),
                           torch.as_tensor(np.asarray(self.features[nodes.numpy()], dtype=np.float32))])
        return self.model.encode(x_all, edge_index)[:b].numpy()


class ExpansionEncoder:
    """GRAD-Net's query latents: query feature expansion (QFE, diffusion.query_feature_expansion) of a query's raw
    features over its `k` nearest indexed images' diffused latents, `rounds` times (2: the second round from the
    nearest by the first round's latent). `raw` [N, d] are the indexed images' raw features and `latents` [N, D]
    their diffused features, row for row; neither the network nor the graph is needed."""

    def __init__(self, raw: np.ndarray, latents: np.ndarray, k: int, rounds: int) -> None:
        if len(raw) != len(latents):
            raise ValueError(f"{len(raw)} raw feature rows for {len(latents)} latents: they go row for row")
        self.raw, self.latents = normalise(raw), normalise(latents)
        self.k, self.rounds = k, rounds

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Unit query latents [B, D] of query features x [B, d]."""
        return query_feature_expansion(x, self.raw, self.latents, self.k, self.rounds)


def search_expanded(searcher: Searcher, encoder: ExpansionEncoder, x: np.ndarray, k: int, scoring: str,
                    by: Retrieval) -> SearchResults:
    """Categorize and retrieve with GRAD-Net's query latent (QFE)."""
    return searcher.search(encoder.encode(x), k, scoring, by.similarity, by.style, by.candidates)


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """How matches are ranked inside the chosen category (Searcher.retrieve): by content (the latents), style
    (`style`: the queries' style vectors [B, S]) or the adaptive score of both."""

    similarity: str = "content"
    style: np.ndarray | None = None
    candidates: int = 100


def search_context_aware(searcher: Searcher, encoder: QueryEncoder, x: np.ndarray, k: int, scoring: str,
                         insert_k: int, by: Retrieval) -> SearchResults:
    """Approach I: insert each query into the whole graph next to the nodes with the most similar features
    around its best context-free matches, then categorize and retrieve with its context-aware latent."""
    seeds = searcher.index.search_all(encoder.context_free(x), SEEDS)[0]
    z1 = encoder.context_aware(x, encoder.insertion_neighbours(x, encoder.nodes(seeds), insert_k))
    return searcher.search(z1, k, scoring, by.similarity, by.style, by.candidates)


def search_category_aware(searcher: Searcher, encoder: QueryEncoder, x: np.ndarray, k: int, scoring: str,
                          insert_k: int, by: Retrieval) -> SearchResults:
    """Approach II: categorize with the context-free latent, then insert the query into the chosen
    category's graph and retrieve inside it with the context-aware latent."""
    searcher.check_similarity(by.similarity, by.style)
    z0 = encoder.context_free(x)
    best, scores = searcher.categorize(z0, scoring, k)
    seeds = searcher.index.retrieve_many(z0, list(best), SEEDS)[0]
    neighbours = encoder.insertion_neighbours(x, encoder.nodes(seeds), insert_k, category=best)
    ids, match_scores, labels = searcher.retrieve(encoder.context_aware(x, neighbours), best, k, by.similarity,
                                                  by.style, by.candidates)
    return SearchResults(searcher.names, best, scores.astype(np.float32), ids, match_scores, labels,
                         np.ones(len(x), dtype=bool))


def search_context_free(searcher: Searcher, encoder: QueryEncoder, x: np.ndarray, k: int, scoring: str,
                        insert_k: int, by: Retrieval) -> SearchResults:
    """Categorize and retrieve with the latent of the query seen alone (self-loops only)."""
    return searcher.search(encoder.context_free(x), k, scoring, by.similarity, by.style, by.candidates)


# How a query's latent is formed (`--query-latent`; config.py validates against it).
LATENT_MODES = {"context-aware": search_context_aware, "category-aware": search_category_aware,
                "context-free": search_context_free}


def search(searcher: Searcher, encoder: QueryEncoder | ExpansionEncoder, x: np.ndarray, mode: str, k: int,
           scoring: str, insert_k: int = 0, by: Retrieval | None = None) -> SearchResults:
    """Categorize and retrieve the query features `x` [B, D] against latent representatives, forming the
    query latents by `mode` (see LATENT_MODES; a GRAD-Net ExpansionEncoder has one way, QFE, and ignores it);
    `insert_k` graph neighbours per inserted query, 0 = the graph's k; matches ranked as `by` says. This is the
    query path of the query stage and of bench/quality.py alike."""
    if isinstance(encoder, ExpansionEncoder):
        return search_expanded(searcher, encoder, x, k, scoring, by or Retrieval())
    return LATENT_MODES[mode](searcher, encoder, x, k, scoring, insert_k or int(encoder.neighbours.shape[1]),
                              by or Retrieval())
