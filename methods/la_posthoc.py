"""Post-hoc logit adjustment, Menon et al., ICLR 2021: predict with z − τ·log π on the CE
model. τ is chosen on the validation split from a sweep stored whole; the paper's τ = 1
and the τ a test-set pick would give (an oracle, labelled so) are recorded beside it."""
import torch
from torch import nn

from harness.method import Method, RunContext, best_of, chosen_split, grid_of, log_priors, posthoc_sweep


class AdjustedLinear(nn.Module):
    """The trained classifier with a fixed per-class shift added to its logits."""

    def __init__(self, linear: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("shift", shift)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats) + self.shift

    def effective_weight(self) -> torch.Tensor:
        return self.linear.weight


class PostHocLogitAdjustment(Method):
    name = "la_posthoc"
    title = "Post-hoc logit adjustment"
    label = "Post-hoc LA"
    paper = "Menon et al., Long-tail learning via logit adjustment, ICLR 2021"

    def finalize(self, model, ctx: RunContext) -> None:
        log_pi = log_priors(ctx)
        fc = model.fc
        grid = grid_of(ctx.recipe, "tau", 0.0, 4.0, 0.25)
        with torch.no_grad():
            sweep = posthoc_sweep(model, ctx, sorted(set(grid) | {1.0}), "la_tau_sweep",
                                  lambda feats, tau: fc(feats) - tau * log_pi)
        chosen_on = chosen_split(sweep, "τ")
        tau, _ = best_of(sweep[chosen_on])
        oracle_tau, oracle_top1 = best_of(sweep["test"])
        ctx.extra.update({"tau": tau, "tau_selected_on": chosen_on, "tau1_test_top1": sweep["test"][1.0]["all"],
                          "tau_oracle": oracle_tau, "tau_oracle_test_top1": oracle_top1})
        model.fc = AdjustedLinear(fc, -tau * log_pi)


METHOD = PostHocLogitAdjustment()
