"""Label-aware class nodes (issue 11 item 3): categorization accuracy, and categories held out of training.

    nice -n 10 python bench/unseen.py --dataset digits --seeds 0,1,2 --edges knn,none --epochs 10   # ~11 min
    nice -n 10 python bench/unseen.py --dataset digits --seeds 0,1,2 --edges none --lambdas 0.1,1,10 --epochs 20
    nice -n 10 python bench/unseen.py --dataset fashion-mnist --index-limit 10000 --query-limit 2000 --edges none

The first Fashion-MNIST run embeds 15,000 images with MobileNetV2 on the CPU (about 30 CPU-minutes) before
any training, unless bench/quality.py cached them already.

MobileNetV2 features (bench/quality.py's seed-0 split and feature cache) -> exact 10-NN graph ->
gatrep.models.classnodes trained on mini-batches of the neighbour sampler. Hyperparameters (image k-NN edges on
or off, temperature, lambda, epochs) are chosen on a validation split carved from the index (20%, stratified,
seed 0), never on the test queries. Then, per seed:
 (a) accuracy of class-node scoring (cosine to the category-node embeddings) and of a 10-NN vote in the class-node
     latent space, queries inserted into the graph (query_latents.search, context-aware), against a 10-NN vote
     and centroids over raw features (Searcher.search) and, for reference, a logistic regression on raw features;
 (b) three categories held out of training (their images stay in the graph, unlabelled, with no category node):
     K-Means ARI / purity of their indexed images, gatrep.represent.discover_categories (threshold, kmeans, dbscan;
     threshold and eps chosen on seen categories) on them, and how often review() flags seen and unseen queries.
Figures are mean ± half the range over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: `bench` importable
from bench import quality  # noqa: E402 - the pools, split, feature cache and Searcher of bench/quality.py
from gatrep import represent  # noqa: E402
from gatrep.categorize import review  # noqa: E402
from gatrep.config import ModelConfig  # noqa: E402
from gatrep.models import classnodes as cn  # noqa: E402
from gatrep.models import query_latents  # noqa: E402
from gatrep.vectors import PAD, exact_knn, normalise  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Data:
    x: np.ndarray
    y: np.ndarray
    xq: np.ndarray
    yq: np.ndarray


def load(args: argparse.Namespace) -> Data:
    """Features of seed 0's split of bench/quality.py (its pools, split and feature cache under --cache)."""
    pool, x_pool, xq_pool = quality.pool_features(args)
    rows, qrows = quality.split(pool, 0, args.index_limit, args.query_limit)
    return Data(x_pool[rows], pool.index_labels[rows], xq_pool[qrows], pool.query_labels[qrows])


def model_config(in_dim: int) -> ModelConfig:
    """A GAT-AE small enough to train in minutes on 2 CPU cores (the paper's is 256 x 4 heads)."""
    return ModelConfig(in_dim=in_dim, hidden=64, heads=4, latent_dim=64, decoder_hidden=(256,))


def neighbours_of(x: np.ndarray, edges: str, k: int = 10) -> np.ndarray:
    """The image k-NN table, or an all-PAD table for 'none' (images joined to their category node only)."""
    table = exact_knn(normalise(x), k)[0]
    return table if edges == "knn" else np.full_like(table, PAD)


def query_latents_of(trained: cn.TrainedClassNodes, s: Any, x: np.ndarray, nbrs: np.ndarray, labels: np.ndarray,
                     xq: np.ndarray) -> np.ndarray:
    """Context-aware query latents, formed as query_latents.search_context_aware forms them."""
    encoder = encoder_of(trained, x, nbrs, labels)
    seeds = s.index.search_all(encoder.context_free(xq), query_latents.SEEDS)[0]
    return encoder.context_aware(xq, encoder.insertion_neighbours(xq, encoder.nodes(seeds), nbrs.shape[1]))


def encoder_of(trained: cn.TrainedClassNodes, x: np.ndarray, nbrs: np.ndarray,
               labels: np.ndarray) -> query_latents.QueryEncoder:
    ids = np.array([str(i) for i in range(len(x))], dtype=object)
    return query_latents.QueryEncoder(trained.autoencoder, x, nbrs, labels, ids)


def accuracies(trained: cn.TrainedClassNodes, x: np.ndarray, nbrs: np.ndarray, labels: np.ndarray,
               xq: np.ndarray, yq: np.ndarray) -> dict[str, float]:
    """Class-node scoring and 10-NN vote in the latent space, through query_latents.search (context-aware)."""
    s = cn.class_searcher(trained, labels)
    encoder = encoder_of(trained, x, nbrs, labels)
    return {scoring: float(np.mean(query_latents.search(s, encoder, xq, "context-aware", 10, scoring).category == yq))
            for scoring in ("single", "knn")}


def select(data: Data, args: argparse.Namespace) -> tuple[str, cn.ClassNodeSettings]:
    """The (edges, settings) with the best validation accuracy, over the grid of --edges, --temperatures, --lambdas
    and epochs (every --eval-every up to --epochs)."""
    x, xv, y, yv = train_test_split(data.x, data.y, test_size=0.2, stratify=data.y, random_state=0)
    best: tuple[float, str, cn.ClassNodeSettings] | None = None
    print("validation (20% of the index, seed 0): accuracy by class node / latent 10-NN vote")
    for edges, tau, lam in itertools.product(args.edges.split(","), args.temperatures, args.lambdas):
        nbrs = neighbours_of(x, edges)
        settings = cn.ClassNodeSettings(temperature=tau, reconstruction_weight=lam, epochs=args.epochs)
        found: list[tuple[int, dict[str, float]]] = []

        def score(t: cn.TrainedClassNodes, nbrs: np.ndarray = nbrs, found: list[Any] = found) -> None:
            if t.history[-1].epoch % args.eval_every == 0:
                found.append((t.history[-1].epoch, accuracies(t, x, nbrs, y, xv, yv)))

        t0 = time.perf_counter()
        cn.train_class_nodes(model_config(x.shape[1]), x, cn.build_class_graph(nbrs, y), settings, on_epoch=score)
        curve = "  ".join(f"{e}: {a['single']:.1%}/{a['knn']:.1%}" for e, a in found)
        print(f"  edges={edges:4s} tau={tau:<5g} lambda={lam:<5g} {curve}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        for epoch, acc in found:
            if best is None or acc["single"] > best[0]:
                best = (acc["single"], edges, dataclasses.replace(settings, epochs=epoch))
    assert best is not None
    print(f"chosen: edges={best[1]} {best[2]} (validation accuracy {best[0]:.1%})")
    return best[1], best[2]


def raw_rows(data: Data) -> dict[str, float]:
    """Raw-feature baselines through Searcher.search, and a logistic regression for reference."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    s = quality.searcher(data.x, data.y, "centroid")
    rows = {f"raw {name}": float(np.mean(s.search(data.xq, 10, scoring).category == data.yq))
            for name, scoring in (("rep=centroid", "single"), ("10-NN vote", "knn"))}
    scaler = StandardScaler().fit(data.x)
    probe = LogisticRegression(C=0.1, max_iter=300).fit(scaler.transform(data.x), data.y.astype(str))
    rows["raw logistic regression (supervised, no graph; reference)"] = float(
        np.mean(probe.predict(scaler.transform(data.xq)) == data.yq.astype(str)))
    return rows


def part_a(data: Data, edges: str, settings: cn.ClassNodeSettings, seed: int) -> dict[str, float]:
    nbrs = neighbours_of(data.x, edges)
    trained = cn.train_class_nodes(model_config(data.x.shape[1]), data.x, cn.build_class_graph(nbrs, data.y),
                                   dataclasses.replace(settings, seed=seed))
    acc = accuracies(trained, data.x, nbrs, data.y, data.xq, data.yq)
    return {f"class nodes (edges={edges}), class-node scoring": acc["single"],
            f"class nodes (edges={edges}), 10-NN vote in latent space": acc["knn"]}


def purity(truth: np.ndarray, found: np.ndarray) -> float:
    """Share of images whose cluster's majority category is their own."""
    total = 0
    for cluster in np.unique(found):
        total += np.unique(truth[found == cluster], return_counts=True)[1].max()
    return total / len(truth)


def discovery_options(unit: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(threshold, eps) with the best ARI on images of seen categories (at most 1,500): never on unseen ones."""
    pick = np.random.default_rng(0).permutation(len(unit))[:1500]
    unit, truth = unit[pick], truth[pick]
    grid = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

    def ari(method: str, **options: Any) -> float:
        return float(adjusted_rand_score(truth, represent.discover_categories(unit, method, **options)))

    threshold = max(grid, key=lambda t: ari("threshold", threshold=t))
    eps = max((0.02, 0.05, 0.1, 0.2, 0.3), key=lambda e: ari("dbscan", eps=e, min_samples=5))
    return threshold, eps


def clustering(vectors: np.ndarray, truth: np.ndarray, seen: np.ndarray, seen_truth: np.ndarray,
               n: int) -> dict[str, float]:
    """K-Means ARI / purity and discover_categories' ARI on the unseen images' vectors."""
    unit = normalise(vectors)
    threshold, eps = discovery_options(normalise(seen), seen_truth)
    out = {}
    for method, options in (("kmeans", {"n_clusters": n}), ("threshold", {"threshold": threshold}),
                            ("dbscan", {"eps": eps, "min_samples": 5})):
        found = represent.discover_categories(unit, method, **options)
        out[f"{method} ARI"] = float(adjusted_rand_score(truth, found))
        if method == "kmeans":
            out["kmeans purity"] = purity(truth, found)
        else:
            out[f"{method} clusters"] = float(len(np.unique(found)))
    return out


def flag_rates(s: Any, zq: np.ndarray, unseen: np.ndarray, min_confidence: float) -> dict[str, float]:
    """Share of seen / unseen queries that review() flags (low_confidence or unlike_every_category)."""
    _, scores = s.categorize(zq, "single")
    _, reasons = review(scores, s.index.best_per_category(zq), s.index.typical_similarity(), min_confidence)
    flagged = reasons != None  # noqa: E711 - elementwise comparison of an object array
    unlike = np.array([r is not None and "unlike" in r for r in reasons])
    return {"flagged seen": float(flagged[~unseen].mean()), "flagged unseen": float(flagged[unseen].mean()),
            "unlike_every_category seen": float(unlike[~unseen].mean()),
            "unlike_every_category unseen": float(unlike[unseen].mean())}


def part_b(data: Data, edges: str, settings: cn.ClassNodeSettings, seed: int, held: int,
           min_confidence: float) -> dict[str, float]:
    names = np.unique(data.y)
    out_names = np.random.default_rng(seed).choice(names, held, replace=False)
    hidden = np.isin(data.y, out_names)
    labels = data.y.copy()
    labels[hidden] = None
    nbrs = neighbours_of(data.x, edges)
    trained = cn.train_class_nodes(model_config(data.x.shape[1]), data.x, cn.build_class_graph(nbrs, labels),
                                   dataclasses.replace(settings, seed=seed))
    print(f"  seed {seed}: held out {', '.join(sorted(out_names))}", flush=True)
    s = cn.class_searcher(trained, labels)
    zq = query_latents_of(trained, s, data.x, nbrs, labels, data.xq)
    unseen_q = np.isin(data.yq, out_names)
    best, _ = s.categorize(zq, "single")
    row = {"seen-query accuracy (class nodes)": float(np.mean(best[~unseen_q] == data.yq[~unseen_q]))}
    truth = data.y[hidden]
    for space, vectors in (("latent", trained.latents), ("raw", data.x)):
        stats = clustering(vectors[hidden], truth, vectors[~hidden], data.y[~hidden], held)
        row |= {f"{space}: {k}": v for k, v in stats.items()}
    row |= {f"latent: {k}": v for k, v in flag_rates(s, zq, unseen_q, min_confidence).items()}
    raw = quality.searcher(data.x[~hidden], data.y[~hidden], "centroid")
    row |= {f"raw centroid: {k}": v for k, v in flag_rates(raw, data.xq, unseen_q, min_confidence).items()}
    return row


def table(runs: list[dict[str, float]], percent: bool = True) -> list[str]:
    lines = []
    for key in runs[0]:
        v = np.array([r[key] for r in runs])
        if percent:
            lines.append(f"  {key:66s} {v.mean():7.1%} ± {np.ptp(v) / 2:.1%}")
        else:
            lines.append(f"  {key:66s} {v.mean():7.3f} ± {np.ptp(v) / 2:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--index-limit", type=int, default=10000, help="Fashion-MNIST training images indexed")
    parser.add_argument("--query-limit", type=int, default=2000, help="Fashion-MNIST test images queried")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--index-pool", type=int, default=12_000, help="as bench/quality.py")
    parser.add_argument("--query-pool", type=int, default=3_000, help="as bench/quality.py")
    parser.add_argument("--device", default="cpu", help="backbone device")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/gatrep/bench"),
                        help="folder of cached backbone features, shared with bench/quality.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--edges", default="knn,none", help="validation grid: image k-NN edges on (knn) or off")
    parser.add_argument("--temperatures", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.3])
    parser.add_argument("--lambdas", type=lambda s: [float(v) for v in s.split(",")], default=[1.0])
    parser.add_argument("--epochs", type=int, default=15, help="most epochs tried on validation")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--held-out", type=int, default=3, help="categories held out of training in (b)")
    parser.add_argument("--min-confidence", type=float, default=0.2, help="review()'s margin (jobs.query default)")
    parser.add_argument("--parts", default="a,b")
    parser.add_argument("--procs", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.procs)
    if args.dataset == "digits":
        args.index_limit = args.query_limit = 0
    start = time.perf_counter()
    data = load(args)
    print(f"{args.dataset}: {len(data.x)} indexed, {len(data.xq)} test queries, features {data.x.shape[1]}-d "
          f"({args.backbone}); model {model_config(data.x.shape[1])}", flush=True)
    edges, settings = select(data, args)
    seeds = [int(s) for s in args.seeds.split(",")]
    if "a" in args.parts:
        runs = [part_a(data, edges, settings, seed) for seed in seeds]
        print(f"\n(a) categorization accuracy on the {len(data.xq)} test queries ({len(seeds)} seeds):")
        for name, acc in raw_rows(data).items():
            print(f"  {name:66s} {acc:7.1%}   (no training)")
        print("\n".join(table(runs)), flush=True)
    if "b" in args.parts:
        runs = [part_b(data, edges, settings, seed, args.held_out, args.min_confidence) for seed in seeds]
        print(f"\n(b) {args.held_out} categories held out of training (a different draw per seed):")
        print("\n".join(table(runs, percent=False)))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
