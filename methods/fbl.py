"""Feature-balanced loss (FBL), Li et al., ICME 2022: during training only, every logit
is lowered by c(t) * λ * ŝ_j / ||f||, a count-based offset scaled by the inverse feature
norm, with the curriculum c(t) = (t / (T - 10))^2 over 0-based epochs t."""

import torch
import torch.nn.functional as F

from harness.method import Method, RunContext, class_counts


def class_strengths(counts: torch.Tensor) -> torch.Tensor:
    """ŝ_j = (log n_max - log n_j) / max_k (log n_max - log n_k); all zero when balanced."""
    gap = counts.max().log() - counts.log()
    top = gap.max()
    return gap / top if top > 0 else torch.zeros_like(gap)


def curriculum(epoch: int, epochs: int) -> float:
    # The paper's T - 10 assumes T well above 10; short runs fall back to T.
    denom = epochs - 10 if epochs > 10 else epochs
    return (epoch / denom) ** 2


def fbl_loss(logits, feats, target, epoch, strengths, lam, epochs):
    norm = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    adjusted = logits - curriculum(epoch, epochs) * lam * strengths / norm
    return F.cross_entropy(adjusted, target)


class FeatureBalancedLoss(Method):
    name = "fbl"
    title = "FBL (feature-balanced loss)"
    paper = "Li et al., Feature-Balanced Loss for Long-Tailed Visual Recognition, ICME 2022"
    tunables = {"lambda": "uniform(0, 200)"}   # its CIFAR 60 and large-benchmark 150 inside

    def stage1_loss(self, ctx: RunContext):
        lam = float(ctx.recipe.get("lambda", 60.0))
        strengths = class_strengths(class_counts(ctx))
        epochs = ctx.recipe["stage1"]["epochs"]

        def loss(logits, feats, target, epoch):
            return fbl_loss(logits, feats, target, epoch, strengths, lam, epochs)

        return f"fbl(lambda={lam})", loss


METHOD = FeatureBalancedLoss()
