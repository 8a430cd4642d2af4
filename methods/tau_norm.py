"""τ-normalisation, Kang et al., ICLR 2020: w_c <- w_c / ||w_c||^τ with the bias dropped,
τ chosen on the held-out validation split from a sweep that is stored whole."""
import numpy as np
import torch
from torch import nn

from harness.data import group_accuracies, per_class_accuracy
from harness.engine import extract_features
from harness.method import Method, RunContext


class TauNormLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, tau: float):
        super().__init__()
        self.tau = tau
        self.register_buffer("weight", tau_normalise(weight.detach(), tau))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.t()


def tau_normalise(weight: torch.Tensor, tau: float) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


def tau_grid(recipe: dict) -> list[float]:
    start, stop, step = recipe.get("tau_start", 0.0), recipe.get("tau_stop", 2.0), recipe.get("tau_step", 0.1)
    return [round(t, 6) for t in np.arange(start, stop + step / 2, step)]


class TauNorm(Method):
    name = "tau_norm"
    title = "τ-norm"
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"

    def finalize(self, model, ctx: RunContext) -> None:
        data = ctx.data
        weight = model.fc.weight.detach()
        splits = {split: (extract_features(model, data, split), data.labels(split)) for split in ("val", "test")}
        best = {}
        for tau in tau_grid(ctx.recipe):
            w = tau_normalise(weight, tau)
            for split, (feats, y) in splits.items():
                if y.numel() == 0:
                    continue
                acc = per_class_accuracy((feats @ w.t()).argmax(1), y, data.num_classes) * 100.0
                groups = group_accuracies(acc, ctx.train_counts)
                for group, value in groups.items():
                    ctx.curves.append({"kind": "tau_sweep", "x": tau, "split": split, "group": group, "value": value})
                if groups["all"] > best.get(split, (-1.0, None))[0]:  # ties keep the smaller τ
                    best[split] = (groups["all"], tau)
        chosen_on = "val" if "val" in best else "test"
        tau = best[chosen_on][1]
        ctx.extra.update({"tau": tau, "tau_selected_on": chosen_on, "tau_test_selected": best["test"][1],
                          "tau_test_selected_top1": best["test"][0]})
        model.fc = TauNormLinear(weight, tau)


METHOD = TauNorm()
