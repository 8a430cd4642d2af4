"""Weight balancing (WB), Alshammari et al., "Long-Tailed Recognition via Weight
Balancing", CVPR 2022. Stage 1: CE with strong weight decay. Stage 2: the classifier
alone with the class-balanced loss, weight decay and a MaxNorm cap on each class row."""
import torch
import torch.nn.functional as F

from harness.engine import TrainSpec
from harness.method import Method, RunContext, class_balanced_weights, class_counts, one_hot, stage2_spec


def class_balanced_loss(logits, target, weights):
    """Binary cross-entropy on softmax probabilities, weighted by each sample's class,
    averaged over batch and classes (the official code's 'softmax' variant)."""
    probs = logits.softmax(dim=1)
    onehot = one_hot(target, logits.shape[1]).float()
    per_sample = weights[target].unsqueeze(1).expand_as(probs)
    return F.binary_cross_entropy(probs, onehot, weight=per_sample)


class MaxNorm:
    """Project every class row of `weight` onto the ball of radius δ after each step.
    δ = min ||w|| + thresh (max ||w|| - min ||w||) over the stage-1 rows."""

    def __init__(self, weight: torch.nn.Parameter, thresh: float):
        norms = weight.detach().norm(dim=1)
        self.weight = weight
        self.radius = float(norms.min() + thresh * (norms.max() - norms.min()))
        # device counters, read once at the end: no per-step sync, and safe inside a CUDA graph
        self.active_steps = torch.zeros((), dtype=torch.long, device=weight.device)
        self.steps = torch.zeros((), dtype=torch.long, device=weight.device)

    def state_tensors(self) -> list[torch.Tensor]:
        """What a step mutates besides the model (restored after graph warm-up)."""
        return [self.active_steps, self.steps]

    @torch.no_grad()
    def __call__(self) -> None:
        norms = self.weight.norm(dim=1, keepdim=True)
        over = norms > self.radius
        self.active_steps += over.any().long()
        self.weight.mul_(torch.where(over, self.radius / norms, torch.ones_like(norms)))
        self.steps += 1


class WeightBalancing(Method):
    name = "wb"
    title = "WB (weight decay + MaxNorm)"
    label = "WB"
    paper = "Alshammari et al., Long-Tailed Recognition via Weight Balancing, CVPR 2022"
    # the paper tunes stage-1 weight decay by Bayesian optimisation over its Fig. 4 range
    tunables = {"stage1.weight_decay": "loguniform(1e-4, 5e-2)", "stage2.weight_decay": "loguniform(1e-3, 1)",
                "maxnorm_thresh": "uniform(0, 0.5)"}

    def stage2(self, model, ctx: RunContext) -> TrainSpec:
        recipe = ctx.recipe
        weights = class_balanced_weights(class_counts(ctx), float(recipe.get("beta", 0.9999)))
        cap = MaxNorm(model.fc.weight, float(recipe.get("maxnorm_thresh", 0.1)))
        ctx.extra["maxnorm_radius"] = cap.radius
        ctx.state["maxnorm"] = cap

        def loss(logits, feats, target, epoch):
            return class_balanced_loss(logits, target, weights)

        return stage2_spec(ctx, list(model.fc.parameters()), loss=loss, after_step=cap)

    def finalize(self, model, ctx: RunContext) -> None:
        cap = ctx.state["maxnorm"]
        ctx.extra["maxnorm_active_steps"] = int(cap.active_steps)
        ctx.extra["maxnorm_steps"] = int(cap.steps)


METHOD = WeightBalancing()
