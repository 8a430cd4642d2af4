import torch

from harness.models import build_model, resnet32


def test_resnet32_size_matches_ldam_drw():
    model = resnet32(100)
    n = sum(p.numel() for p in model.parameters())
    # by hand: stem 432 + 32, stage 1 23,360, stage 2 88,192, stage 3 351,488, fc 64*100 + 100
    assert n == 463_504 + 6_500
    assert round(n / 1e6, 2) == 0.47
    assert model.fc.in_features == 64 and model.fc.bias is not None


def test_resnet32_option_a_shortcut_subsamples_and_zero_pads():
    block = resnet32(10).body.layers[5]  # first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (2, 32, 4, 4)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0
    # option A adds no parameters to the shortcut
    assert sum(p.numel() for p in block.parameters()) == sum(
        p.numel() for m in (block.conv1, block.bn1, block.conv2, block.bn2) for p in m.parameters())


def test_backbones_give_features_and_logits():
    for name, shape, dim in (("resnet32", (2, 3, 32, 32), 64), ("resnet34-cifar", (2, 3, 32, 32), 512),
                             ("fmnist-cnn", (2, 1, 28, 28), 128)):
        model = build_model(name, 7, shape[1]).eval()
        x = torch.randn(shape)
        assert model.features(x).shape == (2, dim)
        assert model(x).shape == (2, 7)


def test_a_fresh_block_gets_pytorchs_default_init_and_nothing_else_moves():
    """MiSLAS's and FBL's Places block is a standalone Bottleneck: PyTorch's default init
    (kaiming-uniform a=√5 convolutions, BatchNorm 1/0 with fresh statistics)."""
    import math

    import pytest

    from harness import HarnessError
    from harness.models import reinitialise

    model = build_model("fmnist-cnn", 3, 1)
    with torch.no_grad():   # as if pretrained: nothing at its default
        for bn in (model.body[1], model.body[4]):
            bn.weight.fill_(5.0), bn.bias.fill_(2.0), bn.running_mean.fill_(3.0), bn.running_var.fill_(4.0)
            bn.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    reinitialise(model, ["body.3.", "body.4."])   # the middle stage's conv and BatchNorm
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"body.3.weight", "body.4.weight", "body.4.bias", "body.4.running_mean", "body.4.running_var",
                     "body.4.num_batches_tracked"}
    bn = model.body[4]
    assert bn.weight.eq(1).all() and bn.bias.eq(0).all() and bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()
    fan_in = 32 * 3 * 3
    assert after["body.3.weight"].abs().max() <= 1 / math.sqrt(fan_in)   # kaiming-uniform, a = √5
    with pytest.raises(HarnessError, match=r"fresh \['body.layer4.2.'\] names no module"):
        reinitialise(model, ["body.layer4.2."])
