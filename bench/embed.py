"""Embedding throughput: the whole Ray Data job against the bare backbone forward pass, in one process.

    python bench/embed.py --images 1000 --backbones mobilenet_v2,clip-vit-b32
    python bench/embed.py --images 1000 --backbones mobilenet_v2 --style   # + the cost of style vectors

Writes Fashion-MNIST training images as 256x256 JPEGs (Debian package dataset-fashion-mnist), then
for each backbone measures (1) images/s of the backbone alone on pre-decoded crops, with the same
torch thread count the job's actor gets, and (2) images/s of `gatrep.stages.embed.run` over the JPEG
files (read, hash, decode, resize, forward, write Parquet), with Ray already started. The job is
timed on half of the files and on all of them: the difference gives its marginal rate, with the
fixed start-up (worker processes importing torch, loading the model, planning) taken out, and
that start-up in seconds. Prints all of them and the ratios to the bare rate. Backbones without
local weights run with random weights: speed does not depend on the weight values.

On a GPU machine (`--device cuda`) the job runs there too, once per `--decodes` value: JPEGs decoded by Pillow
in CPU tasks (`tasks`) or by nvJPEG in the backbone actor (`actor`, gatrep.jpeg). It also prints the bare rate of
decoding + resizing + forward in one process (the actor's ceiling). Beyond the split's size, the files are
written once and hard-linked under other names (each is read, hashed and decoded like any file):

    python bench/embed.py --device cuda --backbones clip-vit-b32 --images 60000 --batch-size 512 \
        --decode-batch-size 512 --decodes tasks,actor

With --style, also the same with style vectors
(`jobs.embed --style`): the bare forward with the style statistics, the whole job's wall time with
--style against without (each run twice, alternating, the faster kept), and the stored bytes of the
style column against the embedding column (Parquet, compressed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def bare_rate(backbone: str, weights: str, crops: np.ndarray, batch: int, device: str, seconds: float,
              style: bool = False) -> float:
    """Images/s of the encoder alone (with its style vectors if `style`), over pre-decoded uint8 crops, after one
    warm-up batch."""
    import torch

    from gatrep import backbones

    forward = (backbones.load_with_style(backbone, weights, device).embed if style
               else backbones.get(backbone).load(weights, device))
    forward(crops[:batch])
    if device == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < len(crops):
        for i in range(0, len(crops), batch):
            forward(crops[i : i + batch])
            done += len(crops[i : i + batch])
    if device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def decoded_crops(uris: list[str], backbone: str) -> tuple[np.ndarray, float]:
    """The preprocessed crops of every file, and the single-core decode rate in images/s."""
    from gatrep import backbones, images

    prep = backbones.get(backbone).preprocess
    start = time.perf_counter()
    crops = []
    for uri in uris:
        with open(uri, "rb") as f:
            pixels = images.decode(f.read(), prep, 10**8).pixels
        assert pixels is not None, f"{uri} did not decode"
        crops.append(pixels)
    return np.stack(crops), len(uris) / (time.perf_counter() - start)


def decode_forward_rate(backbone: str, weights: str, uris: list[str], batch: int, seconds: float) -> float:
    """Images/s of gatrep.jpeg's batched decoding and resizing plus the forward pass, on the GPU, in one process:
    what one backbone actor could reach with `--decode actor` if it never waited for its input."""
    import torch

    from gatrep import backbones
    from gatrep.jpeg import BatchDecoder

    encoder = backbones.get(backbone).load(weights, "cuda")
    decoder = BatchDecoder(backbones.get(backbone).preprocess, torch.device("cuda"), 10**8)
    files = []
    for uri in uris[:batch * 4]:
        with open(uri, "rb") as f:
            files.append(f.read())
    payloads = [np.array(files[i : i + batch], dtype=object) for i in range(0, len(files), batch)]

    def one(payload: np.ndarray) -> None:
        pixels, failed = decoder(payload, np.ones(len(payload), bool))
        assert not failed
        encoder(pixels)  # type: ignore[arg-type]  # a TorchEncoder also takes a tensor on its device

    one(payloads[0])
    torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for payload in payloads:
            one(payload)
            done += len(payload)
    torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def image_files(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The JPEG tree for `args` (written once, cached) and its files; past the split's size, hard links."""
    from gatrep import datasets

    data = os.path.join(args.data, f"{args.split}-{args.images}x{args.size}")
    return data, datasets.write_fashion_mnist_copies(data, args.images, split=args.split, size=args.size,
                                                    fmt="jpg", source=args.fashion_source)


def weights_for(backbone: str) -> str:
    from gatrep import backbones
    from gatrep.backbones.weights import WeightsNotFound

    try:
        backbones.get(backbone).load("default", "cpu")
        return "default"
    except WeightsNotFound:
        return "random"


def job_seconds(source: str, backbone: str, weights: str, batch: int, style: bool = False,
                **settings: object) -> tuple[float, dict]:
    """Seconds of the whole embedding job over `source` (Ray already running), and its manifest with the
    compressed bytes of each vector column added ("column_bytes")."""
    import pyarrow.parquet as pq

    from gatrep import io
    from gatrep.config import EmbedConfig
    from gatrep.stages import embed

    with tempfile.TemporaryDirectory() as out:
        cfg = EmbedConfig(input=source, run=out, backbone=backbone, weights=weights, batch_size=batch, style=style,
                          **settings)  # type: ignore[arg-type]
        start = time.perf_counter()
        manifest = embed.run(cfg)
        seconds = time.perf_counter() - start
        sizes: dict[str, int] = {}
        for path in io.list_parquet(os.path.join(out, "embeddings")):
            meta = pq.read_metadata(path)
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    column = meta.row_group(g).column(c)
                    name = column.path_in_schema.split(".")[0]
                    sizes[name] = sizes.get(name, 0) + column.total_compressed_size
        return seconds, {**manifest, "column_bytes": sizes}


def half_manifest(uris: list[str], directory: str) -> str:
    """A CSV manifest of every other file (half the set), for the start-up estimate."""
    path = os.path.join(directory, "half.csv")
    with open(path, "w") as f:
        f.write("uri\n" + "\n".join(uris[::2]) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="side of the JPEG files written")
    parser.add_argument("--backbones", default="mobilenet_v2,clip-vit-b32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-batch-size", type=int, default=32, help="the job's files per decode task")
    parser.add_argument("--decodes", default="tasks", help="the job's --decode values to measure, comma-separated")
    parser.add_argument("--actors", type=int, default=0, help="the job's --actors (0: its default)")
    parser.add_argument("--data", default=os.path.expanduser("~/.cache/gatrep/bench-fashion-mnist"))
    parser.add_argument("--split", default="train", help="the Fashion-MNIST split the images come from")
    parser.add_argument("--fashion-source", default="/usr/share/datasets/fashion-mnist",
                        help="folder of Fashion-MNIST's IDX files")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the bare forward and the job run")
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum duration of each bare measurement")
    parser.add_argument("--style", action="store_true", help="also measure the cost of style vectors (see above)")
    args = parser.parse_args()

    import ray
    import torch

    data, uris = image_files(args)
    print(f"{len(uris)} Fashion-MNIST JPEGs of {args.size}x{args.size} under {data}; {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""), flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(os.cpu_count() or 1)  # what the job's single CPU actor uses
    for backbone in args.backbones.split(","):
        weights = weights_for(backbone)
        crops, decode_rate = decoded_crops(uris[:2048], backbone)
        bare = bare_rate(backbone, weights, crops, args.batch_size, args.device, args.seconds)
        print(f"{backbone:14s} weights={weights:7s} Pillow decode {decode_rate:7.1f} img/s/core | bare forward "
              f"{bare:8.1f} img/s", flush=True)
        if args.device == "cuda":
            ceiling = decode_forward_rate(backbone, weights, uris, args.batch_size, args.seconds)
            print(f"{'':14s} nvJPEG decode + resize + forward, one process: {ceiling:8.1f} img/s "
                  f"({ceiling / bare:5.1%} of the bare forward)", flush=True)
        for decode in args.decodes.split(","):
            settings = {"decode": decode, "decode_batch_size": args.decode_batch_size, "actors": args.actors}
            with tempfile.TemporaryDirectory() as tmp:
                half_s, _ = job_seconds(half_manifest(uris, tmp), backbone, weights, args.batch_size, **settings)
            full_s, manifest = job_seconds(data, backbone, weights, args.batch_size, **settings)
            assert manifest["counts"].get("ok") == len(uris), manifest["counts"]
            half = len(uris[::2])
            marginal = (len(uris) - half) / (full_s - half_s)
            startup = full_s - len(uris) / marginal
            rate = len(uris) / full_s
            print(f"{'':14s} job --decode {decode:6s}: {rate:8.1f} img/s ({rate / bare:5.1%})"
                  f" | marginal {marginal:8.1f} img/s ({marginal / bare:5.1%}), start-up {startup:4.1f} s"
                  f" | {full_s:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in manifest["timings"].items()),
                  flush=True)
        if args.style:
            print(style_cost(backbone, weights, crops, bare, data, args), flush=True)


def style_cost(backbone: str, weights: str, crops: np.ndarray, bare: float, data: str,
               args: argparse.Namespace) -> str:
    """One line: the bare forward and the job with style vectors against without, and their storage."""
    bare_style = bare_rate(backbone, weights, crops, args.batch_size, args.device, args.seconds, style=True)
    line = f"{'':14s} --style: bare {bare_style:8.1f} img/s ({bare / bare_style - 1:+.1%} time)"
    plain, styled = [], []
    for _ in range(2):
        plain.append(job_seconds(data, backbone, weights, args.batch_size))
        styled.append(job_seconds(data, backbone, weights, args.batch_size, style=True))
    plain_s, styled_s = min(s for s, _ in plain), min(s for s, _ in styled)
    sizes = styled[0][1]["column_bytes"]
    line += (f" | job {styled_s:6.1f} s against {plain_s:6.1f} s ({styled_s / plain_s - 1:+.1%})"
             f" | stored: style {sizes['style'] / 1e6:.2f} MB, embedding {sizes['embedding'] / 1e6:.2f} MB"
             f" ({sizes['style'] / sizes['embedding']:.2f}x)")
    return line


if __name__ == "__main__":
    main()
