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


def small_setup(seed=0):
    from harness.models import fmnist_cnn
    torch.manual_seed(seed)
    x = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(50) % 3
    data = LTData("t", 3, list("abc"), x, y, x[:0], y[:0], x, y, [17, 17, 16])
    return data, fmnist_cnn(3).to(memory_format=torch.channels_last)


def spec_for(**kw):
    from harness.engine import TrainSpec
    base = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule={"kind": "cosine"})
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_matches_eager(monkeypatch):
    from harness.engine import train
    data, _ = small_setup()
    dev = torch.device("cuda")
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, dev)
    results = {}
    for mode in ("graph", "eager"):
        if mode == "eager":
            monkeypatch.setenv("HARNESS_NO_CUDA_GRAPHS", "1")
        model = small_setup(0)[1].to(dev)
        log = train(model, dd, spec_for(), seed=3)
        results[mode] = (log, torch.cat([p.detach().flatten().float() for p in model.parameters()]))
    assert results["graph"][0].graph == "cuda-graph" and results["eager"][0].graph == "eager"
    g, e = results["graph"][1], results["eager"][1]
    assert torch.linalg.norm(g - e) / torch.linalg.norm(e) < 2e-2  # bf16 autocast noise only
    assert np.allclose(results["graph"][0].epoch_loss, results["eager"][0].epoch_loss, rtol=2e-2)
