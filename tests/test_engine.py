import math

import numpy as np
import pytest
import torch

from harness import HarnessError
from harness.config import scale_stage
from harness.data import LTData
from harness.engine import DeviceData
from harness.samplers import ClassAwareSampler, epoch_samples
from harness.schedules import factors

LDAM = {"kind": "warmup-step", "warmup_epochs": 5, "steps": [[160, 0.01], [180, 0.0001]]}


def epoch_factor(schedule, epoch, epochs):
    """The factor an epoch trains at (these schedules hold it for the whole epoch)."""
    return float(factors(schedule, epoch, epochs, 1)[0])


def test_ldam_schedule_from_the_1_based_epoch():
    f = [epoch_factor(LDAM, e, 200) for e in range(200)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert f[159] == 1.0 and f[160] == 0.01 and f[179] == 0.01 and f[180] == 0.0001 and f[199] == 0.0001


def test_cosine_stepped_at_epoch_start_is_the_official_decoupling_sequence():
    """classifier-balancing and WB call scheduler.step() before each epoch: the lr an epoch
    trains at is CosineAnnealingLR's after e + 1 steps, and the last epoch trains at 0."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.0)
    official = []
    for _ in range(10):
        opt.step()
        sched.step()  # the official loops step first, then train the epoch
        official.append(opt.param_groups[0]["lr"])
    ours = [epoch_factor({"kind": "cosine", "step_at": "epoch-start"}, e, 10) for e in range(10)]
    assert ours == pytest.approx(official, abs=1e-12)
    assert ours[-1] == pytest.approx(0.0, abs=1e-12) and ours[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


def test_cosine_stepped_at_epoch_end_starts_at_the_full_rate():
    """MiSLAS computes ½(1 + cos(π e / E)) from the 0-based epoch: CosineAnnealingLR stepped after."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for e in range(10):
        ours = epoch_factor({"kind": "cosine", "step_at": "epoch-end"}, e, 10)
        assert ours == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_a_cosine_without_its_stepping_is_refused():
    from harness.schedules import check
    with pytest.raises(HarnessError, match="step_at: epoch-start or epoch-end"):
        check({"kind": "cosine"})


def test_balms_warmup_cosine_sequence():
    """BALMS on CIFAR-10-LT rho 100 at batch 512: 520 epochs, warm-up 32, lr 0.05 -> 0.1 -> 0
    (values by 1-based epoch read off its CosineAnnealingLRWarmup)."""
    sched = {"kind": "warmup-cosine", "warmup_epochs": 32, "warmup_from": 0.5}
    lr = {e + 1: 0.1 * epoch_factor(sched, e, 520) for e in range(520)}
    expected = {1: 0.05, 2: 0.051613, 5: 0.056452, 31: 0.098387, 32: 0.1, 33: 0.099999, 100: 0.095285,
                276: 0.05, 519: 1e-6, 520: 0.0}
    assert {e: round(lr[e], 6) for e in expected} == pytest.approx(expected, abs=1e-6)


def test_cui_warmup_rises_per_step_from_zero():
    """Cui et al.: lr = base * (global_step * B / N) / 5 during the first 5 epochs."""
    sched = {"kind": "warmup-step", "warmup_epochs": 5, "warmup_per": "step", "steps": [[160, 0.01]]}
    n, batch = 1000, 128
    steps = math.ceil(n / batch)
    first = factors(sched, 0, 200, steps, batch, n)
    assert first[0] == 0.0 and first[1] == pytest.approx(batch / (n * 5))
    assert factors(sched, 4, 200, steps, batch, n)[-1] == pytest.approx((4 * steps + steps - 1) * batch / (n * 5))
    assert (factors(sched, 5, 200, steps, batch, n) == 1.0).all()
    assert (factors(sched, 160, 200, steps, batch, n) == 0.01).all()


def test_quick_preset_scales_the_schedule():
    stage = {"epochs": 200, "schedule": LDAM, "lr": 0.1, "drw_epoch": 160}
    quick = scale_stage(stage, 20)
    assert quick["epochs"] == 20 and quick["paper_epochs"] == 200
    assert quick["schedule"]["warmup_epochs"] == 1
    assert quick["schedule"]["steps"] == [[16, 0.01], [18, 0.0001]]
    assert quick["drw_epoch"] == 16  # DRW's start scales with the budget
    assert stage["schedule"]["steps"][0][0] == 160  # the paper recipe is not mutated


def test_an_epoch_0_the_recipe_names_stays_at_the_start_when_a_preset_scales_it():
    """DRW from epoch 0 is re-weighting from the start; scaled, it must not start one epoch late."""
    stage = {"epochs": 200, "lr": 0.1, "drw_epoch": 0, "schedule": {"kind": "step", "steps": [[0, 0.5], [160, 0.01]]}}
    quick = scale_stage(stage, 20)
    assert quick["drw_epoch"] == 0 and quick["schedule"]["steps"] == [[0, 0.5], [16, 0.01]]


# ---------------------------------------------------------------- class-aware sampling

def test_class_aware_epoch_is_n_train_over_batch_steps():
    """classifier-balancing ends an epoch after int(N / batch) steps; MiSLAS after ceil(N / batch) + 1."""
    assert epoch_samples("floor", 12406, 128, "class_aware") == 96 * 128     # CIFAR-10-LT rho 100
    assert epoch_samples("floor", 10847, 128, "class_aware") == 84 * 128     # CIFAR-100-LT rho 100
    assert epoch_samples("floor", 115846, 512, "class_aware") == 226 * 512   # ImageNet-LT
    assert epoch_samples("ceil+1", 12406, 128, "class_aware") == 98 * 128    # MiSLAS, CIFAR-10-LT
    assert epoch_samples("ceil+1", 10847, 128, "class_aware") == 86 * 128
    assert epoch_samples("all", 12406, 128, "instance") == 12406
    with pytest.raises(HarnessError, match="does not fit"):
        epoch_samples("ceil+1", 100, 10, "instance")


def test_class_aware_sampler_is_uniform_over_classes_in_groups_of_four():
    labels = np.repeat(np.arange(5), [200, 80, 30, 10, 2])
    sampler = ClassAwareSampler(labels, 4, np.random.RandomState(0), shuffle_batch=False)
    order = sampler.draw(4000, 40)
    draws = labels[order].reshape(-1, 4)
    assert (draws == draws[:, :1]).all(), "each draw is 4 images of one class"
    assert np.allclose(np.bincount(labels[order], minlength=5) / len(order), 0.2, atol=0.01)
    # within a class, images cycle through shuffled passes: the rare class's 2 images alternate per pass
    rare = order[labels[order] == 4].reshape(-1, 2)
    assert all(sorted(pair) == list(np.flatnonzero(labels == 4)) for pair in rare)


def test_class_cycles_carry_on_from_one_epoch_to_the_next():
    """Two epochs drawn from one sampler are one endless stream: each pass of the class cycle
    visits every class, and each pass of a class's cycle every image, across the epoch
    boundary too (an epoch of 10 draws ends in the middle of the second class pass)."""
    labels = np.repeat(np.arange(6), [50, 30, 20, 10, 5, 3])
    sampler = ClassAwareSampler(labels, 4, np.random.RandomState(1), shuffle_batch=False)
    both = np.concatenate([sampler.draw(40, 20), sampler.draw(40, 20)])
    classes = labels[both].reshape(-1, 4)[:, 0]
    for p in range(3):
        assert sorted(classes[6 * p:6 * p + 6]) == list(range(6)), "a pass of the class cycle visits every class"
    rare = both[labels[both] == 5]
    for p in range(len(rare) // 3):
        assert sorted(rare[3 * p:3 * p + 3]) == list(np.flatnonzero(labels == 5)), "a pass visits every image"


def test_shuffle_batch_permutes_within_batches_only():
    labels = np.repeat(np.arange(4), [40, 20, 10, 5])
    plain = ClassAwareSampler(labels, 4, np.random.RandomState(3), shuffle_batch=False).draw(64, 16)
    shuffled = ClassAwareSampler(labels, 4, np.random.RandomState(3), shuffle_batch=True).draw(64, 16)
    assert not np.array_equal(plain, shuffled)
    for a, b in zip(plain.reshape(-1, 16), shuffled.reshape(-1, 16)):
        assert sorted(a) == sorted(b)


def tiny_data(n=12, size=6, channels=2):
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    y = torch.arange(n) % 3
    empty = torch.zeros(0, channels, size, size, dtype=torch.uint8)
    return LTData("t", 3, ["a", "b", "c"], x, y, empty, torch.zeros(0, dtype=torch.long), x, y, [4, 4, 4])


def augmented(dd, idx, gen):
    """A training batch as a step makes it: drawn crop and flip, the gather, normalisation."""
    drawn = dd.draw_augment(idx.shape[0], gen)
    return dd.normalise(dd.crop_flip(idx, drawn["oy"], drawn["ox"], drawn["flip"]))


def test_train_batch_is_a_zero_padded_crop_or_its_mirror():
    data = tiny_data()
    dd = DeviceData(data, (0.5, 0.5), (0.2, 0.3), padding=2, flip=True, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(12)
    out = augmented(dd, idx, gen)
    padded = torch.nn.functional.pad(data.train_x, (2, 2, 2, 2))
    flips = 0
    for i in range(12):
        found = None
        for oy in range(5):
            for ox in range(5):
                crop = dd.normalise(padded[i:i + 1, :, oy:oy + 6, ox:ox + 6])
                if torch.allclose(out[i:i + 1], crop):
                    found = "plain"
                elif torch.allclose(out[i:i + 1], crop.flip(-1)):
                    found = "flip"
        assert found is not None, f"sample {i} is no crop of its padded image"
        flips += found == "flip"
    assert 0 < flips < 12  # both branches occur at this seed
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_no_padding_no_flip_is_plain_normalisation():
    data = tiny_data()
    dd = DeviceData(data, (0.5, 0.5), (0.2, 0.3), padding=0, flip=False, device=torch.device("cpu"))
    out = augmented(dd, torch.arange(12), torch.Generator().manual_seed(1))
    ref = (data.train_x.float() / 255 - torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)) / torch.tensor([0.2, 0.3]).view(1, 2, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)


def small_setup(seed=0):
    from harness.models import fmnist_cnn
    torch.manual_seed(seed)
    x = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(50) % 3
    data = LTData("t", 3, list("abc"), x, y, x[:0], y[:0], x, y, [17, 17, 16])
    return data, fmnist_cnn(3).to(memory_format=torch.channels_last)


def spec_for(**kw):
    from harness.engine import TrainSpec
    base = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4,
                schedule={"kind": "cosine", "step_at": "epoch-start"})
    return TrainSpec(**{**base, **kw})


def test_trainers_interleaved_equal_trainers_alone():
    from harness.engine import Trainer, fit_many, train
    data, _ = small_setup()
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    models_alone = [small_setup(s)[1] for s in (0, 1)]
    models_together = [small_setup(s)[1] for s in (0, 1)]
    logs_alone = [train(m, dd, spec_for(), seed=s) for s, m in zip((3, 4), models_alone)]
    logs_together = fit_many([Trainer(m, dd, spec_for(), seed=s) for s, m in zip((3, 4), models_together)])
    for a, b in zip(models_alone, models_together):
        for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), k
    assert [l.epoch_loss for l in logs_alone] == [l.epoch_loss for l in logs_together]
    assert logs_alone[0].steps == 2 * 4  # 50 samples at batch 16: 3 full + 1 partial per epoch


def test_nan_loss_stops_training_with_the_epoch():
    from harness.engine import TrainingDiverged, train
    data, model = small_setup()
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    bad = spec_for(loss=lambda logits, feats, y, epoch: logits.sum() * float("nan"))
    with pytest.raises(TrainingDiverged, match="epoch 0"):
        train(model, dd, bad, seed=0)


def test_train_mode_only_keeps_every_other_module_in_eval_mode():
    """A fresh block on a frozen trunk (MiSLAS, FBL on Places): only the named modules run in
    train mode; the trunk's BatchNorm statistics do not move."""
    from harness.engine import train
    data, model = small_setup()
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for name, p in model.named_parameters() if name.startswith(("body.3.", "body.4.", "fc."))]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    train(model, dd, spec_for(params=params, train_mode_only=["body.4."]), seed=0)
    after = model.state_dict()
    for bn in ("body.1", "body.7"):   # the trunk's BatchNorm: statistics as they were
        assert torch.equal(before[f"{bn}.running_mean"], after[f"{bn}.running_mean"])
        assert torch.equal(before[f"{bn}.num_batches_tracked"], after[f"{bn}.num_batches_tracked"])
    assert not torch.equal(before["body.4.running_mean"], after["body.4.running_mean"])
    assert not torch.equal(before["body.3.weight"], after["body.3.weight"])
    assert torch.equal(before["body.0.weight"], after["body.0.weight"])


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_bn_mode_of_a_frozen_backbone_decides_whether_its_statistics_move(bn_mode):
    """Stage 2 on a frozen backbone: `eval` keeps its BatchNorm statistics (MiSLAS without
    shift_bn), `train` re-estimates them (the decoupling codes); the head trains either way."""
    from harness.engine import train
    data, model = small_setup()
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, dd, spec_for(params=list(model.fc.parameters()), frozen_backbone=True, bn_mode=bn_mode), seed=0)
    after = model.state_dict()
    assert torch.equal(before["body.0.weight"], after["body.0.weight"]) and \
        not torch.equal(before["fc.weight"], after["fc.weight"])
    for bn in ("body.1", "body.4", "body.7"):
        assert torch.equal(before[f"{bn}.running_mean"], after[f"{bn}.running_mean"]) == (bn_mode == "eval"), bn


@pytest.mark.parametrize("kw,message", [
    ({"train_mode_only": ["body.40."]}, r"train_mode_only \['body.40.'\] names no module of the model"),
    ({"frozen_backbone": True, "bn_mode": "evaluate"}, "bn_mode must be train or eval, got 'evaluate'"),
])
def test_a_mode_setting_that_would_do_nothing_is_refused_before_training(kw, message):
    from harness.engine import Trainer
    data, model = small_setup()
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    with pytest.raises(HarnessError, match=message):
        Trainer(model, dd, spec_for(**kw), seed=0)
