"""Categorization and retrieval quality of every method on one labelled split, side by side.

    python bench/quality.py --dataset digits                      # 1,437 indexed / 360 held-out queries
    python bench/quality.py --dataset fashion-mnist --device cuda # 60,000 indexed / 10,000 test queries

The method in-process on gatrep's own pure modules (no Ray, so it also runs on a GPU machine without
it): backbone features -> exact k-NN graph -> GAT-AE trained with the neighbour sampler -> latents ->
representatives per category (categories given; each category is one listing, the paper's
Approach II) -> categorize the held-out queries -> retrieve inside the chosen category. Baselines on
the same split: raw features with centroid / most-central / top-m central representatives, a k-NN
vote over the index, and HOG. Prints one table (gatrep.evaluate.format_table).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import time

import numpy as np
import torch
from PIL import Image

from gatrep import backbones, evaluate, images, represent
from gatrep.config import ModelConfig
from gatrep.inference import QueryEncoder
from gatrep.models import build_model, context_aware_latents
from gatrep.models.training import train_epoch
from gatrep.query import CategoryIndex, Searcher
from gatrep.sampling import make_loader


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


def exact_knn(x: np.ndarray, k: int, device: str) -> np.ndarray:
    """[n, k] cosine nearest neighbours (self excluded), by chunked matrix products on `device`."""
    t = torch.as_tensor(x, device=device)
    out = []
    for start in range(0, len(t), 4096):
        sims = t[start : start + 4096] @ t.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -2.0
        out.append(sims.topk(k, dim=1).indices.cpu())
    return torch.cat(out).numpy()


def train(cfg: ModelConfig, x: np.ndarray, neighbours: np.ndarray, epochs: int, device: str, lr: float,
          batch_size: int, seed: int = 0) -> torch.nn.Module:
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
    """A Searcher over `vectors` grouped by their given category (one listing per category)."""
    reps = represent.represent_groups(vectors, labels, method, top_m)
    central = represent.represent_groups(vectors, labels, "most_central", top_m)
    # Exact search inside each category: quality, not speed, is measured here (bench/query.py times the ANN).
    index = CategoryIndex.build(vectors, np.array([str(i) for i in range(len(vectors))], dtype=object), labels,
                                labels, ann_min_size=2**62)
    return Searcher(reps.groups, reps.vectors, [vectors[top] for top in central.top], reps.groups, index)


def gat_rows(name: str, model: torch.nn.Module, x: np.ndarray, nbrs: np.ndarray, xq: np.ndarray,
             labels: np.ndarray, query_labels: np.ndarray, k: int) -> list[evaluate.MethodResult]:
    """The GAT-AE methods of one trained model: context-free and context-aware query latents, each scored
    against centroid representatives and by a k-NN vote over the index latents."""
    z = context_aware_latents(model, torch.as_tensor(x), torch.as_tensor(nbrs), 4096).numpy()
    encoder = QueryEncoder(model, x, nbrs)
    z0 = encoder.context_free(xq)
    s0 = searcher(z, labels, "centroid")
    seeds = np.array([[int(i) if i is not None else -1 for i in row] for row in s0.index.search_all(z0, 5)[0]])
    z1 = encoder.context_aware(xq, encoder.insertion_neighbours(xq, seeds, nbrs.shape[1]))
    rows = []
    for latent, zq in (("context-free", z0), ("context-aware", z1)):
        rows += evaluate.evaluate_searcher(f"{name} {latent}", s0, zq, list(query_labels), k,
                                           scorings=("single", "knn"))
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
    nbrs = exact_knn(x, args.k, args.device)
    same = (split.index_labels[nbrs] == split.index_labels[:, None]).mean()
    print(f"  features {x.shape} in {time.perf_counter() - start:.1f} s; k-NN graph: {same:.1%} of edges join "
          f"images of the same category", flush=True)
    q = list(split.query_labels)
    rows: list[evaluate.MethodResult] = []
    for method in ("centroid", "most_central"):
        rows += evaluate.evaluate_searcher(f"raw {method}", searcher(x, split.index_labels, method), xq, q, args.k,
                                           scorings=("single",))
    rows += evaluate.evaluate_searcher("raw", searcher(x, split.index_labels, "centroid"), xq, q, args.k,
                                       scorings=("max", "knn"))
    if not args.no_hog:
        h, hq = hog_features(split.index, args.procs), hog_features(split.queries, args.procs)
        rows += evaluate.evaluate_searcher("hog most_central", searcher(h, split.index_labels, "most_central"), hq, q,
                                           args.k, scorings=("single",))
    # Variants: the paper's GAT-AE on unit vectors; the same on features standardised per dimension
    # (unit vectors give per-dimension MSE targets of ~1/sqrt(D), dominated by a few high-variance
    # dimensions): gatrep's default; GraphSAGE as the encoder.
    variants = {
        "paper": ModelConfig(in_dim=x.shape[1]),
        "standardised": ModelConfig(in_dim=x.shape[1], standardise=True),
        "sage": ModelConfig(in_dim=x.shape[1], encoder="sage"),
        "sage-standardised": ModelConfig(in_dim=x.shape[1], encoder="sage", standardise=True),
    }
    for name in args.variants.split(","):
        print(f"  training GAT-AE variant {name!r} for {args.epochs} epochs", flush=True)
        t = time.perf_counter()
        model = train(variants[name], x, nbrs, args.epochs, args.device, 1e-3, args.batch_size)
        print(f"    trained in {time.perf_counter() - t:.1f} s", flush=True)
        rows += gat_rows(f"gat-ae {name}", model, x, nbrs, xq, split.index_labels, split.query_labels, args.k)
    print()
    print(evaluate.format_table(rows))
    short = [(r.name, r.categorization.accuracy, r.retrieval.map if r.retrieval else float("nan")) for r in rows]
    print("\nsummary (accuracy, mAP@k):")
    for name, acc, ap in short:
        print(f"  {name:40s} {acc:6.1%}  {ap:.3f}")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
