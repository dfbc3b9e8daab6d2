"""Near-duplicate listings: is a transformed view's listing found, per method and per transformation family?

    nice -n 10 python bench/near_duplicates.py --source fashion-mnist --listings 100 --views 5 --seeds 0,1,2
    nice -n 10 python bench/near_duplicates.py --source digits --listings 100 --views 5 --seeds 0,1,2
    nice -n 10 python bench/near_duplicates.py --source photos --listings 100 --views 5 --seeds 0,1,2
    python bench/near_duplicates.py --source digits --listings 40 --backbone tiny-random --seeds 0,1,2  # smoke run

(each of the first three: ~15-25 min on 2 busy CPU cores, almost all of it MobileNetV2 on 1,800 images and
2,100 query variants; --data DIR keeps the sets and their features, so a rerun takes about a minute).

For each seed, gatrep.datasets.write_listings writes the set (a listing: one source image as original.png
plus --views transformed views, view-<j>-<family>.<png|jpg>) into a temporary directory (or --data), so the
seed picks the listings, each view's family and its parameters. The same seed holds out one view per
listing, at random, as its query; every other image (originals and the other views) is indexed. Files are
read and decoded the embed job's way (images.read_file, images.decode): with the backbone's preprocess for
features, at their full size for the hashes.

Methods:
  phash, dhash  imagehash's 64-bit pHash / dHash, ranked by Hamming distance, ties in a seeded random order
  raw           backbone features (MobileNetV2, ImageNet weights), ranked by cosine similarity
  diffusion     raw features re-ranked by k-NN diffusion: database-side augmentation, then alpha query
                expansion (each index vector, then the query, replaced by the similarity^alpha-weighted
                mean of itself and its n nearest index vectors; n = 3 and alpha = 3 fixed before any run)
  cascade       pHash's ranking when the query's nearest pHash is within t bits, raw features' otherwise; t
                is chosen per seed on a validation split carved from the index (one more view per listing
                queried against the rest of the index), never on the test queries
  cascade-variants  as cascade, but the feature branch ranks by the best cosine similarity over the query and
                seven query variants (de-rotations by ±15 and ±25 degrees, central crops of 65/75/85%), which
                cost seven more embeddings per query. Their angles and scales were picked knowing the ranges
                of the rotate and letterbox families, so this row measures how far undoing a known geometric
                edit goes, not a method tuned blind; t is the cascade's validation threshold

Figures, relevance = same listing (an index of R = views images per query listing):
  recall@k   share of queries with at least one image of their listing among the top k images (the
             copy-detection convention; evaluate.retrieval's recall@k, a share of all R, would cap it at k/R)
  mAP@10     evaluate.retrieval's AP@10 with listing ids as labels and R = views
  category   listing-level categorization: the query's category predicted as the category of its top-1
             image's listing (no vote)
Per family: the same figures over the queries whose held-out view is of that family. Every figure is the
mean ± spread (half the range) over the seeds. Tables are printed as Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from gatrep import backbones, datasets, evaluate, images

KS = (1, 5, 10)
TARGET = 0.95  # issue 11: recall@1 for every family with the best method
MAX_BYTES = MAX_PIXELS = 10**8


@dataclasses.dataclass(frozen=True)
class Split:
    """One seed's set: index and query files with their listing, category and family."""

    index_uris: list[str]
    query_uris: list[str]
    index_listings: np.ndarray
    query_listings: np.ndarray
    index_categories: np.ndarray
    query_categories: np.ndarray
    index_families: np.ndarray
    query_families: np.ndarray


def build(source: str, listings: int, views: int, size: int, seed: int, root: str) -> Split:
    """Write (or reuse) the seed's listings tree under `root` and hold out one view per listing, drawn with `seed`."""
    tree = datasets.write_listings(os.path.join(root, f"{source}-{listings}x{views}-{size}-seed{seed}"), source,
                                   listings, views, size=size, seed=seed)
    uris = np.asarray(tree.uris(), dtype=object)
    listing = np.asarray(tree.listings(), dtype=object)
    family = np.asarray([datasets.view_family(f) for f in tree.files], dtype=object)
    category = np.asarray(tree.categories(), dtype=object)
    query = np.zeros(len(uris), bool)
    query[one_view_per_listing(listing, family, np.random.default_rng(seed))] = True
    return Split(list(uris[~query]), list(uris[query]), listing[~query], listing[query], category[~query],
                 category[query], family[~query], family[query])


def one_view_per_listing(listings: np.ndarray, families: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of one view (not the original) per listing that has one, drawn with `rng`, in listing-name order."""
    rows = []
    for name in np.unique(listings):
        views = np.flatnonzero((listings == name) & (families != "original"))
        if len(views):
            rows.append(int(rng.choice(views)))
    return np.asarray(rows, dtype=np.int64)


def decode(uris: list[str], prep: images.Preprocess) -> np.ndarray:
    """uint8 [n, size, size, channels] pixels of every file, read and decoded as the embed job does."""
    out = []
    for uri in uris:
        data, refused = images.read_file(uri, MAX_BYTES)
        decoded = refused or images.decode(data or b"", prep, MAX_PIXELS)
        if decoded.pixels is None:
            raise RuntimeError(f"{uri}: {decoded.status}: {decoded.error}")
        out.append(decoded.pixels)
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# Methods: each returns [queries, k] indices into the index, best first


def hash_bits(pixels: np.ndarray, kind: str) -> np.ndarray:
    """uint64 [n] perceptual hashes (imagehash's 8x8 pHash or dHash) of uint8 RGB images."""
    import imagehash

    function = {"phash": imagehash.phash, "dhash": imagehash.dhash}[kind]
    bits = np.stack([function(Image.fromarray(p)).hash.ravel() for p in pixels])
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def hamming_top(queries: np.ndarray, index: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k index hashes nearest each query hash in Hamming distance; equal distances in a seeded random order."""
    distance = np.bitwise_count(queries[:, None] ^ index[None, :]).astype(np.float64)
    distance += np.random.default_rng(seed).random(distance.shape) * 0.5  # breaks ties only
    return np.argsort(distance, axis=1, kind="stable")[:, :k]


def cosine_top(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """The k unit index vectors most similar to each unit query vector."""
    return np.argsort(-(queries @ index.T), axis=1, kind="stable")[:, :k]


def _expand(vectors: np.ndarray, index: np.ndarray, n: int, alpha: float, self_weight: float) -> np.ndarray:
    """Unit vectors: self_weight times each vector plus its n most similar index vectors weighted by
    max(similarity, 0)^alpha (a vector that is in the index finds itself first: then self_weight is 0)."""
    similarity = vectors @ index.T
    top = np.argsort(-similarity, axis=1)[:, :n]
    weights = np.clip(np.take_along_axis(similarity, top, axis=1), 0, None) ** alpha
    expanded = self_weight * vectors + np.einsum("qn,qnd->qd", weights, index[top])
    return expanded / np.linalg.norm(expanded, axis=1, keepdims=True).clip(1e-12)


def diffusion_top(queries: np.ndarray, index: np.ndarray, k: int, n: int = 3, alpha: float = 3.0) -> np.ndarray:
    """k-NN diffusion re-ranking: database-side augmentation (each index vector averaged with its n nearest,
    itself included), then alpha query expansion over the augmented index; ranked by cosine similarity."""
    augmented = _expand(index, index, n, alpha, 0.0)
    expanded = _expand(queries, augmented, n, alpha, 1.0)
    return cosine_top(expanded, augmented, k)


# ----------------------------------------------------------------------------------------------
# Figures


def figures(top: np.ndarray, split: Split, views: int, queries: np.ndarray) -> dict[str, float]:
    """recall@1/5/10, mAP@10 and category accuracy of the `queries` rows of a ranking `top` [queries, 10]."""
    found = split.index_listings[top[queries]]
    wanted = split.query_listings[queries]
    out = {f"recall@{k}": float(np.mean((found[:, :k] == wanted[:, None]).any(axis=1))) for k in KS}
    out["mAP@10"] = evaluate.retrieval(list(wanted), [list(r) for r in found], [views] * len(wanted), 10).map
    predicted = split.index_categories[top[queries, 0]]
    out["category"] = evaluate.categorization(list(split.query_categories[queries]), list(predicted)).accuracy
    out["queries"] = float(queries.sum())
    return out


@dataclasses.dataclass(frozen=True)
class Vectors:
    """What the methods rank by: 64-bit hashes by kind and unit backbone features, of the index and the queries."""

    index_hashes: dict[str, np.ndarray]
    query_hashes: dict[str, np.ndarray]
    index_features: np.ndarray
    query_features: np.ndarray
    query_variants: np.ndarray | None = None  # [queries, len(QUERY_VARIANTS), dim] features, when a method needs them

    def carve(self, rows: np.ndarray) -> Vectors:
        """The index's `rows` as queries against the rest of the index: a validation split."""
        rest = np.setdiff1d(np.arange(len(self.index_features)), rows)
        return Vectors({k: h[rest] for k, h in self.index_hashes.items()},
                       {k: h[rows] for k, h in self.index_hashes.items()}, self.index_features[rest],
                       self.index_features[rows])


def cascade_top(v: Vectors, seed: int, threshold: int) -> np.ndarray:
    """pHash's ranking for a query whose nearest index pHash is within `threshold` bits, raw features' otherwise."""
    hq, hi = v.query_hashes["phash"], v.index_hashes["phash"]
    near = np.bitwise_count(hq[:, None] ^ hi[None, :]).min(axis=1) <= threshold
    return np.where(near[:, None], hamming_top(hq, hi, 10, seed), cosine_top(v.query_features, v.index_features, 10))


def cascade_threshold(v: Vectors, split: Split, seed: int) -> int:
    """The threshold of CASCADE_THRESHOLDS that gives cascade_top the best recall@1 (the smallest of equals) on a
    validation split carved from the index: one non-original view per listing, drawn with seed + 1, as queries
    against the rest of the index. The test queries play no part."""
    rows = one_view_per_listing(split.index_listings, split.index_families, np.random.default_rng(seed + 1))
    carved, rest = v.carve(rows), np.setdiff1d(np.arange(len(split.index_listings)), rows)
    wanted, labels = split.index_listings[rows], split.index_listings[rest]
    recall = {t: float(np.mean(labels[cascade_top(carved, seed, t)[:, 0]] == wanted)) for t in CASCADE_THRESHOLDS}
    best = max(CASCADE_THRESHOLDS, key=lambda t: (recall[t], -t))
    print(f"  cascade threshold {best} bits (validation recall@1 {recall[best]:.3f} on {len(rows)} index views)")
    return best


def tuned_cascade_top(v: Vectors, split: Split, seed: int) -> np.ndarray:
    """cascade_top with the threshold chosen on validation (cascade_threshold)."""
    return cascade_top(v, seed, cascade_threshold(v, split, seed))


def tuned_cascade_variants_top(v: Vectors, split: Split, seed: int) -> np.ndarray:
    """As tuned_cascade_top, but a query pHash leaves to features is ranked by its best cosine similarity over
    itself and its QUERY_VARIANTS (the validation threshold of the plain cascade is reused)."""
    if v.query_variants is None:
        raise ValueError("cascade-variants needs the queries' variant features")
    hq, hi = v.query_hashes["phash"], v.index_hashes["phash"]
    near = np.bitwise_count(hq[:, None] ^ hi[None, :]).min(axis=1) <= cascade_threshold(v, split, seed)
    every = np.concatenate([v.query_features[:, None], v.query_variants], axis=1)  # [queries, 1 + variants, dim]
    best = (every @ v.index_features.T).max(axis=1)
    by_features = np.argsort(-best, axis=1, kind="stable")[:, :10]
    return np.where(near[:, None], hamming_top(hq, hi, 10, seed), by_features)


# Undo what a rotation or a letterbox may have done to a query: de-rotations and central crops whose angles and
# scales sit inside the ranges of datasets._rotate (10-30 degrees) and datasets._letterbox (0.6-0.85).
QUERY_VARIANTS = (("rotate", -25.0), ("rotate", -15.0), ("rotate", 15.0), ("rotate", 25.0), ("centre", 0.65),
                  ("centre", 0.75), ("centre", 0.85))


def query_variant(image: Image.Image, kind: str, value: float) -> Image.Image:
    """`image` rotated by `value` degrees (corners filled with the top-left pixel's colour), or its central
    `value` fraction resized back to full size."""
    if kind == "rotate":
        return image.rotate(value, Image.Resampling.BILINEAR, fillcolor=image.getpixel((0, 0)))
    w, h = image.size
    dx, dy = w * (1 - value) / 2, h * (1 - value) / 2
    return image.resize((w, h), Image.Resampling.BILINEAR, box=(dx, dy, w - dx, h - dy))


def variant_features(uris: list[str], size: int, encoder: backbones.Encoder, prep: images.Preprocess) -> np.ndarray:
    """[files, variants, dim] features of QUERY_VARIANTS of each file, decoded at full size, then cropped and
    resized by the backbone's preprocess (images._to_array, the embed job's own step)."""
    full = decode(uris, images.Preprocess(size=size, crop_fraction=1.0))
    out = []
    for pixels in full:
        image = Image.fromarray(pixels)
        out.append(encoder(np.stack([images._to_array(query_variant(image, k, v), prep) for k, v in QUERY_VARIANTS])))
    return np.stack(out)


CASCADE_THRESHOLDS = tuple(range(0, 33, 2))
METHODS: dict[str, Callable[[Vectors, Split, int], np.ndarray]] = {
    "phash": lambda v, split, seed: hamming_top(v.query_hashes["phash"], v.index_hashes["phash"], 10, seed),
    "dhash": lambda v, split, seed: hamming_top(v.query_hashes["dhash"], v.index_hashes["dhash"], 10, seed),
    "raw": lambda v, split, seed: cosine_top(v.query_features, v.index_features, 10),
    "diffusion": lambda v, split, seed: diffusion_top(v.query_features, v.index_features, 10),
    "cascade": tuned_cascade_top,
    "cascade-variants": tuned_cascade_variants_top,
}
NAMES = {"phash": "pHash (Hamming)", "dhash": "dHash (Hamming)", "raw": "raw {backbone} (cosine)",
         "diffusion": "raw {backbone} + k-NN diffusion (DBA+αQE, n=3, α=3)",
         "cascade": "pHash ≤ t bits, else raw {backbone} (t on validation)",
         "cascade-variants": "pHash ≤ t bits, else raw {backbone} max over query variants"}


def vectors(split: Split, methods: list[str], backbone: str, weights: str, size: int, cache: str | None) -> Vectors:
    """The hashes and features `methods` need (features of no file when none needs them)."""
    cascades = {"cascade", "cascade-variants"} & set(methods)
    kinds = {m for m in methods if m in ("phash", "dhash")} | ({"phash"} if cascades else set())
    index_hashes, query_hashes = {}, {}
    if kinds:
        full = images.Preprocess(size=size, crop_fraction=1.0)
        index_pixels, query_pixels = decode(split.index_uris, full), decode(split.query_uris, full)
        for kind in sorted(kinds):
            index_hashes[kind], query_hashes[kind] = hash_bits(index_pixels, kind), hash_bits(query_pixels, kind)
    if {"raw", "diffusion"} & set(methods) or cascades:
        x, q = cached_features(split, backbone, weights, cache)
    else:
        x, q = np.zeros((len(split.index_uris), 0), np.float32), np.zeros((len(split.query_uris), 0), np.float32)
    variants = None
    if "cascade-variants" in methods:
        variants = cached_variants(split, backbone, weights, size, cache and cache.replace(".npz", ".variants.npz"))
    return Vectors(index_hashes, query_hashes, x, q, variants)


def rankings(split: Split, methods: list[str], backbone: str, weights: str, size: int, seed: int,
             cache: str | None) -> dict[str, np.ndarray]:
    """Each method's top-10 ranking of the split's queries: indices into the index, best first."""
    v = vectors(split, methods, backbone, weights, size, cache)
    return {method: METHODS[method](v, split, seed) for method in methods}


def cached_features(split: Split, backbone: str, weights: str, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(index, query) features of the split, read from `cache` (.npz) when it holds the same files' features."""
    if cache and os.path.exists(cache):
        saved = np.load(cache, allow_pickle=False)
        if list(saved["index_uris"]) == split.index_uris and list(saved["query_uris"]) == split.query_uris:
            print(f"  {backbone} features read from {cache}", flush=True)
            return saved["index"], saved["query"]
    start = time.perf_counter()
    encoder, prep = backbones.get(backbone).load(weights, "cpu"), backbones.get(backbone).preprocess
    x, q = embed(split.index_uris, encoder, prep), embed(split.query_uris, encoder, prep)
    print(f"  {backbone} features of {len(x) + len(q)} images: {time.perf_counter() - start:.1f} s", flush=True)
    if cache:
        np.savez(cache, index=x, query=q, index_uris=np.asarray(split.index_uris),
                 query_uris=np.asarray(split.query_uris))
    return x, q


def cached_variants(split: Split, backbone: str, weights: str, size: int, cache: str | None) -> np.ndarray:
    """The queries' variant_features, read from `cache` (.npz) when it holds those of the same files."""
    if cache and os.path.exists(cache):
        saved = np.load(cache, allow_pickle=False)
        if list(saved["query_uris"]) == split.query_uris:
            print(f"  {backbone} features of the query variants read from {cache}", flush=True)
            return saved["variants"]
    start = time.perf_counter()
    encoder, prep = backbones.get(backbone).load(weights, "cpu"), backbones.get(backbone).preprocess
    variants = variant_features(split.query_uris, size, encoder, prep)
    print(f"  {backbone} features of {variants.shape[0] * variants.shape[1]} query variants: "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    if cache:
        np.savez(cache, variants=variants, query_uris=np.asarray(split.query_uris))
    return variants


def embed(uris: list[str], encoder: backbones.Encoder, prep: images.Preprocess, batch: int = 64) -> np.ndarray:
    """Unit backbone features of every file, decoded with the backbone's preprocess `prep`."""
    return np.concatenate([encoder(decode(uris[i:i + batch], prep)) for i in range(0, len(uris), batch)])


# ----------------------------------------------------------------------------------------------
# Markdown


def cell(values: list[float]) -> str:
    """'mean ± half-range' of one figure over the seeds."""
    a = np.asarray(values)
    return f"{a.mean():.3f} ± {np.ptp(a) / 2:.3f}"


def overall_table(results: dict[str, list[dict[str, dict[str, float]]]], names: dict[str, str]) -> list[str]:
    metrics = [f"recall@{k}" for k in KS] + ["mAP@10", "category"]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for method, runs in results.items():
        lines.append(f"| {names[method]} | " + " | ".join(cell([r["all"][m] for r in runs]) for m in metrics) + " |")
    return lines


def family_recall_table(results: dict[str, list[dict[str, dict[str, float]]]], names: dict[str, str],
                        families: list[str]) -> list[str]:
    """recall@1 per family (rows) and method (columns), and whether the best method (the highest mean recall@1
    over all queries) reaches TARGET on each family."""
    methods = list(results)
    best = max(methods, key=lambda m: float(np.mean([r["all"]["recall@1"] for r in results[m]])))
    lines = ["| family (queries) | " + " | ".join(names[m] for m in methods) + f" | best method ≥ {TARGET}? |",
             "|---|" + "---|" * (len(methods) + 1)]
    for family in families:
        runs = {m: [r[family] for r in results[m] if family in r] for m in methods}
        n = int(sum(r["queries"] for r in runs[best]))
        met = float(np.mean([r["recall@1"] for r in runs[best]])) >= TARGET
        lines.append(f"| {family} ({n}) | " + " | ".join(cell([r["recall@1"] for r in runs[m]]) for m in methods)
                     + f" | {'yes' if met else '**no**'} |")
    lines.append(f"\nbest method: {names[best]}")
    return lines


def family_table(results: dict[str, list[dict[str, dict[str, float]]]], names: dict[str, str],
                 families: list[str]) -> list[str]:
    metrics = [f"recall@{k}" for k in KS] + ["mAP@10"]
    lines = ["| family | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for family in families:
        for method, runs in results.items():
            present = [r[family] for r in runs if family in r]
            lines.append(f"| {family} | {names[method]} | "
                         + " | ".join(cell([r[m] for r in present]) for m in metrics) + " |")
    return lines


def run(args: argparse.Namespace, root: str) -> None:
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    names = {m: NAMES[m].format(backbone=args.backbone) for m in methods}
    results: dict[str, list[dict[str, dict[str, float]]]] = {m: [] for m in methods}
    families: set[str] = set()
    start = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        split = build(args.source, args.listings, args.views, args.size, seed, root)
        print(f"seed {seed}: {len(split.index_uris)} indexed, {len(split.query_uris)} queries", flush=True)
        name = f"{args.source}-{args.listings}x{args.views}-{args.size}-seed{seed}.{args.backbone}-{args.weights}.npz"
        cache = os.path.join(root, name) if args.data else None
        for method, top in rankings(split, methods, args.backbone, args.weights, args.size, seed, cache).items():
            by_family = {"all": figures(top, split, args.views, np.ones(len(top), bool))}
            for family in np.unique(split.query_families):
                by_family[family] = figures(top, split, args.views, split.query_families == family)
                families.add(family)
            results[method].append(by_family)
    order = [f for f in datasets.TRANSFORMS if f in families]
    print(f"\n### {args.source}: {args.listings} listings × (original + {args.views} views), {args.size} px, "
          f"seeds {args.seeds}, {args.backbone} ({args.weights} weights); {time.perf_counter() - start:.0f} s\n")
    print("\n".join(overall_table(results, names)))
    print("\nrecall@1 by the held-out view's family (queries over all seeds):\n")
    print("\n".join(family_recall_table(results, names, order)))
    print("\nevery figure by family:\n")
    print("\n".join(family_table(results, names, order)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=datasets.LISTING_SOURCES, default="fashion-mnist")
    parser.add_argument("--listings", type=int, default=300)
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="pixels per side of the written images")
    parser.add_argument("--seeds", default="0,1,2", help="comma separated; each writes its own set")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"(default: {','.join(METHODS)})")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--data", help="keep the written sets and their features here, for reruns (default: a "
                                       "temporary directory)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.data:
        run(args, args.data)
    else:
        with tempfile.TemporaryDirectory(prefix="gatrep-listings-") as root:
            run(args, root)


if __name__ == "__main__":
    main()
