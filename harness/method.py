"""What a method is: a stage-1 loss, an optional stage 2 and an optional post-hoc step.

A method module builds one `Method` subclass instance and exposes it through the
`harness.methods` entry-point group. The runner does everything else: data,
stage-1 training (cached and shared between methods whose stage-1 loss and
recipe agree), evaluation and storage.

Third-party example (pyproject.toml of another package):

    [project.entry-points."harness.methods"]
    my_method = "my_pkg.my_method:METHOD"
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from harness.engine import DeviceData, LossFn, TrainSpec, cross_entropy


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
    paper: str = ""

    def stage1_loss(self, ctx: RunContext) -> tuple[str, LossFn]:
        """An id (part of the stage-1 cache key) and the loss for stage 1."""
        return "ce", cross_entropy

    def stage2(self, model: nn.Module, ctx: RunContext) -> TrainSpec | None:
        """Prepare the model for stage 2 (swap or freeze the head) and say how to train it."""
        return None

    def finalize(self, model: nn.Module, ctx: RunContext) -> None:
        """Post-hoc change to the trained model (e.g. τ-normalisation)."""


def head_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.fc.parameters())


def stage2_spec(ctx: RunContext, params, **kw) -> TrainSpec:
    """A stage-2 spec on a frozen backbone, BatchNorm mode from the recipe (train by default,
    as the official decoupling and weight-balancing codes leave it)."""
    recipe = ctx.recipe["stage2"]
    bn_mode = recipe.get("bn_mode", "train")
    ctx.extra["stage2_bn_mode"] = bn_mode
    return TrainSpec.from_recipe(recipe, params=params, frozen_backbone=True, bn_mode=bn_mode, **kw)


def reinit_linear(model: nn.Module) -> None:
    old = model.fc
    model.fc = nn.Linear(old.in_features, old.out_features).to(old.weight.device)


def class_counts(ctx: RunContext) -> torch.Tensor:
    return torch.tensor(ctx.train_counts, dtype=torch.float32, device=ctx.data.device)
