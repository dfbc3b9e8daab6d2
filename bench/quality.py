"""Categorization and retrieval quality of every method on held-out labelled splits, over several seeds.

    python bench/quality.py --dataset digits --seeds 0,1,2                  # 1,437 indexed / 360 held out per seed
    python bench/quality.py --dataset fashion-mnist --seeds 0,1,2           # 10,000 indexed / 2,000 test queries
    python bench/quality.py --dataset fashion-mnist --index-limit 0 --query-limit 0 --device cuda  # 60,000 / 10,000

Each seed draws its own split (digits: a stratified 80/20 split of the 1,797 images; Fashion-MNIST: the indexed
images from the training set, the queries from the test set) and its own training; every figure is printed as
the mean ± half the range over the seeds. Backbone features (MobileNetV2 ImageNet weights by default) are
computed once per image pool and cached (--cache).

Every query goes through the query stage's own code: `Searcher.search` for raw features (with the categorize.Options
the query stage builds from its --vote-power, --expand, --expand-power and --scope flags) and
`query_latents.search` for GAT-AE latents. Each method is judged twice: retrieval inside the chosen category
(the paper's path; its mAP@k follows the categorization) and over the whole index (--scope all: what retrieval
adds by itself). A match is relevant when it carries the query's category.

Hyperparameters are chosen per seed on a validation split carved from the index (80% indexed, 20% queried),
never on the test queries: the vote's power (by accuracy), the number of k-means representatives (by accuracy)
and query expansion's neighbours and power (by mAP@k over the whole index).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from gatrep import backbones, evaluate, images, represent
from gatrep.categorize import CategoryIndex, Options, Searcher, SearchResults
from gatrep.config import ModelConfig
from gatrep.models import GraphAutoencoder, build_model, context_aware_latents, query_latents
from gatrep.models.epoch import train_epoch
from gatrep.sampling import make_loader
from gatrep.vectors import exact_knn

VOTE_POWERS = (0.0, 1.0, 2.0, 4.0, 8.0)
KMEANS_SIZES = (3, 5, 10, 20)
EXPANSIONS = ((0, 0.0), (2, 1.0), (2, 3.0), (5, 1.0), (5, 3.0), (10, 1.0), (10, 3.0))
PLAIN = Options()  # one vote per neighbour, no expansion, retrieval inside the category


# ----------------------------------------------------------------------------------------------
# Images, splits and features


@dataclasses.dataclass(frozen=True)
class Pool:
    """The images a split draws from: `index` and `query` grey images [n, h, w] with their labels. Digits has one
    pool that each seed splits in two (`shared`); Fashion-MNIST draws the index from its training set and the
    queries from its test set."""

    index: np.ndarray
    index_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    shared: bool


def load_pool(dataset: str, index_pool: int, query_pool: int, fashion_dir: str) -> Pool:
    """Digits: all 1,797 images; Fashion-MNIST: `index_pool` training and `query_pool` test images (0 = all),
    the same ones for every seed (a fixed permutation), so that their features are computed once."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        labels = np.array([f"digit-{t}" for t in digits.target], dtype=object)
        return Pool(pixels, labels, pixels, labels, shared=True)
    from gatrep import datasets

    def part(split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, targets = datasets.load_fashion_mnist(split, source=fashion_dir)
        rows = np.sort(np.random.default_rng(0).permutation(len(pixels))[:limit]) if limit else np.arange(len(pixels))
        return pixels[rows], np.array([datasets.FASHION_MNIST_CATEGORIES[t] for t in targets[rows]], dtype=object)

    return Pool(*part("train", index_pool), *part("test", query_pool), shared=False)


def split(pool: Pool, seed: int, index_limit: int, query_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(index rows, query rows) of one seed: a stratified 80/20 split of a shared pool, or `index_limit` and
    `query_limit` rows (0 = all) drawn from each pool."""
    from sklearn.model_selection import train_test_split

    if pool.shared:
        rows = np.arange(len(pool.index))
        index, query = train_test_split(rows, test_size=0.2, stratify=pool.index_labels, random_state=seed)
        return np.sort(index), np.sort(query)
    rng = np.random.default_rng(seed)

    def draw(n: int, limit: int) -> np.ndarray:
        return np.sort(rng.choice(n, size=limit, replace=False)) if limit and limit < n else np.arange(n)

    return draw(len(pool.index), index_limit), draw(len(pool.query), query_limit)


def _crop(args: tuple[np.ndarray, images.Preprocess]) -> np.ndarray:
    grey, prep = args
    return images._to_array(Image.fromarray(grey).convert("RGB"), prep)


def crops(grey: np.ndarray, backbone: str, procs: int) -> np.ndarray:
    """The backbone's preprocessed crops of every image (the embedding job's own resize and crop)."""
    prep = backbones.get(backbone).preprocess
    with multiprocessing.Pool(procs) as pool:
        return np.stack(pool.map(_crop, [(g, prep) for g in grey], chunksize=256))


def features(backbone: str, weights: str, device: str, grey: np.ndarray, procs: int, batch: int = 256) -> np.ndarray:
    """Backbone features of grey images, crop by crop as the embed job makes them."""
    encoder = backbones.get(backbone).load(weights, device)
    out = []
    for start in range(0, len(grey), 4096):  # crops of 4,096 images at a time: bounded memory at 60,000
        pixels = crops(grey[start:start + 4096], backbone, procs)
        out += [encoder(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return np.concatenate(out)


def cached_features(args: argparse.Namespace, grey: np.ndarray) -> np.ndarray:
    """`features` of `grey`, read from or written to --cache (keyed by backbone, weights and the pixels)."""
    key = hashlib.sha256(grey.tobytes() + f"{args.backbone}/{args.weights}".encode()).hexdigest()[:20]
    path = os.path.join(args.cache, f"{args.backbone}-{key}.npy")
    if args.cache and os.path.exists(path):
        return np.load(path)
    x = features(args.backbone, args.weights, args.device, grey, args.procs)
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
        np.save(path, x)
    return x


def pool_features(args: argparse.Namespace) -> tuple[Pool, np.ndarray, np.ndarray]:
    """The image pool of --dataset and the cached features of its index and query pools (one array when shared)."""
    pool = load_pool(args.dataset, args.index_pool, args.query_pool, args.fashion_dir)
    x_pool = cached_features(args, pool.index)
    return pool, x_pool, x_pool if pool.shared else cached_features(args, pool.query)


# ----------------------------------------------------------------------------------------------
# Judging one method on one split


@dataclasses.dataclass(frozen=True)
class Figures:
    """One method on one split: categorization accuracy, mAP@k inside the chosen category, and precision@k and
    mAP@k of retrieval over the whole index."""

    accuracy: float
    map_category: float
    precision_all: float
    map_all: float


Search = Callable[[Searcher], SearchResults]  # one method's query path over a Searcher


def searcher(vectors: np.ndarray, labels: np.ndarray, method: str, central: list[np.ndarray] | None = None,
             options: Options = PLAIN) -> Searcher:
    """A Searcher over `vectors` grouped by their given category (one listing per category), as the index stage
    builds it: `method`'s representative per category and `central` extra representatives (rows per category,
    default: the top-3 most central images)."""
    reps = represent.represent_groups(vectors, labels, method)
    central = central if central is not None else represent.central_images(vectors, labels, 3, "top")
    ids = np.array([str(i) for i in range(len(vectors))], dtype=object)
    # Exact search inside each category: quality, not speed, is measured here (bench/query.py times the ANN).
    index = CategoryIndex.build(vectors, ids, labels, labels, ann_min_size=2**62)
    return Searcher(reps.groups, reps.vectors, [vectors[rows] for rows in central], reps.groups, index,
                    options=options)


def judge(s: Searcher, search: Search, query_labels: np.ndarray, k: int) -> Figures:
    """Figures of `search` over `s`: once as it is (scope category) and once over the whole index."""
    relevant = s.index.label_counts()
    counts = [relevant.get(str(y), 0) for y in query_labels]
    label_of = dict(zip(s.names, s.labels, strict=True))
    found = search(s)
    inside = evaluate.method_result("", list(query_labels), [label_of.get(c) for c in found.category],
                                    list(found.match_labels), counts, k)
    everywhere = search(dataclasses.replace(s, options=dataclasses.replace(s.options, scope="all")))
    overall = evaluate.retrieval(list(query_labels), list(everywhere.match_labels), counts, k)
    assert inside.retrieval is not None
    return Figures(inside.categorization.accuracy, inside.retrieval.map, overall.precision, overall.map)


def raw_search(xq: np.ndarray, k: int, scoring: str) -> Search:
    return lambda s: s.search(xq, k, scoring)


def latent_search(encoder: query_latents.QueryEncoder, xq: np.ndarray, mode: str, k: int, scoring: str,
                  options: Options = PLAIN) -> Search:
    """The query stage's latent path with `options`, retrieving where the Searcher's own options say."""
    return lambda s: query_latents.search(dataclasses.replace(s, options=dataclasses.replace(
        options, scope=s.options.scope)), encoder, xq, mode, k, scoring)


# ----------------------------------------------------------------------------------------------
# Hyperparameters chosen on validation


@dataclasses.dataclass(frozen=True)
class Tuned:
    """Settings chosen on a validation split of the index."""

    vote_power: float
    kmeans_m: int
    expand: int
    expand_power: float

    def describe(self) -> str:
        return (f"vote power {self.vote_power:g}, k-means m={self.kmeans_m}, expansion "
                f"{self.expand} neighbours ^{self.expand_power:g}")


def tune(x: np.ndarray, labels: np.ndarray, seed: int, k: int) -> Tuned:
    """Choose the vote's power and the k-means representative count by validation accuracy, and the query
    expansion by validation mAP@k over the whole index (ties: the earlier, simpler setting)."""
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(np.arange(len(x)), test_size=0.2, stratify=labels, random_state=seed)
    xv, yv = x[val], labels[val]
    base = searcher(x[fit], labels[fit], "centroid")

    def figures(options: Options, scoring: str, s: Searcher = base) -> Figures:
        return judge(dataclasses.replace(s, options=options), raw_search(xv, k, scoring), yv, k)

    power = max(VOTE_POWERS, key=lambda p: figures(Options(vote_power=p), "knn").accuracy)
    m = max(KMEANS_SIZES, key=lambda m: figures(Options(), "max", searcher(
        x[fit], labels[fit], "centroid", represent.central_images(x[fit], labels[fit], m, "kmeans", seed))).accuracy)
    n, alpha = max(EXPANSIONS, key=lambda e: figures(Options(power, e[0], e[1]), "knn").map_all)
    return Tuned(power, m, n, alpha)


def raw_rows(x: np.ndarray, labels: np.ndarray, xq: np.ndarray, q: np.ndarray, tuned: Tuned, seed: int,
             k: int) -> dict[str, Figures]:
    """Every raw-feature method of one split, keyed by a name that states its configuration."""
    kmeans = represent.central_images(x, labels, tuned.kmeans_m, "kmeans", seed)
    plain = Options()
    weighted = Options(vote_power=tuned.vote_power)
    expanded = Options(tuned.vote_power, tuned.expand, tuned.expand_power)
    methods: list[tuple[str, Searcher, str]] = [
        ("raw rep=centroid (paper IV-B3)", searcher(x, labels, "centroid"), "single"),
        ("raw rep=most_central (paper IV-A3)", searcher(x, labels, "most_central"), "single"),
        ("raw top-3 central, max", searcher(x, labels, "centroid"), "max"),
        ("raw k-means central (m on validation), max", searcher(x, labels, "centroid", kmeans), "max"),
        ("raw 10-NN vote", searcher(x, labels, "centroid", options=plain), "knn"),
        ("raw 10-NN vote, weighted (power on validation)", searcher(x, labels, "centroid", options=weighted), "knn"),
        ("raw weighted 10-NN vote + expanded-query retrieval (validation)",
         searcher(x, labels, "centroid", options=expanded), "knn"),
    ]
    return {name: judge(s, raw_search(xq, k, scoring), q, k) for name, s, scoring in methods}


# ----------------------------------------------------------------------------------------------
# The GAT-AE


def train(cfg: ModelConfig, x: np.ndarray, neighbours: np.ndarray, epochs: int, device: str, lr: float,
          batch_size: int, seed: int = 0) -> GraphAutoencoder:
    torch.manual_seed(seed)
    model = build_model(cfg)
    if cfg.standardise:
        model.fit_scaling(torch.as_tensor(x))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    feats, nbrs = torch.as_tensor(x), torch.as_tensor(neighbours)
    loader = make_loader(feats, nbrs, torch.arange(len(x)), [10, 10], batch_size, shuffle=True, seed=seed)
    for epoch in range(epochs):
        stats = train_epoch(model, optimizer, loader, device)
        if epoch in (0, epochs // 2, epochs - 1):
            print(f"    epoch {epoch + 1}: loss {stats.loss:.5f} ({stats.seconds:.2f} s)", flush=True)
    return model.cpu().eval()


def variants(in_dim: int) -> dict[str, ModelConfig]:
    """The paper's GAT-AE on unit vectors; gatrep's default (features standardised per dimension inside the
    model); GraphSAGE as the encoder, either way."""
    return {
        "paper": ModelConfig(in_dim=in_dim, standardise=False),
        "standardised": ModelConfig(in_dim=in_dim),
        "sage": ModelConfig(in_dim=in_dim, encoder="sage", standardise=False),
        "sage-standardised": ModelConfig(in_dim=in_dim, encoder="sage"),
    }


def gat_rows(args: argparse.Namespace, x: np.ndarray, labels: np.ndarray, xq: np.ndarray, q: np.ndarray,
             tuned: Tuned, seed: int) -> dict[str, Figures]:
    """Every GAT-AE variant trained with `seed` on the index's exact k-NN graph, queried through
    query_latents.search: Approach I (context-aware) and II (category-aware) with most-central representatives,
    and the k-NN votes over the latents."""
    nbrs = exact_knn(x, args.k)[0]
    ids = np.array([str(i) for i in range(len(x))], dtype=object)
    rows = {}
    for name in [v for v in args.variants.split(",") if v]:
        print(f"  seed {seed}: training GAT-AE variant {name!r} for {args.epochs} epochs", flush=True)
        model = train(variants(x.shape[1])[name], x, nbrs, args.epochs, args.device, 1e-3, args.batch_size, seed)
        z = context_aware_latents(model, torch.as_tensor(x), torch.as_tensor(nbrs), 4096).numpy()
        encoder = query_latents.QueryEncoder(model, x, nbrs, labels, ids)
        s = searcher(z, labels, "most_central")
        methods = [("category-aware rep=most_central (paper Approach II)", "category-aware", "single", PLAIN),
                   ("context-aware rep=most_central (Approach I)", "context-aware", "single", PLAIN),
                   ("context-aware 10-NN vote", "context-aware", "knn", PLAIN),
                   ("context-aware weighted 10-NN vote (raw validation's power)", "context-aware", "knn",
                    Options(vote_power=tuned.vote_power))]
        for label, mode, scoring, options in methods:
            rows[f"gat-ae {name} {label}"] = judge(s, latent_search(encoder, xq, mode, args.k, scoring, options),
                                                   q, args.k)
    return rows


# ----------------------------------------------------------------------------------------------
# Output


def spread(values: list[float], percent: bool) -> str:
    a = np.array(values)
    return f"{a.mean():.1%} ± {np.ptp(a) / 2:.1%}" if percent else f"{a.mean():.3f} ± {np.ptp(a) / 2:.3f}"


def markdown(runs: list[dict[str, Figures]], k: int) -> str:
    """One row per method: mean ± half the range over the seeds of each figure; the best of each column in bold."""
    names = list(runs[0])
    columns = [("accuracy", "accuracy", True), (f"mAP@{k} in category", "map_category", False),
               (f"P@{k} whole index", "precision_all", False), (f"mAP@{k} whole index", "map_all", False)]

    def mean(name: str, attr: str) -> float:
        return float(np.mean([getattr(r[name], attr) for r in runs]))

    best = {attr: max(names, key=lambda n: mean(n, attr)) for _, attr, _ in columns}  # noqa: B023 - used at once
    lines = ["| method | " + " | ".join(c for c, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = []
        for _, attr, percent in columns:
            cell = spread([getattr(r[name], attr) for r in runs], percent)
            cells.append(f"**{cell}**" if best[attr] == name else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--index-limit", type=int, default=10_000, help="Fashion-MNIST images indexed (0 = all)")
    parser.add_argument("--query-limit", type=int, default=2_000, help="Fashion-MNIST test images queried (0 = all)")
    parser.add_argument("--index-pool", type=int, default=12_000,
                        help="Fashion-MNIST training images the seeds draw the index from (0 = all 60,000)")
    parser.add_argument("--query-pool", type=int, default=3_000,
                        help="Fashion-MNIST test images the seeds draw the queries from (0 = all 10,000)")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist", help="the IDX .gz files")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/gatrep/bench"),
                        help="folder of cached backbone features ('' = none)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="comma separated: each draws its split and trains")
    parser.add_argument("--variants", default="", help="GAT-AE variants trained per seed, comma separated "
                                                       "(paper, standardised, sage, sage-standardised); '' = none")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--procs", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.procs)

    start = time.perf_counter()
    pool, x_pool, xq_pool = pool_features(args)
    print(f"{args.dataset}: features {x_pool.shape} of the index pool, {len(pool.query)} query pool images; "
          f"{args.backbone} on {args.device}; {time.perf_counter() - start:.1f} s", flush=True)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows, qrows = split(pool, seed, args.index_limit, args.query_limit)
        x, labels, xq, q = x_pool[rows], pool.index_labels[rows], xq_pool[qrows], pool.query_labels[qrows]
        tuned = tune(x, labels, seed, args.k)
        print(f"  seed {seed}: {len(x)} indexed, {len(xq)} queries; on validation: {tuned.describe()}", flush=True)
        run: dict[str, Any] = raw_rows(x, labels, xq, q, tuned, seed, args.k)
        run.update(gat_rows(args, x, labels, xq, q, tuned, seed))
        runs.append(run)
        print(f"    {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\n{args.dataset}, {len(runs)} seeds (mean ± half the range), {args.backbone}:\n")
    print(markdown(runs, args.k))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
