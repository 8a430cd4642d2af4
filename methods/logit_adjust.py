"""Logit-adjusted loss, Menon et al., "Long-tail learning via logit adjustment", ICLR 2021:
cross-entropy on z + τ·log π (π the training class frequencies, τ = 1); the model predicts
with the raw logits z."""
import torch.nn.functional as F

from harness.method import Method, RunContext, log_priors


class LogitAdjustedLoss(Method):
    name = "logit_adjust"
    title = "Logit-adjusted loss"
    label = "LA loss"
    paper = "Menon et al., Long-tail learning via logit adjustment, ICLR 2021"
    required_keys = ("tau",)
    tunables = {"tau": "uniform(0, 3)"}

    def stage1_loss(self, ctx: RunContext):
        tau = float(ctx.recipe["tau"])
        shift = tau * log_priors(ctx)
        return f"logit-adjusted(tau={tau})", lambda logits, feats, target, epoch: F.cross_entropy(
            logits + shift, target)


METHOD = LogitAdjustedLoss()
