"""LDAM-DRW, Cao et al., NeurIPS 2019: a cosine classifier whose target logit is lowered by
a class margin m_c ∝ n_c^(-1/4) (the rarest class gets `max_margin`), all logits scaled by
s = 30, with deferred re-weighting (see ce_drw)."""
import torch
import torch.nn.functional as F
from torch import nn

from harness.method import Method, RunContext, class_counts, deferred_weights, one_hot


class NormedLinear(nn.Module):
    """LDAM's NormedLinear: logits (x/||x||)·(w_c/||w_c||), no bias; weights uniform(-1, 1),
    each class vector rescaled to norm 1."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features).uniform_(-1, 1)
        self.weight = nn.Parameter(weight / weight.norm(dim=1, keepdim=True))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats, dim=1) @ F.normalize(self.weight, dim=1).t()


def margins(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    m = counts.pow(-0.25)
    return m * (max_margin / m.max())


def ldam_loss(logits, target, class_margins, scale, weight=None):
    """Cross-entropy of s·(z − m_y·onehot): the margin only on the target logit."""
    onehot = one_hot(target, logits.shape[1])
    adjusted = torch.where(onehot, logits - class_margins[target].unsqueeze(1), logits)
    return F.cross_entropy(scale * adjusted, target, weight=weight)


class LDAMDRW(Method):
    name = "ldam_drw"
    title = "LDAM-DRW"
    label = "LDAM-DRW"
    paper = "Cao et al., Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss, NeurIPS 2019"
    required_keys = ("beta", "max_margin", "scale", "stage1.drw_epoch")

    def stage1_model(self, model, ctx: RunContext) -> None:
        model.fc = NormedLinear(model.feat_dim, ctx.data.num_classes)

    def stage1_loss(self, ctx: RunContext):
        recipe = ctx.recipe
        beta, start = float(recipe["beta"]), int(recipe["stage1"]["drw_epoch"])
        max_margin, scale = float(recipe["max_margin"]), float(recipe["scale"])
        class_margins = margins(class_counts(ctx), max_margin)
        weights = deferred_weights(ctx, beta, start)

        def loss(logits, feats, target, epoch):
            return ldam_loss(logits, target, class_margins, scale, weights(epoch))

        return f"ldam(max_m={max_margin},s={scale})-drw(beta={beta},from={start})", loss

    def probabilities(self, outputs, ctx: RunContext):
        return (float(ctx.recipe["scale"]) * outputs).softmax(1)   # the cosines the loss scales by s


METHOD = LDAMDRW()
