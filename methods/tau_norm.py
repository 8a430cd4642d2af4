"""τ-normalisation, Kang et al., ICLR 2020: w_c <- w_c / ||w_c||^τ with the bias dropped,
τ chosen on the held-out validation split (on test where a run has none: recorded and named as
such) from a sweep that is stored whole."""
import torch
from torch import nn

from harness.method import Method, RunContext, best_of, chosen_split, grid_of, posthoc_sweep


class TauNormLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, tau: float):
        super().__init__()
        self.tau = tau
        self.register_buffer("weight", tau_normalise(weight.detach(), tau))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.t()


def tau_normalise(weight: torch.Tensor, tau: float) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


class TauNorm(Method):
    name = "tau_norm"
    title = "τ-norm"
    label = "τ-norm"
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"

    def finalize(self, model, ctx: RunContext) -> None:
        weight = model.fc.weight.detach()
        sweep = posthoc_sweep(model, ctx, grid_of(ctx.recipe, "tau", 0.0, 2.0, 0.1), "tau_sweep",
                              lambda feats, tau: feats @ tau_normalise(weight, tau).t())
        chosen_on = chosen_split(sweep, "τ")
        tau, _ = best_of(sweep[chosen_on])
        oracle_tau, oracle_top1 = best_of(sweep["test"])
        ctx.extra.update({"tau": tau, "tau_selected_on": chosen_on, "tau_test_selected": oracle_tau,
                          "tau_test_selected_top1": oracle_top1})
        model.fc = TauNormLinear(weight, tau)


METHOD = TauNorm()
