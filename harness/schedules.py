"""Learning-rate schedules, named per recipe: the official codes differ in when their
schedulers step, and that moves numbers (DESIGN.md §3, §3b).

`factors(schedule, epoch, epochs, steps)` gives the multiplier of the base learning rate
for every step of a 0-based epoch; most schedules hold it for the whole epoch.

- warmup-step (LDAM-DRW): `warmup_epochs` W of linear warm-up, then the factor of the
  last `steps` entry [epoch, factor] whose epoch has been reached (absolute factors).
  `warmup_per: epoch` (LDAM, from the 1-based epoch at its start): epoch e < W trains at
  (e + 1) / W. `warmup_per: step` (Cui et al.; logit adjustment): from exactly 0, the
  factor is the fractional epoch global_step · B / N over W.
- cosine: ½(1 + cos(π t / E)) with t the number of scheduler steps taken. `step_at:
  epoch-start` (Decoupling, WB: `scheduler.step()` before each epoch): epoch e trains at
  t = e + 1, so the last epoch trains at 0. `step_at: epoch-end` (MiSLAS; torch's
  CosineAnnealingLR stepped after each epoch): t = e, full rate in the first epoch.
- warmup-cosine (BALMS's CosineAnnealingLRWarmup, stepped at the start of each 1-based
  epoch e): e < W trains at f + (1 − f)(e − 1)/(W − 1) with f = `warmup_from`, then
  ½(1 + cos(π(e − W)/(E − W))): full rate at e = W, 0 in the last epoch.
- constant.
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np

from harness import HarnessError

KINDS = ("warmup-step", "cosine", "warmup-cosine", "constant")
COSINE_STEPS = ("epoch-start", "epoch-end")


def check(schedule, where: str = "schedule") -> None:
    """A one-line error for a schedule the engine cannot run (before anything is written)."""
    if not isinstance(schedule, dict):
        raise HarnessError(f"{where} must be a mapping with a 'kind' ({', '.join(KINDS)})")
    kind = schedule.get("kind")
    if kind not in KINDS:
        raise HarnessError(f"{where}: unknown lr schedule '{kind}'; known: {', '.join(KINDS)}")
    if kind == "cosine" and schedule.get("step_at") not in COSINE_STEPS:
        raise HarnessError(f"{where}: a cosine schedule needs step_at: {' or '.join(COSINE_STEPS)} "
                           "(when the official code steps its scheduler)")
    if kind in ("warmup-step", "warmup-cosine"):
        warm = schedule.get("warmup_epochs", 0)
        if not isinstance(warm, Real) or warm < 0:
            raise HarnessError(f"{where}: warmup_epochs must be a number >= 0, got {warm!r}")
    if kind == "warmup-cosine" and schedule.get("warmup_epochs", 0) < 2:
        raise HarnessError(f"{where}: warmup-cosine needs warmup_epochs >= 2 (BALMS asserts it)")
    if kind == "warmup-step":
        if schedule.get("warmup_per", "epoch") not in ("epoch", "step"):
            raise HarnessError(f"{where}: warmup_per must be epoch or step")
        for entry in schedule.get("steps", []):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                    and all(isinstance(v, Real) for v in entry)):
                raise HarnessError(f"{where}: steps must be [epoch, factor] pairs, got {entry!r}")


def factors(schedule: dict, epoch: int, epochs: int, steps: int, batch: int = 1,
            samples: int | None = None) -> np.ndarray:
    """The learning-rate multiplier of each of the `steps` steps of 0-based `epoch`, whose
    `samples` samples come in batches of `batch` (only a per-step warm-up needs those)."""
    kind = schedule["kind"]
    if kind == "warmup-step":
        warm = schedule.get("warmup_epochs", 0)
        if epoch < warm:
            if schedule.get("warmup_per", "epoch") == "step":
                global_step = epoch * steps + np.arange(steps)
                return np.minimum(1.0, global_step * batch / ((samples or steps * batch) * warm))
            return np.full(steps, (epoch + 1) / warm)
        factor = 1.0
        for at, value in schedule.get("steps", []):
            if epoch >= at:
                factor = value
        return np.full(steps, float(factor))
    if kind == "cosine":
        t = epoch + 1 if schedule["step_at"] == "epoch-start" else epoch
        return np.full(steps, 0.5 * (1.0 + math.cos(math.pi * t / epochs)))
    if kind == "warmup-cosine":
        warm, start, e = schedule["warmup_epochs"], schedule.get("warmup_from", 0.0), epoch + 1
        if e < warm:
            return np.full(steps, start + (1.0 - start) * (e - 1) / (warm - 1))
        return np.full(steps, 0.5 * (1.0 + math.cos(math.pi * (e - warm) / (epochs - warm))))
    if kind == "constant":
        return np.ones(steps)
    raise HarnessError(f"unknown lr schedule '{kind}'; known: {', '.join(KINDS)}")
