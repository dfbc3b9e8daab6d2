"""One epoch of mini-batch reconstruction training: the loop both Ray Train workers and the benchmark run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data

# A mini-batch's loss: a scalar, or a vector whose first entry is the loss to minimise and the rest its terms.
LossFn = Callable[[nn.Module, Data], Tensor]


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """Mean loss over the epoch's seed nodes, batches and seed nodes seen, wall-clock seconds, and the mean of
    each of the loss's terms (none for the reconstruction loss alone)."""

    loss: float
    batches: int
    seeds: int
    seconds: float
    terms: tuple[float, ...] = ()


def reconstruction_loss(model: nn.Module, batch: Data) -> Tensor:
    """MSE between the seed nodes' (scaled) features and their reconstruction (the paper's loss).

    The first `batch.batch_size` rows of a sampled batch are its seed nodes; the other rows are there
    only as their neighbours, so they are not scored."""
    _, x_hat = model(batch.x, batch.edge_index)
    seeds = batch.batch_size
    autoencoder: Any = getattr(model, "module", model)  # DDP wraps the autoencoder
    target = autoencoder.scale(batch.x[:seeds])
    return F.mse_loss(x_hat[:seeds], target)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Data],
                device: torch.device | str, max_batches: int = 0, loss_fn: LossFn = reconstruction_loss) -> EpochStats:
    """Adam (or any optimizer) steps on `loss_fn` (default: the paper's reconstruction loss) over `batches`,
    stopping after `max_batches` when it is > 0."""
    model.train()
    start = time.perf_counter()
    total: Tensor | None = None  # summed on the device: no host sync per batch
    count = seeds = 0
    for batch in batches:
        if max_batches and count >= max_batches:
            break
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        losses = torch.atleast_1d(loss_fn(model, batch))
        losses[0].backward()
        optimizer.step()
        step = losses.detach() * batch.batch_size
        total = step if total is None else total + step
        seeds += batch.batch_size
        count += 1
    # .tolist() waits for the device, so the time below is complete
    means = [0.0] if total is None else (total / max(seeds, 1)).tolist()
    return EpochStats(loss=means[0], batches=count, seeds=seeds, seconds=time.perf_counter() - start,
                      terms=tuple(means[1:]))
