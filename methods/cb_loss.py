"""Class-balanced loss, Cui et al., "Class-Balanced Loss Based on Effective Number of
Samples", CVPR 2019: every sample weighs w_y = (1 − β)/(1 − β^n_y), normalised to sum to C,
in a softmax, sigmoid or focal loss (the best variant per benchmark, from Cui's Table 2, is
the recipe's). All three divide by the batch size, as Cui's TensorFlow code does. For
sigmoid and focal the last bias starts at −log(C − 1) (prior 1/C) and is not decayed.
On iNaturalist the recipe is Cui's TPU one (tpu/run_inat2018.sh, resnet_main.py)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from harness import HarnessError
from harness.method import Method, RunContext, class_balanced_weights, class_counts, one_hot

VARIANTS = ("softmax", "sigmoid", "focal")


def cb_loss(logits, target, weights, variant: str, gamma: float = 0.0):
    w = weights[target]
    if variant == "softmax":
        return (w * F.cross_entropy(logits, target, reduction="none")).sum() / logits.shape[0]
    onehot = one_hot(target, logits.shape[1]).float()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    if variant == "focal":  # (1 − p_t)^γ as Cui writes it: exp(−γ·y·z − γ·log(1 + e^(−z))), stably
        bce = bce * torch.exp(-gamma * (onehot * logits + F.softplus(-logits)))
    return (w.unsqueeze(1) * bce).sum() / logits.shape[0]


class ClassBalancedLoss(Method):
    name = "cb_loss"
    title = "Class-balanced loss"
    label = "CB loss"
    paper = "Cui et al., Class-Balanced Loss Based on Effective Number of Samples, CVPR 2019"
    required_keys = ("variant", "beta")
    tunables = {"variant": "categorical(softmax, sigmoid, focal)", "beta": "categorical(0.9, 0.99, 0.999, 0.9999)",
                "gamma": "categorical(0.5, 1.0, 2.0)"}   # Cui's grid, chosen there by "cross-validation"

    def variant(self, ctx: RunContext) -> str:
        variant = ctx.recipe["variant"]
        if variant not in VARIANTS:
            raise HarnessError(f"cb_loss variant '{variant}' is unknown; known: {', '.join(VARIANTS)}")
        return variant

    def stage1_model(self, model, ctx: RunContext) -> None:
        if self.variant(ctx) != "softmax":
            nn.init.constant_(model.fc.bias, -math.log(ctx.data.num_classes - 1))

    def stage1_params(self, model, ctx: RunContext):
        """Cui's L2 skips the last bias (sigmoid, focal), and in its TPU ResNet-50 code (iNat)
        the BatchNorm parameters too (`decay_batchnorm: false`)."""
        undecayed = {id(model.fc.bias)} if self.variant(ctx) != "softmax" else set()
        if not ctx.recipe.get("decay_batchnorm", True):
            undecayed |= {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                          for p in m.parameters()}
        if not undecayed:
            return None
        params = list(model.parameters())
        return [{"params": [p for p in params if id(p) not in undecayed]},
                {"params": [p for p in params if id(p) in undecayed], "weight_decay": 0.0}]

    def stage1_loss(self, ctx: RunContext):
        variant, beta = self.variant(ctx), float(ctx.recipe["beta"])
        gamma = float(ctx.recipe.get("gamma", 0.0)) if variant == "focal" else 0.0
        weights = class_balanced_weights(class_counts(ctx), beta)

        def loss(logits, feats, target, epoch):
            return cb_loss(logits, target, weights, variant, gamma)

        return f"cb-{variant}(beta={beta},gamma={gamma})", loss


METHOD = ClassBalancedLoss()
