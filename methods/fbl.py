"""Feature-balanced loss (FBL), Li et al., ICME 2022: during training only, every logit
is lowered by c(t) * λ * ŝ_j / ||f||, a count-based offset scaled by the inverse feature
norm, with the curriculum c(t) = (t / t_full)^2 over 0-based epochs t. The official code's
t_full is T - 10 (train.py); a recipe states it as stage1.full_strength_epoch, which a shorter
budget scales with the rest of the schedule."""

import torch
import torch.nn.functional as F

from harness.method import Method, RunContext, class_counts


def class_strengths(counts: torch.Tensor) -> torch.Tensor:
    """ŝ_j = (log n_max - log n_j) / max_k (log n_max - log n_k); all zero when balanced."""
    gap = counts.max().log() - counts.log()
    top = gap.max()
    return gap / top if top > 0 else torch.zeros_like(gap)


def full_strength_epoch(stage1: dict) -> int:
    """The epoch at which c(t) reaches 1: the recipe's, else the official T - 10 (T itself for a
    run of 10 epochs or fewer, where T - 10 means nothing)."""
    epochs = stage1["epochs"]
    return stage1.get("full_strength_epoch", epochs - 10 if epochs > 10 else epochs)


def curriculum(epoch: int, full_at: int) -> float:
    """c(t) = (t / t_full)^2, unclamped past t_full as in train.py; t_full = 0 is full strength
    from the first epoch."""
    return (epoch / full_at) ** 2 if full_at > 0 else 1.0


def fbl_loss(logits, feats, target, epoch, strengths, lam, full_at):
    norm = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    adjusted = logits - curriculum(epoch, full_at) * lam * strengths / norm
    return F.cross_entropy(adjusted, target)


class FeatureBalancedLoss(Method):
    name = "fbl"
    title = "FBL (feature-balanced loss)"
    label = "FBL"
    paper = "Li et al., Feature-Balanced Loss for Long-Tailed Visual Recognition, ICME 2022"
    tunables = {"lambda": "uniform(0, 200)"}   # its CIFAR 60 and large-benchmark 150 inside

    def stage1_loss(self, ctx: RunContext):
        lam = float(ctx.recipe.get("lambda", 60.0))
        strengths = class_strengths(class_counts(ctx))
        full_at = full_strength_epoch(ctx.recipe["stage1"])

        def loss(logits, feats, target, epoch):
            return fbl_loss(logits, feats, target, epoch, strengths, lam, full_at)

        return f"fbl(lambda={lam})", loss


METHOD = FeatureBalancedLoss()
