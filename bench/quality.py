"""Categorization and retrieval quality of every method on one labelled split, side by side.

    python bench/quality.py --dataset digits --seeds 0,1,2         # 1,437 indexed / 360 held-out queries
    python bench/quality.py --dataset fashion-mnist --device cuda   # 60,000 indexed / 10,000 test queries

The method in-process on gatrep's own modules (no Ray, so it also runs on a GPU machine without it):
backbone features -> exact k-NN graph -> GAT-AE trained with the neighbour sampler -> latents ->
representatives per category (categories given; each category is one listing, the paper's Approach
II) -> categorize the held-out queries -> retrieve inside the chosen category. Queries go through the
query stage's own path (gatrep.models.query_latents.search for latents, Searcher.search for raw
features). Every row names its representative method (`rep=`) and category scoring. Baselines on the
same split: raw features with centroid / most-central / top-m central representatives, a k-NN vote
over the index, and HOG. Trained rows are repeated for each seed of --seeds and given as mean ± spread
(half the range) of accuracy; the features and baselines do not depend on the seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from gatrep import backbones, evaluate, images, represent
from gatrep.categorize import CategoryIndex, Searcher
from gatrep.config import ModelConfig
from gatrep.models import GraphAutoencoder, build_model, context_aware_latents, query_latents
from gatrep.models.epoch import train_epoch
from gatrep.sampling import make_loader
from gatrep.vectors import exact_knn


@dataclasses.dataclass(frozen=True)
class Split:
    index: np.ndarray  # uint8 [n, h, w] grey images
    index_labels: np.ndarray
    queries: np.ndarray
    query_labels: np.ndarray


def load_split(dataset: str, index_limit: int, query_limit: int, fashion_dir: str, seed: int = 0) -> Split:
    """Digits: the demo's stratified 80/20 split; Fashion-MNIST: train set indexed, test set queried."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        labels = np.array([f"digit-{t}" for t in digits.target], dtype=object)
        a, b, la, lb = train_test_split(pixels, labels, test_size=0.2, stratify=labels, random_state=seed)
        return Split(a, la, b, lb)
    from gatrep import datasets

    def part(split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, targets = datasets.load_fashion_mnist(split, source=fashion_dir)
        rows = np.random.default_rng(seed).permutation(len(pixels))[:limit] if limit else np.arange(len(pixels))
        return pixels[rows], np.array([datasets.FASHION_MNIST_CATEGORIES[t] for t in targets[rows]], dtype=object)

    return Split(*part("train", index_limit), *part("test", query_limit))


def _crop(args: tuple[np.ndarray, images.Preprocess]) -> np.ndarray:
    grey, prep = args
    return images._to_array(Image.fromarray(grey).convert("RGB"), prep)


def crops(grey: np.ndarray, backbone: str, procs: int) -> np.ndarray:
    """The backbone's preprocessed crops of every image (the embedding job's own resize and crop)."""
    prep = backbones.get(backbone).preprocess
    with multiprocessing.Pool(procs) as pool:
        return np.stack(pool.map(_crop, [(g, prep) for g in grey], chunksize=256))


def features(backbone: str, weights: str, device: str, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    encoder = backbones.get(backbone).load(weights, device)
    return np.concatenate([encoder(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def _hog(chunk: np.ndarray) -> np.ndarray:
    return backbones.get("hog").load("default", "cpu")(chunk)


def hog_features(grey: np.ndarray, procs: int) -> np.ndarray:
    pixels = crops(grey, "hog", procs)
    with multiprocessing.Pool(procs) as pool:
        return np.concatenate(pool.map(_hog, np.array_split(pixels, procs * 4)))


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


def searcher(vectors: np.ndarray, labels: np.ndarray, method: str, top_m: int = 5) -> Searcher:
    """A Searcher over `vectors` grouped by their given category (one listing per category), with `method`'s
    representative per category, as the index stage builds it."""
    reps = represent.represent_groups(vectors, labels, method, top_m)
    central = represent.represent_groups(vectors, labels, "most_central", top_m)
    ids = np.array([str(i) for i in range(len(vectors))], dtype=object)
    # Exact search inside each category: quality, not speed, is measured here (bench/query.py times the ANN).
    index = CategoryIndex.build(vectors, ids, labels, labels, ann_min_size=2**62)
    return Searcher(reps.groups, reps.vectors, [vectors[top] for top in central.top], reps.groups, index)


def judge(name: str, s: Searcher, found: Any, query_labels: np.ndarray, k: int) -> evaluate.MethodResult:
    """One method's figures from the answers the query path gave."""
    relevant = s.index.label_counts()
    label_of = dict(zip(s.names, s.labels, strict=True))
    predicted = [label_of.get(c) for c in found.category]
    return evaluate.method_result(name, list(query_labels), predicted, list(found.match_labels),
                                  [relevant.get(str(y), 0) for y in query_labels], k)


def gat_rows(name: str, model: GraphAutoencoder, x: np.ndarray, nbrs: np.ndarray, xq: np.ndarray,
             labels: np.ndarray, query_labels: np.ndarray, k: int, method: str) -> list[evaluate.MethodResult]:
    """The GAT-AE methods of one trained model through the query stage's path: each query-latent mode with
    `method` representatives (single) and with a k-NN vote over the index latents."""
    z = context_aware_latents(model, torch.as_tensor(x), torch.as_tensor(nbrs), 4096).numpy()
    ids = np.array([str(i) for i in range(len(x))], dtype=object)
    encoder = query_latents.QueryEncoder(model, x, nbrs, labels, ids)
    s = searcher(z, labels, method)
    rows = []
    for mode in ("context-free", "category-aware", "context-aware"):
        for scoring in ("single", "knn"):
            found = query_latents.search(s, encoder, xq, mode, k, scoring)
            rep = f"rep={method}" if scoring == "single" else "10-NN vote"
            rows.append(judge(f"{name} {mode} {rep}", s, found, query_labels, k))
    return rows


def spread_table(runs: list[list[evaluate.MethodResult]]) -> list[str]:
    """Lines 'name  mean ± half-range (n seeds)' of categorization accuracy and mAP@k, one per method."""
    lines = []
    for same in zip(*runs, strict=True):
        acc = np.array([r.categorization.accuracy for r in same])
        ap = np.array([r.retrieval.map if r.retrieval else np.nan for r in same])
        lines.append(f"  {same[0].name:58s} {acc.mean():6.1%} ± {np.ptp(acc) / 2:.1%}   mAP {ap.mean():.3f} "
                     f"± {np.ptp(ap) / 2:.3f}   ({len(same)} seeds)")
    return lines


def baseline_rows(split: Split, x: np.ndarray, xq: np.ndarray, args: argparse.Namespace) -> list[evaluate.MethodResult]:
    """Raw features and HOG through Searcher.search, the query stage's path for an embeddings index."""
    labels, q = split.index_labels, split.query_labels
    rows = []
    for method in ("centroid", "most_central"):
        s = searcher(x, labels, method)
        rows.append(judge(f"raw rep={method}", s, s.search(xq, args.k, "single"), q, args.k))
    s = searcher(x, labels, "centroid")
    rows.append(judge("raw top-5 central (max)", s, s.search(xq, args.k, "max"), q, args.k))
    rows.append(judge("raw 10-NN vote", s, s.search(xq, args.k, "knn"), q, args.k))
    if not args.no_hog:
        h, hq = hog_features(split.index, args.procs), hog_features(split.queries, args.procs)
        s = searcher(h, labels, "most_central")
        rows.append(judge("hog rep=most_central", s, s.search(hq, args.k, "single"), q, args.k))
    return rows


def variants(in_dim: int) -> dict[str, ModelConfig]:
    """The paper's GAT-AE on unit vectors; gatrep's default (features standardised per dimension inside the
    model: unit vectors give per-dimension MSE targets of ~1/sqrt(D), dominated by a few high-variance
    dimensions); GraphSAGE as the encoder, either way."""
    return {
        "paper": ModelConfig(in_dim=in_dim, standardise=False),
        "standardised": ModelConfig(in_dim=in_dim),
        "sage": ModelConfig(in_dim=in_dim, encoder="sage", standardise=False),
        "sage-standardised": ModelConfig(in_dim=in_dim, encoder="sage"),
    }


def trained_rows(split: Split, x: np.ndarray, xq: np.ndarray, nbrs: np.ndarray, args: argparse.Namespace,
                 seed: int) -> list[evaluate.MethodResult]:
    """Every GAT-AE variant trained with `seed`, queried every way."""
    rows = []
    for name in args.variants.split(","):
        print(f"  seed {seed}: training variant {name!r} for {args.epochs} epochs", flush=True)
        t = time.perf_counter()
        model = train(variants(x.shape[1])[name], x, nbrs, args.epochs, args.device, 1e-3, args.batch_size, seed)
        print(f"    trained in {time.perf_counter() - t:.1f} s", flush=True)
        rows += gat_rows(f"gat-ae {name}", model, x, nbrs, xq, split.index_labels, split.query_labels, args.k,
                         args.method)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--index-limit", type=int, default=0, help="Fashion-MNIST training images indexed (0 = all)")
    parser.add_argument("--query-limit", type=int, default=0, help="Fashion-MNIST test images queried (0 = all)")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist", help="the IDX .gz files")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--method", default="most_central", help="GAT-AE category representative (the index "
                                                                  "stage's default: most_central)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma separated (mean ± spread)")
    parser.add_argument("--variants", default="paper,standardised,sage,sage-standardised",
                        help="GAT-AE variants, comma separated")
    parser.add_argument("--no-hog", action="store_true")
    parser.add_argument("--procs", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.procs)

    start = time.perf_counter()
    split = load_split(args.dataset, args.index_limit, args.query_limit, args.fashion_dir)
    print(f"{args.dataset}: {len(split.index)} indexed, {len(split.queries)} queries; {args.backbone} on {args.device}")
    x = features(args.backbone, args.weights, args.device, crops(split.index, args.backbone, args.procs))
    xq = features(args.backbone, args.weights, args.device, crops(split.queries, args.backbone, args.procs))
    nbrs = exact_knn(x, args.k)[0]
    same = (split.index_labels[nbrs] == split.index_labels[:, None]).mean()
    print(f"  features {x.shape} in {time.perf_counter() - start:.1f} s; k-NN graph: {same:.1%} of edges join "
          f"images of the same category", flush=True)
    baselines = baseline_rows(split, x, xq, args)
    runs = [trained_rows(split, x, xq, nbrs, args, int(seed)) for seed in args.seeds.split(",")]
    print()
    print(evaluate.format_table(baselines + runs[0]))
    print("\nsummary (accuracy, mAP@k; trained rows: mean ± half the range over the seeds):")
    for r in baselines:
        ap = r.retrieval.map if r.retrieval else float("nan")
        print(f"  {r.name:58s} {r.categorization.accuracy:6.1%}           mAP {ap:.3f}")
    print("\n".join(spread_table(runs)))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
