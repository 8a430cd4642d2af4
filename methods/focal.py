"""Focal loss, Lin et al., ICCV 2017, as the LDAM-DRW code runs it for long-tailed CIFAR:
p_i = exp(−CE_i), loss = mean((1 − p_i)^γ · CE_i), γ = 1, on the standard recipe."""
import torch
import torch.nn.functional as F

from harness.method import Method, RunContext


def focal_loss(logits, target, gamma: float):
    ce = F.cross_entropy(logits, target, reduction="none")
    return ((1.0 - torch.exp(-ce)) ** gamma * ce).mean()


class Focal(Method):
    name = "focal"
    title = "Focal loss"
    paper = "Lin et al., Focal Loss for Dense Object Detection, ICCV 2017"
    required_keys = ("gamma",)

    def stage1_loss(self, ctx: RunContext):
        gamma = float(ctx.recipe["gamma"])
        return f"focal(gamma={gamma})", lambda logits, feats, target, epoch: focal_loss(logits, target, gamma)


METHOD = Focal()
