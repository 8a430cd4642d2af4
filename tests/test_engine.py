import numpy as np
import pytest
import torch

from harness.config import scale_stage
from harness.data import LTData
from harness.engine import DeviceData, class_aware_order, lr_factor

LDAM = {"kind": "warmup-step", "warmup_epochs": 5, "steps": [[160, 0.01], [180, 0.0001]]}


def test_ldam_schedule():
    f = [lr_factor(LDAM, e, 200) for e in range(200)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert f[159] == 1.0 and f[160] == 0.01 and f[179] == 0.01 and f[180] == 0.0001 and f[199] == 0.0001


def test_cosine_schedule_matches_torch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for e in range(10):
        assert lr_factor({"kind": "cosine"}, e, 10) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_quick_preset_scales_the_schedule():
    stage = {"epochs": 200, "schedule": LDAM, "lr": 0.1}
    quick = scale_stage(stage, 20)
    assert quick["epochs"] == 20 and quick["paper_epochs"] == 200
    assert quick["schedule"]["warmup_epochs"] == 1
    assert quick["schedule"]["steps"] == [[16, 0.01], [18, 0.0001]]
    assert stage["schedule"]["steps"][0][0] == 160  # the paper recipe is not mutated


def tiny_data(n=12, size=6, channels=2):
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    y = torch.arange(n) % 3
    empty = torch.zeros(0, channels, size, size, dtype=torch.uint8)
    return LTData("t", 3, ["a", "b", "c"], x, y, empty, torch.zeros(0, dtype=torch.long), x, y, [4, 4, 4])


def test_train_batch_is_a_zero_padded_crop_or_its_mirror():
    data = tiny_data()
    dd = DeviceData(data, (0.5, 0.5), (0.2, 0.3), padding=2, flip=True, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(12)
    out = dd.train_batch(idx, gen)
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
    out = dd.train_batch(torch.arange(12), torch.Generator().manual_seed(1))
    ref = (data.train_x.float() / 255 - torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)) / torch.tensor([0.2, 0.3]).view(1, 2, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_class_aware_sampler_is_uniform_over_classes_in_groups_of_four():
    labels = np.repeat(np.arange(5), [200, 80, 30, 10, 2])
    rng = np.random.RandomState(0)
    order = class_aware_order(labels, rng)
    assert len(order) == 200 * 5  # one epoch = n_max * C, as the official sampler
    draws = labels[order].reshape(-1, 4)
    assert (draws == draws[:, :1]).all(), "each draw is 4 images of one class"
    freq = np.bincount(labels[order], minlength=5) / len(order)
    assert np.allclose(freq, 0.2, atol=0.01)
    # within a class, images cycle through a shuffled permutation: the rare class's 2
    # images each appear about equally often
    rare = order[labels[order] == 4]
    assert abs(np.sum(rare == np.where(labels == 4)[0][0]) - len(rare) / 2) <= 2
