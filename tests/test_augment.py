"""The device AutoAugment (CIFAR policy) against PIL, the library BALMS's pipeline runs it
with, operation by operation; Cutout's hole; both stay whole 0-255 pixels."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from harness.augment import OPS, AutoAugment, Cutout, _apply_ops

FILL = (128, 128, 128)


def pil_op(img: Image.Image, name: str, value: float) -> Image.Image:
    """DeepVoltaire's CIFAR10Policy operations (the random sign already in `value`)."""
    w, h = img.size
    if name == "shearX":
        return img.transform(img.size, Image.AFFINE, (1, value, 0, 0, 1, 0), Image.BICUBIC, fillcolor=FILL)
    if name == "shearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, value, 1, 0), Image.BICUBIC, fillcolor=FILL)
    if name == "translateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, value * w, 0, 1, 0), fillcolor=FILL)
    if name == "translateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, value * h), fillcolor=FILL)
    if name == "rotate":
        rot = img.convert("RGBA").rotate(value)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](img).enhance(1 + value)
    if name == "posterize":
        return ImageOps.posterize(img, int(value))
    if name == "solarize":
        return ImageOps.solarize(img, value)
    return {"autocontrast": ImageOps.autocontrast, "equalize": ImageOps.equalize, "invert": ImageOps.invert}[name](img)


CASES = [("shearX", 0.2), ("shearY", -0.267), ("translateX", -150 / 331), ("translateY", 0.15), ("rotate", 20.0),
         ("color", 0.7), ("contrast", -0.6), ("brightness", 0.9), ("sharpness", -0.5), ("posterize", 5),
         ("solarize", 113.8), ("autocontrast", 0), ("equalize", 0), ("invert", 0)]
EXACT = {"translateX", "translateY", "rotate", "posterize", "solarize", "autocontrast", "equalize", "invert"}


def images(n=4, seed=0):
    rng = np.random.RandomState(seed)
    base = rng.randint(40, 200, size=(n, 32, 32, 3))
    return np.clip(base + rng.randint(-40, 40, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name,value", CASES)
def test_each_operation_matches_pil(name, value):
    batch = images()
    expected = np.stack([np.asarray(pil_op(Image.fromarray(im), name, value)) for im in batch]).astype(np.float64)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    n = len(batch)
    out = _apply_ops(x, torch.full((n,), OPS.index(name)), torch.ones(n, dtype=torch.bool),
                     torch.full((n,), float(value)))
    ours = out.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, np.round(ours)) and ours.min() >= 0 and ours.max() <= 255  # whole pixels
    diff = np.abs(ours - expected)
    if name in EXACT:
        assert (diff > 0).mean() < 0.002, f"{name}: {(diff > 0).mean():.4f} of the pixels differ"
    elif name.startswith("shear"):  # torch's bicubic kernel (a = -0.75) against PIL's (a = -0.5)
        assert diff.mean() < 3.0, f"{name}: mean difference {diff.mean():.2f}"
    else:  # blend rounding: at most one level
        assert diff.max() <= 1, f"{name}: max difference {diff.max()}"


def test_inactive_samples_are_left_alone_and_the_policy_draws_per_sample():
    x = torch.from_numpy(images(8)).permute(0, 3, 1, 2).float()
    active = torch.tensor([True, False] * 4)
    out = _apply_ops(x, torch.full((8,), OPS.index("invert")), active, torch.zeros(8))
    assert torch.equal(out[1::2], x[1::2]) and torch.equal(out[0::2], 255 - x[0::2])
    aa = AutoAugment()
    drawn = aa.draw(64, torch.Generator().manual_seed(0), np.random.RandomState(0), torch.device("cpu"))
    assert len(set(drawn["policy"].tolist())) > 10  # sub-policies vary from sample to sample
    y = torch.zeros(64, dtype=torch.long)
    big = x.repeat(8, 1, 1, 1)
    out, target = aa.apply(big, y, drawn)
    assert out.shape == big.shape and target is y and not torch.equal(out, big)


def test_cutout_blanks_one_16_pixel_square_clipped_at_the_border():
    cut = Cutout(16)
    x = torch.full((2, 3, 32, 32), 200.0)
    drawn = {"centre": torch.tensor([[0.5, 0.5], [0.0, 31 / 32]])}  # centres (16, 16) and (0, 31)
    out, _ = cut.apply(x, None, drawn)
    assert (out[0] == 0).all(dim=0).sum() == 16 * 16
    assert (out[0, :, 8:24, 8:24] == 0).all()
    assert (out[1] == 0).all(dim=0).sum() == 8 * 9  # rows 0-7, columns 23-31
    assert (out[1, :, 0:8, 23:32] == 0).all()
