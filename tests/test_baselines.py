"""The standard baselines (DESIGN.md §3b): each loss or post-hoc rule computed by hand on a
tiny input, and a check that would fail if the method silently trained plain CE."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.augment import Mixup, mixed_loss
from harness.engine import cross_entropy
from harness.method import class_balanced_weights
from methods.balanced_softmax import METHOD as BALANCED_SOFTMAX
from methods.cb_loss import METHOD as CB_LOSS, cb_loss
from methods.ce_drw import METHOD as CE_DRW
from methods.focal import focal_loss
from methods.la_posthoc import AdjustedLinear
from methods.ldam_drw import METHOD as LDAM_DRW, NormedLinear, ldam_loss, margins
from methods.logit_adjust import METHOD as LOGIT_ADJUST
from methods.mislas import METHOD as MISLAS, label_aware_smoothing, smoothing
from methods.ncm import ncm_head
from tests.test_methods import make_ctx

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.0]])
TARGET = torch.tensor([0, 2, 1])
COUNTS = [100, 10, 1]


def ce_by_hand(z, y):
    return -z[y] + math.log(sum(math.exp(v) for v in z))


def ctx_with(recipe, counts=COUNTS):
    _, _, ctx = make_ctx(recipe={"stage2": {}, **recipe})
    ctx.train_counts = counts
    return ctx


def epoch(e):
    return torch.tensor(float(e))


def test_ce_drw_weights_switch_on_at_the_drw_epoch():
    ctx = ctx_with({"beta": 0.9999, "stage1": {"drw_epoch": 160}})
    _, loss = CE_DRW.stage1_loss(ctx)
    assert loss(LOGITS, None, TARGET, epoch(159)).item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item())
    w = class_balanced_weights(torch.tensor(COUNTS, dtype=torch.float32), 0.9999).tolist()
    by_hand = sum(w[y] * ce_by_hand(z, y) for z, y in zip(LOGITS.tolist(), TARGET.tolist())) / sum(w[y] for y in TARGET)
    after = loss(LOGITS, None, TARGET, epoch(160)).item()
    assert after == pytest.approx(by_hand, rel=1e-6)
    assert abs(after - F.cross_entropy(LOGITS, TARGET).item()) > 1e-3  # not plain CE once re-weighting starts


def test_ldam_margins_scale_and_cosine_classifier_by_hand():
    m = margins(torch.tensor(COUNTS, dtype=torch.float32), 0.5).tolist()
    raw = [n ** -0.25 for n in COUNTS]
    assert m == pytest.approx([0.5 * r / max(raw) for r in raw])
    expected = sum(ce_by_hand([30 * (v - (m[y] if c == y else 0.0)) for c, v in enumerate(z)], y)
                   for z, y in zip(LOGITS.tolist(), TARGET.tolist())) / 3
    assert ldam_loss(LOGITS, TARGET, torch.tensor(m), 30.0).item() == pytest.approx(expected, rel=1e-5)
    head = NormedLinear(4, 3)
    assert head.weight.norm(dim=1).tolist() == pytest.approx([1.0] * 3)
    f = torch.randn(2, 4)
    cosine = (f / f.norm(dim=1, keepdim=True)) @ (head.weight / head.weight.norm(dim=1, keepdim=True)).t()
    assert torch.allclose(head(f), cosine, atol=1e-6)


def test_ldam_drw_trains_its_own_head_and_loss():
    model, _, ctx = make_ctx(recipe={"beta": 0.9999, "max_margin": 0.5, "scale": 30, "stage1": {"drw_epoch": 1}})
    LDAM_DRW.stage1_model(model, ctx)
    assert isinstance(model.fc, NormedLinear)
    _, loss = LDAM_DRW.stage1_loss(ctx)
    assert abs(loss(LOGITS, None, TARGET, epoch(0)).item() - F.cross_entropy(LOGITS, TARGET).item()) > 1e-2


def test_focal_loss_by_hand():
    expected = 0.0
    for z, y in zip(LOGITS.tolist(), TARGET.tolist()):
        ce = ce_by_hand(z, y)
        expected += (1 - math.exp(-ce)) ** 2.0 * ce
    assert focal_loss(LOGITS, TARGET, 2.0).item() == pytest.approx(expected / 3, rel=1e-6)
    assert focal_loss(LOGITS, TARGET, 0.0).item() == pytest.approx(F.cross_entropy(LOGITS, TARGET).item())


@pytest.mark.parametrize("variant", ["softmax", "sigmoid", "focal"])
def test_class_balanced_loss_variants_by_hand(variant):
    w = torch.tensor([0.2, 1.0, 1.8])
    gamma = 2.0
    total = 0.0
    for z, y in zip(LOGITS.tolist(), TARGET.tolist()):
        if variant == "softmax":
            total += w[y].item() * ce_by_hand(z, y)
            continue
        for c, v in enumerate(z):
            label = 1.0 if c == y else 0.0
            p = 1 / (1 + math.exp(-v))
            bce = -(label * math.log(p) + (1 - label) * math.log(1 - p))
            modulator = (1 - (p if label else 1 - p)) ** gamma if variant == "focal" else 1.0
            total += w[y].item() * bce * modulator
    assert cb_loss(LOGITS, TARGET, w, variant, gamma).item() == pytest.approx(total / 3, rel=1e-5)


def test_class_balanced_sigmoid_starts_at_the_prior_and_does_not_decay_the_bias():
    model, _, ctx = make_ctx(recipe={"variant": "sigmoid", "beta": 0.99})
    CB_LOSS.stage1_model(model, ctx)
    assert model.fc.bias.tolist() == pytest.approx([-math.log(2)] * 3)
    groups = CB_LOSS.stage1_params(model, ctx)
    assert groups[1] == {"params": [model.fc.bias], "weight_decay": 0.0}
    assert all(p is not model.fc.bias for p in groups[0]["params"])
    _, loss = CB_LOSS.stage1_loss(ctx)
    assert abs(loss(LOGITS, None, TARGET, epoch(0)).item() - F.cross_entropy(LOGITS, TARGET).item()) > 1e-2


def test_class_balanced_loss_on_inaturalist_leaves_batchnorm_undecayed_as_cuis_tpu_code():
    model, _, ctx = make_ctx(recipe={"variant": "focal", "beta": 0.999, "gamma": 0.5, "decay_batchnorm": False})
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert bn
    decayed, undecayed = CB_LOSS.stage1_params(model, ctx)
    assert {id(p) for p in undecayed["params"]} == bn | {id(model.fc.bias)} and undecayed["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))
    model, _, ctx = make_ctx(recipe={"variant": "softmax", "beta": 0.999})
    assert CB_LOSS.stage1_params(model, ctx) is None   # CIFAR's softmax variant: every parameter decayed


def test_logit_adjusted_loss_by_hand_and_balanced_softmax_is_the_same_loss():
    ctx = ctx_with({"tau": 1.0})
    _, la = LOGIT_ADJUST.stage1_loss(ctx)
    log_pi = [math.log(n / sum(COUNTS)) for n in COUNTS]
    expected = sum(ce_by_hand([v + log_pi[c] for c, v in enumerate(z)], y)
                   for z, y in zip(LOGITS.tolist(), TARGET.tolist())) / 3
    assert la(LOGITS, None, TARGET, epoch(0)).item() == pytest.approx(expected, rel=1e-6)
    _, bs = BALANCED_SOFTMAX.stage1_loss(ctx)
    # log n_c = log π_c + log N: a constant shift of every logit, which cross-entropy ignores
    assert bs(LOGITS, None, TARGET, epoch(0)).item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - F.cross_entropy(LOGITS, TARGET).item()) > 1e-2


def test_posthoc_adjustment_subtracts_tau_log_prior():
    linear = torch.nn.Linear(2, 3)
    log_pi = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    head = AdjustedLinear(linear, -1.5 * log_pi)
    f = torch.randn(4, 2)
    assert torch.allclose(head(f), linear(f) - 1.5 * log_pi)


def test_ncm_cl2n_centroids_by_hand():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    head = ncm_head(feats, labels, 2)
    centre = torch.tensor([1.0, 1.5])
    normed = [(f - centre) / (f - centre).norm() for f in feats]
    c0, c1 = (normed[0] + normed[1]) / 2, (normed[2] + normed[3]) / 2  # means, not renormalised
    assert torch.allclose(head.centroids, torch.stack([c0, c1]), atol=1e-6)
    x = torch.tensor([[2.0, 3.0]])
    xh = (x[0] - centre) / (x[0] - centre).norm()
    assert head(x)[0].tolist() == pytest.approx([-(xh - c0).pow(2).sum().item(), -(xh - c1).pow(2).sum().item()],
                                                abs=1e-5)


def test_label_aware_smoothing_by_hand():
    counts = torch.tensor([100.0, 10.0, 1.0])
    eps = smoothing(counts, 0.4, 0.1)
    assert eps.tolist() == pytest.approx([0.1 + 0.3 * math.sin((n - 1) * math.pi / (2 * 99)) for n in (100, 10, 1)])
    expected = 0.0
    for z, y in zip(LOGITS.tolist(), TARGET.tolist()):
        logp = [v - math.log(sum(math.exp(u) for u in z)) for v in z]
        e = eps[y].item()
        expected += (1 - e) * -logp[y] + e * -sum(logp) / 3
    assert label_aware_smoothing(LOGITS, TARGET, eps).item() == pytest.approx(expected / 3, rel=1e-6)


def test_mixup_mixes_inputs_and_targets_with_one_lambda_per_batch():
    mix = Mixup(1.0)
    drawn = mix.draw(6, torch.Generator().manual_seed(0), np.random.RandomState(0), torch.device("cpu"))
    x = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    y = torch.arange(6)
    mixed, (y_a, y_b, lam) = mix.apply(x, y, drawn)
    partner = drawn["keys"].argsort()
    assert lam == drawn["lam"][0] and 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner]) and torch.equal(y_b, y[partner])
    loss = mixed_loss(cross_entropy)(LOGITS, None, (TARGET, TARGET.flip(0), torch.tensor(0.3)), epoch(0))
    expected = 0.3 * F.cross_entropy(LOGITS, TARGET) + 0.7 * F.cross_entropy(LOGITS, TARGET.flip(0))
    assert loss.item() == pytest.approx(expected.item())


def test_mislas_stage2_fine_tunes_the_classifier_at_its_own_rate_beside_the_scales():
    stage2 = {"epochs": 1, "batch_size": 8, "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4,
              "schedule": {"kind": "cosine", "step_at": "epoch-end"}, "epoch_steps": "ceil+1", "bn_mode": "eval"}
    model, _, ctx = make_ctx(recipe={"stage2": stage2, "mixup_alpha": 1.0, "smooth_head": 0.4, "smooth_tail": 0.1,
                                     "lr_factor": 0.2})
    assert [t.name for t in MISLAS.stage1_transforms(ctx)] == ["mixup"]
    weight = model.fc.weight
    spec = MISLAS.stage2(model, ctx)
    assert spec.sampler == "class_aware" and spec.epoch_steps == "ceil+1" and spec.bn_mode == "eval"
    [classifier, scales] = spec.params
    assert classifier["lr_scale"] == 0.2 and classifier["params"][0] is weight and weight.requires_grad
    assert scales["params"] == [model.fc.scales]
    assert abs(spec.loss(LOGITS, None, TARGET, epoch(0)).item() - F.cross_entropy(LOGITS, TARGET).item()) > 1e-2
