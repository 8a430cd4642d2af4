import math

import pytest
import torch
import torch.nn.functional as F

from harness.data import LTData
from harness.engine import DeviceData, train
from harness.method import RunContext
from harness.models import fmnist_cnn
from methods.crt import METHOD as CRT
from methods.fbl import class_strengths, curriculum, fbl_loss, full_strength_epoch
from methods.lws import METHOD as LWS
from harness.method import class_balanced_weights, grid_of
from methods.tau_norm import TauNormLinear
from methods.wb import METHOD as WB, MaxNorm, class_balanced_loss

STAGE2 = {"epochs": 1, "batch_size": 8, "lr": 0.5, "momentum": 0.9, "weight_decay": 0.1,
          "schedule": {"kind": "constant"}}


def test_tau_norm_logits_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5 and 2
    f = torch.tensor([[1.0, 1.0]])
    for tau, expected in ((0.0, [7.0, 2.0]), (1.0, [7 / 5, 2 / 2]), (1.9, [7 / 5 ** 1.9, 2 / 2 ** 1.9])):
        assert TauNormLinear(w, tau)(f).tolist()[0] == pytest.approx(expected)


def test_tau_grid_is_0_to_2_by_0_1():
    grid = grid_of({}, "tau", 0.0, 2.0, 0.1)
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 2.0 and grid[19] == 1.9


def test_class_balanced_weights_follow_cui_and_sum_to_c():
    counts = torch.tensor([500.0, 50.0, 5.0])
    w = class_balanced_weights(counts, 0.9999)
    raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in (500, 50, 5)]
    assert w.sum().item() == pytest.approx(3.0)
    assert w.tolist() == pytest.approx([r / sum(raw) * 3 for r in raw], rel=1e-5)


def test_class_balanced_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    weights = torch.tensor([0.5, 1.0, 1.5])
    p = logits.softmax(1)
    total = 0.0
    for i, y in enumerate(target.tolist()):
        for c in range(3):
            q = p[i, c].item()
            total += weights[y].item() * (-math.log(q) if c == y else -math.log(1 - q))
    assert class_balanced_loss(logits, target, weights).item() == pytest.approx(total / 6, rel=1e-6)


def test_fbl_loss_by_hand_and_equal_to_ce_at_epoch_0():
    counts = torch.tensor([100.0, 10.0, 1.0])
    s = class_strengths(counts)
    assert s.tolist() == pytest.approx([0.0, 0.5, 1.0])
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    feats = torch.tensor([[3.0, 4.0]])  # norm 5
    target = torch.tensor([1])
    assert fbl_loss(logits, feats, target, 0, s, 60.0, 190).item() == pytest.approx(
        F.cross_entropy(logits, target).item())
    c = (95 / 190) ** 2
    z = [1.0 - c * 60 * 0.0 / 5, 2.0 - c * 60 * 0.5 / 5, 0.5 - c * 60 * 1.0 / 5]
    expected = -z[1] + math.log(sum(math.exp(v) for v in z))
    assert fbl_loss(logits, feats, target, 95, s, 60.0, 190).item() == pytest.approx(expected, rel=1e-6)
    assert curriculum(95, 190) == pytest.approx(c)


def test_fbl_reaches_full_strength_at_the_official_t_minus_10_unless_the_recipe_says():
    assert full_strength_epoch({"epochs": 200}) == 190   # train.py: (epoch / (args.epochs - 10)) ** 2
    assert full_strength_epoch({"epochs": 8}) == 8
    assert full_strength_epoch({"epochs": 40, "full_strength_epoch": 38}) == 38


def test_fbl_at_full_strength_from_epoch_0_is_the_whole_offset_not_a_division_by_zero():
    logits, feats, target = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[3.0, 4.0]]), torch.tensor([1])
    s = torch.tensor([0.0, 0.5, 1.0])
    z = [1.0, 2.0 - 60 * 0.5 / 5, 0.5 - 60 * 1.0 / 5]
    expected = -z[1] + math.log(sum(math.exp(v) for v in z))
    for epoch in (0, 7):
        assert fbl_loss(logits, feats, target, epoch, s, 60.0, 0).item() == pytest.approx(expected, rel=1e-6)


def make_ctx(num_classes=3, n=24, recipe=None):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    counts = torch.bincount(y, minlength=num_classes).tolist()
    data = LTData("t", num_classes, list("abc"), x, y, x[:0], y[:0], x, y, counts)
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    model = fmnist_cnn(num_classes).to(memory_format=torch.channels_last)
    ctx = RunContext(data=dd, train_counts=counts, recipe=recipe or {"stage2": STAGE2}, seed=0)
    return model, dd, ctx


def body_params(model):
    return {k: v.clone() for k, v in model.body.named_parameters()}


def test_crt_changes_only_the_head():
    model, dd, ctx = make_ctx()
    before = body_params(model)
    old_head = model.fc
    spec = CRT.stage2(model, ctx)
    assert model.fc is not old_head  # re-initialised
    head_before = model.fc.weight.clone()
    train(model, dd, spec, seed=0)
    for k, v in model.body.named_parameters():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.fc.weight, head_before)
    assert ctx.extra["stage2_bn_mode"] == "train"


def test_lws_learns_only_the_scales():
    model, dd, ctx = make_ctx()
    before = body_params(model)
    w, b = model.fc.weight.clone(), model.fc.bias.clone()
    spec = LWS.stage2(model, ctx)
    train(model, dd, spec, seed=0)
    assert torch.equal(model.fc.linear.weight, w) and torch.equal(model.fc.linear.bias, b)
    assert not torch.equal(model.fc.scales.detach(), torch.ones(3))
    for k, v in model.body.named_parameters():
        assert torch.equal(v, before[k]), k
    f = torch.randn(2, model.feat_dim)
    assert torch.allclose(model.fc(f), model.fc.scales * (f @ w.t() + b))


def test_wb_stage2_caps_every_row_after_every_step_and_leaves_bias_alone():
    model, dd, ctx = make_ctx(recipe={"stage2": {**STAGE2, "lr": 5.0, "weight_decay": 0.0}, "beta": 0.9999,
                                      "maxnorm_thresh": 0.1})
    with torch.no_grad():
        model.fc.weight.mul_(torch.tensor([[1.0], [3.0], [10.0]]))  # spread the norms
    norms0 = model.fc.weight.norm(dim=1)
    spec = WB.stage2(model, ctx)
    cap = ctx.state["maxnorm"]
    assert cap.radius == pytest.approx((norms0.min() + 0.1 * (norms0.max() - norms0.min())).item())
    seen = []

    def after():
        bias = model.fc.bias.detach().clone()
        cap()
        assert torch.equal(model.fc.bias, bias)
        seen.append(model.fc.weight.norm(dim=1).max().item())

    spec.after_step = after
    train(model, dd, spec, seed=0)
    assert seen and max(seen) <= cap.radius + 1e-6
    WB.finalize(model, ctx)
    assert ctx.extra["maxnorm_active_steps"] >= 1 and ctx.extra["maxnorm_steps"] == len(seen)
    assert ctx.extra["maxnorm_active_steps"] <= ctx.extra["maxnorm_steps"]


def test_maxnorm_leaves_short_rows_unchanged():
    w = torch.nn.Parameter(torch.tensor([[0.1, 0.0], [3.0, 4.0], [1.0, 0.0]]))
    cap = MaxNorm(w, 0.1)  # radius 0.1 + 0.1 * 4.9 = 0.59
    cap()
    assert w[0].tolist() == pytest.approx([0.1, 0.0])
    assert w.norm(dim=1).tolist() == pytest.approx([0.1, 0.59, 0.59])
