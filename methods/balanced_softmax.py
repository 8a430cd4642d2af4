"""Balanced Softmax, Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition",
NeurIPS 2020: cross-entropy on z + log n_c (the logit-adjusted loss at τ = 1 up to a
constant), trained end to end on BALMS's recipe: batch 512, AutoAugment + Cutout, a warm-up
from lr 0.05 to 0.1, then cosine to 0. The classifier keeps PyTorch's default Linear
initialisation, as BALMS's DotProductClassifier does; predictions use the raw logits."""
import torch.nn.functional as F

from harness.method import Method, RunContext, class_counts, reinit_linear


class BalancedSoftmax(Method):
    name = "balanced_softmax"
    title = "Balanced Softmax"
    paper = "Ren et al., Balanced Meta-Softmax for Long-Tailed Visual Recognition, NeurIPS 2020"

    def stage1_model(self, model, ctx: RunContext) -> None:
        reinit_linear(model)

    def stage1_loss(self, ctx: RunContext):
        log_counts = class_counts(ctx).log()
        return "balanced-softmax", lambda logits, feats, target, epoch: F.cross_entropy(logits + log_counts, target)


METHOD = BalancedSoftmax()
