"""Decoupling's class-aware sampler, as classifier-balancing's `ClassAwareSampler` runs it.

An endless cycle over the classes and one endless cycle over each class's images; a
cycle is reshuffled before its first pass and whenever it wraps (`RandomCycleIter`).
Each draw picks the next class and takes the next `per_class` images of that class's
cycle. The cycles are never reset: an epoch goes on where the last one stopped, so
they are part of the resumable state. How many samples an epoch takes is the recipe's
(`epoch_samples`): the official loops stop after a fixed number of batches, not after
the max_c n_c * C samples the sampler could yield.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from harness import HarnessError

EPOCH_STEPS = ("all", "floor", "ceil+1")


def epoch_samples(rule: str, n_train: int, batch: int, sampler: str = "instance", stage: str = "stage1") -> int:
    """Samples in an epoch. all: every image once, the last batch partial (LDAM's loader);
    floor: int(N / batch) full batches, the rest dropped (classifier-balancing's and BALMS's
    `epoch_steps`, for both samplers); ceil+1: ceil(N / batch) + 1 full class-aware batches
    (MiSLAS's `end_steps`, then `if i > end_steps: break`)."""
    if rule == "all" and sampler == "instance":
        return n_train
    if rule == "floor":
        steps = n_train // batch
    elif rule == "ceil+1" and sampler == "class_aware":
        steps = math.ceil(n_train / batch) + 1
    else:
        fits = ("all", "floor") if sampler == "instance" else ("floor", "ceil+1")
        raise HarnessError(f"epoch_steps '{rule}' does not fit the {sampler} sampler; use {' or '.join(fits)}")
    if steps < 1:
        raise HarnessError(f"{n_train} training images make no full batch of {batch}; pass a smaller batch: "
                           f"--set {stage}.batch_size={n_train} (or less)")
    return steps * batch


class _Cycle:
    """RandomCycleIter: items in a shuffled order, reshuffled each time the order is used up."""

    def __init__(self, items: np.ndarray):
        self.order = np.array(items, dtype=np.int64)
        self.pos = len(self.order)  # used up: the first take shuffles, as the official iterator does

    def take(self, k: int, rng: np.random.RandomState) -> np.ndarray:
        out = np.empty(k, dtype=np.int64)
        filled = 0
        while filled < k:
            if self.pos == len(self.order):
                rng.shuffle(self.order)
                self.pos = 0
            n = min(k - filled, len(self.order) - self.pos)
            out[filled:filled + n] = self.order[self.pos:self.pos + n]
            self.pos += n
            filled += n
        return out


class ClassAwareSampler:
    def __init__(self, labels: np.ndarray, per_class: int, rng: np.random.RandomState, shuffle_batch: bool):
        labels = np.asarray(labels)
        num_classes = int(labels.max()) + 1
        self.per_class, self.rng, self.shuffle_batch = per_class, rng, shuffle_batch
        self.classes = _Cycle(np.arange(num_classes))
        self.images = [_Cycle(np.flatnonzero(labels == c)) for c in range(num_classes)]

    def draw(self, n: int, batch: int) -> np.ndarray:
        """The next n sample indices (n a multiple of `batch`); with `shuffle_batch` each batch
        is permuted in place, as classifier-balancing's `shuffle: true` configs do (cRT, LWS)."""
        draws = math.ceil(n / self.per_class)
        classes = self.classes.take(draws, self.rng)
        out = np.empty((draws, self.per_class), dtype=np.int64)
        for c in np.unique(classes):
            rows = np.flatnonzero(classes == c)
            out[rows] = self.images[c].take(len(rows) * self.per_class, self.rng).reshape(-1, self.per_class)
        order = out.reshape(-1)[:n].reshape(-1, batch)
        if not self.shuffle_batch:
            return order.reshape(-1)
        within = self.rng.random_sample(order.shape).argsort(axis=1)
        return np.take_along_axis(order, within, axis=1).reshape(-1)

    # -- resumable state: plain tensors (torch.load(weights_only=True) reads them back)
    def state_dict(self) -> dict:
        cycles = [self.classes, *self.images]
        return {"orders": [torch.from_numpy(c.order.copy()) for c in cycles],
                "positions": torch.tensor([c.pos for c in cycles], dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        cycles = [self.classes, *self.images]
        if len(state["orders"]) != len(cycles):
            raise HarnessError("the checkpoint's class-aware sampler is for another dataset")
        for cycle, order, pos in zip(cycles, state["orders"], state["positions"].tolist()):
            cycle.order, cycle.pos = order.numpy().astype(np.int64), int(pos)
