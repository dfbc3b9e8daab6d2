"""One epoch of mini-batch reconstruction training: the loop both Ray Train workers and the benchmark run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """Mean loss over the epoch's seed nodes, batches and seed nodes seen, and wall-clock seconds."""

    loss: float
    batches: int
    seeds: int
    seconds: float


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
                device: torch.device | str, max_batches: int = 0) -> EpochStats:
    """Adam (or any optimizer) steps over `batches`, stopping after `max_batches` when it is > 0."""
    model.train()
    start = time.perf_counter()
    total = torch.zeros((), device=device)  # summed on the device: no host sync per batch
    count = seeds = 0
    for batch in batches:
        if max_batches and count >= max_batches:
            break
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = reconstruction_loss(model, batch)
        loss.backward()
        optimizer.step()
        total += loss.detach() * batch.batch_size
        seeds += batch.batch_size
        count += 1
    mean = total.item() / max(seeds, 1)  # .item() waits for the device, so the time below is complete
    return EpochStats(loss=mean, batches=count, seeds=seeds, seconds=time.perf_counter() - start)
