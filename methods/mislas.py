"""MiSLAS, Zhong et al., "Improving Calibration for Long-Tailed Recognition", CVPR 2021.
Stage 1: cross-entropy with mixup (α = 1). Stage 2, on the frozen backbone with the
class-aware sampler: the stage-1 classifier fine-tuned at `lr_factor` × the learning rate,
learned per-class scales on its logits (LWS, bias included) at the full rate, and
label-aware smoothing: ε_y = ε_tail + (ε_head − ε_tail)·sin(π(n_y − n_min) / (2(n_max −
n_min))), loss (1 − ε_y)·NLL + ε_y·mean_c(−log p_c). BatchNorm statistics move in stage 2
only with shift_bn (bn_mode: train)."""
import math

import torch
import torch.nn.functional as F

from harness.augment import Mixup, mixed_loss
from harness.engine import TrainSpec, cross_entropy
from harness.method import Method, RunContext, class_counts, stage2_spec
from methods.lws import ScaledLinear


def smoothing(counts: torch.Tensor, head: float, tail: float) -> torch.Tensor:
    """ε per class, the concave shape MiSLAS uses: head classes smoothed most."""
    span = (counts.max() - counts.min()).clamp_min(1)
    return tail + (head - tail) * torch.sin((counts - counts.min()) * math.pi / (2 * span))


def label_aware_smoothing(logits, target, eps):
    logp = F.log_softmax(logits, dim=1)
    e = eps[target]
    return ((1 - e) * -logp.gather(1, target.unsqueeze(1)).squeeze(1) + e * -logp.mean(dim=1)).mean()


class MiSLAS(Method):
    name = "mislas"
    title = "MiSLAS (mixup + label-aware smoothing)"
    label = "MiSLAS"
    paper = "Zhong et al., Improving Calibration for Long-Tailed Recognition, CVPR 2021"
    required_keys = ("mixup_alpha", "smooth_head", "smooth_tail", "lr_factor", "stage2")

    def stage1_transforms(self, ctx: RunContext):
        return [Mixup(float(ctx.recipe["mixup_alpha"]))]

    def stage1_loss(self, ctx: RunContext):
        return f"mixup(alpha={float(ctx.recipe['mixup_alpha'])})-ce", mixed_loss(cross_entropy)

    def stage2(self, model, ctx: RunContext) -> TrainSpec:
        recipe = ctx.recipe
        model.fc = ScaledLinear(model.fc, train_linear=True)
        eps = smoothing(class_counts(ctx), float(recipe["smooth_head"]), float(recipe["smooth_tail"]))
        groups = [{"params": list(model.fc.linear.parameters()), "lr_scale": float(recipe["lr_factor"])},
                  {"params": [model.fc.scales]}]

        def loss(logits, feats, target, epoch):
            return label_aware_smoothing(logits, target, eps)

        return stage2_spec(ctx, groups, sampler="class_aware", loss=loss)


METHOD = MiSLAS()
