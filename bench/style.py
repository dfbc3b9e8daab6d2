"""Retrieval by look (the thesis's @5 evaluation): content, style and adaptive similarity side by side.

    python bench/style.py                                  # digits, Fashion-MNIST, photo tiles; MobileNetV2
    python bench/style.py --datasets photos --candidates 10,25,50,100

For each dataset, image files are written as the datasets module writes them, then read and decoded
the embed job's way (images.read_file, images.decode) and passed through the backbone once for both
vectors (TorchEncoder.embed, what `jobs.embed --style` stores). The indexed split gets a content and a
style retrieval index per category; every held-out query goes through Searcher.search, the query
stage's path: categorized by a 10-NN vote on content, then its top 5 inside the chosen category by
content, by style and by the adaptive score. Each row gives, over every (query, match) pair, the mean
HOG distance (lower: more alike in edges and texture) and the mean colour-histogram correlation
(higher: more alike in colour), and the share of matches of the query's own category; the first row
does the same for 5 random indexed images per query. Then the adaptive score's candidate set: for each
--candidates C, recall@5 against scoring every image of the category, and queries/s of the retrieval
step. Nothing is trained, so one run is the figure; the random row uses --seed.

Datasets: digits (scikit-learn, 80/20 stratified), Fashion-MNIST (Debian's dataset-fashion-mnist:
--fashion-index training images indexed, --fashion-queries test images queried), photos (colour tiles of
scikit-image's eight photographs, 80/20; the photo is the category, so a category shares a look).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image

from gatrep import backbones, datasets, evaluate, images
from gatrep.categorize import CategoryIndex, Searcher
from gatrep.represent import represent_groups

K = 5


def trees(dataset: str, root: str, fashion_index: int, fashion_queries: int, seed: int) -> datasets.Tree:
    """The dataset's index tree, with its query tree as `.query`."""
    path = os.path.join(root, dataset)
    if dataset == "digits":
        return datasets.write_digits(path, size=64, holdout=0.2, seed=seed)
    if dataset == "photos":
        return datasets.write_photo_tiles(path, holdout=0.2, seed=seed)
    index = datasets.write_fashion_mnist(path, split="train", size=64, fmt="png", limit=fashion_index, seed=seed)
    query = datasets.write_fashion_mnist(path + "-query", split="test", size=64, fmt="png", limit=fashion_queries,
                                         seed=seed)
    return datasets.Tree(index.root, index.files, index.source_rows, query=query)


def embed(uris: list[str], backbone: str, weights: str, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(content, style) vectors of every file, decoded as the embed job decodes them."""
    b = backbones.get(backbone)
    encoder = backbones.load_with_style(backbone, weights, "cpu")
    content, style = np.zeros((len(uris), b.dim), np.float32), np.zeros((len(uris), b.style_dim), np.float32)
    for start in range(0, len(uris), batch):
        crops = []
        for uri in uris[start:start + batch]:
            data, refused = images.read_file(uri, 10**8)
            decoded = refused or images.decode(data or b"", b.preprocess, 10**8)
            assert decoded.pixels is not None, f"{uri}: {decoded.error}"
            crops.append(decoded.pixels)
        content[start:start + len(crops)], style[start:start + len(crops)] = encoder.embed(np.stack(crops))
    return content, style


def searcher(content: np.ndarray, style: np.ndarray, ids: list[str], categories: list[str],
             ann_min_size: int) -> Searcher:
    """A raw-feature Searcher with a style index, as jobs.index builds it (centroid representatives; the
    rows here are categorized by a k-NN vote, which does not use them)."""
    reps = represent_groups(content, np.asarray(categories, dtype=object), "centroid", 1)
    index = CategoryIndex.build(content, ids, categories, labels=categories, ann_min_size=ann_min_size)
    style_index = CategoryIndex.build(style, ids, categories, labels=categories, ann_min_size=ann_min_size)
    central = [reps.vectors[i:i + 1] for i in range(len(reps.groups))]
    return Searcher(reps.groups, reps.vectors, central, reps.groups, index, style_index)


def load_rgb(uri: str) -> np.ndarray:
    with Image.open(uri) as image:
        return np.asarray(image.convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,fashion-mnist,photos")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--fashion-index", type=int, default=2000)
    parser.add_argument("--fashion-queries", type=int, default=500)
    parser.add_argument("--candidates", default="10,25,50,100", help="adaptive candidate sizes to measure")
    parser.add_argument("--ann-min-size", type=int, default=4096,
                        help="categories of at least this many images get ANN (pynndescent) indexes, as in jobs.index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=os.path.expanduser("~/.cache/gatrep/bench-style"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"backbone {args.backbone} ({args.weights} weights), {os.cpu_count()} CPUs, top {K} inside the "
          "category chosen by a 10-NN vote on content")
    for dataset in args.datasets.split(","):
        tree = trees(dataset, args.data, args.fashion_index, args.fashion_queries, args.seed)
        assert tree.query is not None
        start = time.perf_counter()
        content, style = embed(tree.uris(), args.backbone, args.weights)
        query_content, query_style = embed(tree.query.uris(), args.backbone, args.weights)
        embed_s = time.perf_counter() - start
        s = searcher(content, style, tree.uris(), tree.categories(), args.ann_min_size)
        labels = np.asarray(tree.query.categories(), dtype=object)
        judge = evaluate.LookJudge(load_rgb)
        ann = sum(p.ann is not None for p in s.index.parts.values())
        print(f"\n{dataset}: {len(tree.files)} indexed, {len(tree.query.files)} queries (embedded in {embed_s:.0f} s); "
              f"{ann} of {len(s.index.parts)} categories searched by ANN")
        print(f"{'retrieval':<22}{'HOG distance @5':>17}{'colour corr. @5':>17}{'same category @5':>18}")
        rng = np.random.default_rng(args.seed)
        index_uris, index_labels = np.asarray(tree.uris(), dtype=object), np.asarray(tree.categories(), dtype=object)
        picks = [rng.choice(len(index_uris), K, replace=False) for _ in tree.query.uris()]
        rows = {"random pairs": ([list(index_uris[p]) for p in picks], [index_labels[p] for p in picks])}
        for similarity in ("content", "style", "adaptive"):
            found = s.search(query_content, K, "knn", similarity, query_style)
            rows[similarity] = (found.match_ids.tolist(), list(found.match_labels))
        for name, (matches, match_labels) in rows.items():
            look = judge.judge(zip(tree.query.uris(), [[m for m in row if m] for row in matches], strict=True))
            same = np.mean([np.mean(np.asarray(m) == label) for m, label in zip(match_labels, labels, strict=True)])
            print(f"{name:<22}{look.hog_distance:>17.3f}{look.colour_correlation:>17.3f}{same:>18.1%}")

        best = s.search(query_content, K, "knn")
        chosen = list(best.category)
        exhaustive = s.retrieve(query_content, chosen, K, "adaptive", query_style, candidates=None)[0]
        for candidates in [int(c) for c in args.candidates.split(",")]:
            start = time.perf_counter()
            ids = s.retrieve(query_content, chosen, K, "adaptive", query_style, candidates=candidates)[0]
            rate = len(ids) / (time.perf_counter() - start)
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), exhaustive.tolist(), strict=True)])
            print(f"adaptive from {candidates:>4} candidates by content + {candidates:>4} by style: recall@{K} "
                  f"{recall:.3f} against all, {rate:,.0f} queries/s")


if __name__ == "__main__":
    main()
