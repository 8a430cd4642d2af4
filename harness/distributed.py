"""Data-parallel training under torchrun (DistributedDataParallel).

`torchrun --nproc_per_node N -m harness.cli run ...` starts N processes; each joins the
process group (NCCL on GPUs, gloo on CPU), trains on its share of every global batch
(the recipe's batch size is the global one), and DDP averages the gradients, so a step
is the single-process step over the whole batch (BatchNorm statistics stay per process,
as with the official codes' DataParallel). Every process evaluates; only rank 0 writes
the store, the checkpoints and the terminal.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from harness import HarnessError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def announce(line: str) -> None:
    """A line for the user on stderr, before any progress bar (rank 0 only)."""
    if is_main():
        print(line, file=sys.stderr, flush=True)


def init_from_env(device: torch.device) -> torch.device:
    """Join torchrun's process group when started by it; the device becomes this
    process's GPU (LOCAL_RANK) on CUDA. A plain run is left as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shard_positions(n: int, batch_size: int, device=None) -> tuple[torch.Tensor, int]:
    """Which of an epoch's n sample positions this process trains on, and its batch
    size: sample i of every global batch goes to rank i mod world. A last batch whose
    length does not split evenly is topped up from the start of the epoch (as
    DistributedSampler pads), so every process takes the same number of steps."""
    rank, size = world()
    positions = torch.arange(n, device=device)
    if size == 1:
        return positions, batch_size
    if batch_size % size:
        raise HarnessError(f"batch size {batch_size} does not split over {size} processes; "
                           f"use a multiple of {size}")
    uneven = (n % batch_size) % size
    if uneven:
        positions = torch.cat([positions, positions[:size - uneven]])
    return positions[rank::size], batch_size // size


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
