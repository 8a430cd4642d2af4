"""Learnable weight scaling (LWS), Kang et al., ICLR 2020: keep the stage-1 classifier
frozen and learn one scale per class, logit_c = s_c (w_c . f + b_c)."""
import torch
from torch import nn

from harness.engine import TrainSpec
from harness.method import Method, RunContext, stage2_spec


class ScaledLinear(nn.Module):
    """logit_c = s_c (w_c . f + b_c), s initialised to 1; W and b frozen unless `train_linear`
    (MiSLAS fine-tunes them beside the scales)."""

    def __init__(self, linear: nn.Linear, train_linear: bool = False):
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(train_linear)
        self.scales = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scales * self.linear(feats)

    def effective_weight(self) -> torch.Tensor:
        return self.scales.detach()[:, None] * self.linear.weight


class LearnableWeightScaling(Method):
    name = "lws"
    title = "LWS (learnable weight scaling)"
    label = "LWS"
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"

    def stage2(self, model, ctx: RunContext) -> TrainSpec:
        model.fc = ScaledLinear(model.fc)
        return stage2_spec(ctx, [model.fc.scales], sampler="class_aware")


METHOD = LearnableWeightScaling()
