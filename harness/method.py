"""What a method is: hooks on one training loop.

A method module builds one `Method` subclass instance and exposes it through the
`harness.methods` entry-point group. The runner does everything else: data, stage-1
training (cached and shared between methods whose stage 1 is the same), evaluation
and storage. The hooks, in the order the runner calls them:

- `stage1_model(model, ctx)`: swap or initialise the classifier before stage 1 (LDAM's
  cosine classifier, Cui's bias prior);
- `stage1_loss(ctx)`: the loss, with an id that names it in the stage-1 cache key; a loss
  sees the 0-based epoch as a device tensor, so a per-epoch class weight (DRW) is a
  `torch.where` on it, never a host read;
- `stage1_params(model, ctx)`: optimiser groups with their own learning-rate scale or
  weight decay (Cui: no decay on the last bias);
- `stage1_transforms(ctx)`: per-step batch transforms (mixup);
- `stage2(model, ctx)`: prepare the model for a second stage and say how to train it (a
  `TrainSpec`, whose params, transforms and loss follow the same rules);
- `finalize(model, ctx)`: a post-hoc step on the trained model (τ-norm, NCM, post-hoc
  logit adjustment), which may replace the classifier used for evaluation;
- `probabilities(outputs, ctx)`: the class probabilities of the evaluated head's outputs, of
  which the calibration error is measured (a softmax, unless the head's outputs are scaled in
  the loss, as LDAM's cosines, or are not logits at all, as NCM's distances).

Everything a per-step hook computes must be tensor work on the device (it runs inside a
captured CUDA graph), and everything it mutates must be in the trainer's resumable
state (batch transforms draw their randomness per epoch for that reason).

Third-party example (pyproject.toml of another package):

    [project.entry-points."harness.methods"]
    my_method = "my_pkg.my_method:METHOD"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from harness.augment import BatchTransform
from harness.data import group_accuracies, per_class_accuracy
from harness.distributed import announce
from harness.engine import DeviceData, LossFn, TrainSpec, cross_entropy, extract_features


@dataclass
class RunContext:
    """What a method may read and record during a run."""

    data: DeviceData
    train_counts: list[int]
    recipe: dict
    seed: int
    extra: dict = field(default_factory=dict)          # scalars stored with the run
    curves: list[dict] = field(default_factory=list)   # rows: kind, x, split, group, value
    state: dict = field(default_factory=dict)          # objects passed between a method's hooks


class Method:
    name: str = ""
    title: str = ""
    label: str = ""     # its name in a results table, as papers write it ("cRT"); default: the title
    paper: str = ""
    required_keys: tuple[str, ...] = ()  # keys (dotted: "stage1.drw_epoch") its recipe must have
    tunables: dict[str, str] = {}       # `harness tune`'s default space: key -> "loguniform(lo, hi)", ...

    def stage1_model(self, model: nn.Module, ctx: RunContext) -> None:
        """Swap or initialise the classifier before stage 1."""

    def stage1_loss(self, ctx: RunContext) -> tuple[str, LossFn]:
        """An id (part of the stage-1 cache key) and the loss for stage 1."""
        return "ce", cross_entropy

    def stage1_params(self, model: nn.Module, ctx: RunContext) -> list[dict] | None:
        """Stage-1 optimiser groups {"params", "lr_scale", "weight_decay"}; None: one group."""
        return None

    def stage1_transforms(self, ctx: RunContext) -> list[BatchTransform]:
        """Per-step batch transforms of stage 1, applied after the recipe's augmentation."""
        return []

    def stage2(self, model: nn.Module, ctx: RunContext) -> TrainSpec | None:
        """Prepare the model for stage 2 (swap or freeze the head) and say how to train it."""
        return None

    def finalize(self, model: nn.Module, ctx: RunContext) -> None:
        """Post-hoc change to the trained model (e.g. τ-normalisation)."""

    def probabilities(self, outputs: torch.Tensor, ctx: RunContext) -> torch.Tensor | None:
        """Class probabilities of the evaluated head's outputs (images x classes), for the
        calibration error; None where they have none."""
        return outputs.softmax(1)


def describe(method) -> dict:
    """What reports show of a method (a plugin's may lack any of these): its title, its label in
    a results table, and its paper."""
    title = getattr(method, "title", "") or method.name
    return {"title": title, "label": getattr(method, "label", "") or title, "paper": getattr(method, "paper", "")}


# ---------------------------------------------------------------- helpers the methods share

def stage2_spec(ctx: RunContext, params, **kw) -> TrainSpec:
    """A stage-2 spec on a frozen backbone, BatchNorm mode from the recipe (train by default,
    as the official decoupling and weight-balancing codes leave it)."""
    recipe = ctx.recipe["stage2"]
    bn_mode = recipe.get("bn_mode", "train")
    ctx.extra["stage2_bn_mode"] = bn_mode
    return TrainSpec.from_recipe(recipe, params=params, frozen_backbone=True, bn_mode=bn_mode, stage="stage2", **kw)


def reinit_linear(model: nn.Module) -> None:
    old = model.fc
    model.fc = nn.Linear(old.in_features, old.out_features).to(old.weight.device)


def class_counts(ctx: RunContext) -> torch.Tensor:
    return torch.tensor(ctx.train_counts, dtype=torch.float32, device=ctx.data.device)


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """w_c = (1 - β) / (1 - β^n_c), rescaled so that Σ_c w_c = C (Cui et al., CVPR 2019)."""
    w = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), counts.double()))
    return (w / w.sum() * len(counts)).float()


def deferred_weights(ctx: RunContext, beta: float, start_epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """DRW (Cao et al.): per-class loss weights, all 1 before 0-based `start_epoch` and the
    class-balanced weights from then on, chosen on the device from the epoch tensor."""
    balanced = class_balanced_weights(class_counts(ctx), beta)
    ones = torch.ones_like(balanced)
    return lambda epoch: torch.where(epoch >= start_epoch, balanced, ones)


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean one-hot rows by comparison: F.one_hot checks its input's range on the host,
    a sync that a captured CUDA step cannot make."""
    return target.unsqueeze(1) == torch.arange(num_classes, device=target.device)


def log_priors(ctx: RunContext) -> torch.Tensor:
    """log π_c, the training-set class frequencies."""
    counts = class_counts(ctx)
    return (counts / counts.sum()).log()


# ---------------------------------------------------------------- post-hoc sweeps

def posthoc_sweep(model: nn.Module, ctx: RunContext, grid: list[float], kind: str,
                  logits_at: Callable[[torch.Tensor, float], torch.Tensor]) -> dict[str, dict[float, dict]]:
    """Evaluate post-hoc logits `logits_at(features, x)` at every x of `grid` on the val
    and test splits and store the whole sweep as curves of `kind`. Returns, per split,
    x -> group accuracies. The caller chooses on the split `chosen_split` names."""
    data = ctx.data
    out: dict[str, dict[float, dict]] = {}
    for split in ("val", "test"):
        y = data.labels(split)
        if y.numel() == 0:
            continue
        feats = extract_features(model, data, split)
        out[split] = {}
        for x in grid:
            acc = per_class_accuracy(logits_at(feats, x).argmax(1), y, data.num_classes) * 100.0
            groups = group_accuracies(acc, ctx.train_counts)
            out[split][x] = groups
            ctx.curves += [{"kind": kind, "x": x, "split": split, "group": g, "value": v} for g, v in groups.items()]
    return out


def chosen_split(sweep: dict[str, dict], what: str) -> str:
    """The split a post-hoc hyper-parameter is chosen on: val, or test where the run has no
    validation split (iNaturalist 2018, whose held-out images are its test set; folder-lt at its
    natural ratio; --val-per-class 0). That choice is an oracle: said now, and named on the board
    through the run's record of it."""
    if "val" in sweep:
        return "val"
    announce(f"no validation split: {what} is chosen on test, an oracle (the board names it); "
             "--val-per-class N holds one out where the dataset allows")
    return "test"


def best_of(sweep: dict[float, dict]) -> tuple[float, float]:
    """(x, top-1) with the best overall top-1; ties keep the smaller x."""
    x = min(sweep, key=lambda k: (-sweep[k]["all"], k))
    return x, sweep[x]["all"]


def grid_of(recipe: dict, prefix: str, start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ..., stop from the recipe's `<prefix>_start/_stop/_step`."""
    start = recipe.get(f"{prefix}_start", start)
    stop = recipe.get(f"{prefix}_stop", stop)
    step = recipe.get(f"{prefix}_step", step)
    return [round(float(t), 6) for t in np.arange(start, stop + step / 2, step)]
