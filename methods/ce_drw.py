"""CE-DRW, Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
Loss", NeurIPS 2019: cross-entropy, deferred re-weighting. Every class weighs 1 until the
learning rate drops (0-based epoch 160 of 200), then (1 − β)/(1 − β^n_c), β = 0.9999,
normalised to sum to C; PyTorch's weighted mean, as the LDAM-DRW code uses it."""
import torch.nn.functional as F

from harness.method import Method, RunContext, deferred_weights


class CrossEntropyDRW(Method):
    name = "ce_drw"
    title = "CE-DRW (deferred re-weighting)"
    label = "CE-DRW"
    paper = "Cao et al., Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss, NeurIPS 2019"
    required_keys = ("beta", "stage1.drw_epoch")

    def stage1_loss(self, ctx: RunContext):
        beta, start = float(ctx.recipe["beta"]), int(ctx.recipe["stage1"]["drw_epoch"])
        weights = deferred_weights(ctx, beta, start)

        def loss(logits, feats, target, epoch):
            return F.cross_entropy(logits, target, weight=weights(epoch))

        return f"ce-drw(beta={beta},from={start})", loss


METHOD = CrossEntropyDRW()
