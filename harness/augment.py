"""Batch transforms: per-step work on a training batch (mixup; AutoAugment and Cutout).

The randomness of a transform is drawn for a whole epoch up front, one row per sample,
on the device or from the trainer's numpy stream (both are in the resumable state); a
step only indexes those rows, so it runs inside a captured CUDA graph without host
reads. `apply` receives float images — 0-255 pixels for device-resident data, before
normalisation; normalised inputs for streamed data, where only transforms that commute
with normalisation (mixup) are allowed — and the target, and returns both.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class BatchTransform:
    name = ""
    pixels_only = False   # needs 0-255 pixels (not allowed on streamed, pre-normalised data)

    def draw(self, n: int, gen: torch.Generator, rng: np.random.RandomState, device) -> dict[str, torch.Tensor]:
        """Per-sample random values for an epoch of n samples (leading dimension n)."""
        return {}

    def apply(self, x: torch.Tensor, target, drawn: dict[str, torch.Tensor]):
        return x, target


class Mixup(BatchTransform):
    """mixup (Zhang et al., 2018) as MiSLAS's stage 1 draws it: one λ ~ Beta(α, α) per
    batch and a random pairing of the batch with itself; the target becomes
    (y, y of the partner, λ) and the loss is λ·L(y) + (1 − λ)·L(y_partner)."""

    name = "mixup"

    def __init__(self, alpha: float):
        self.alpha = float(alpha)

    def draw(self, n, gen, rng, device):
        # a λ per sample position; a batch uses the λ of its first sample (one per batch)
        lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, size=n).astype(np.float32)).to(device)
        keys = torch.rand((n,), device=device, generator=gen)  # argsort within a batch: its pairing
        return {"lam": lam, "keys": keys}

    def apply(self, x, target, drawn):
        lam = drawn["lam"][0]
        partner = drawn["keys"].argsort()
        mixed = lam * x + (1.0 - lam) * x.index_select(0, partner)
        return mixed, (target, target.index_select(0, partner), lam)


def mixed_loss(loss_fn):
    """A loss over mixup's (y_a, y_b, λ) target: λ·loss(y_a) + (1 − λ)·loss(y_b)."""
    def loss(logits, feats, target, epoch):
        y_a, y_b, lam = target
        return lam * loss_fn(logits, feats, y_a, epoch) + (1.0 - lam) * loss_fn(logits, feats, y_b, epoch)
    return loss


# ---------------------------------------------------------------- AutoAugment (CIFAR policy) and Cutout

def _linspace(lo, hi):
    return np.linspace(lo, hi, 10)


# DeepVoltaire's CIFAR10Policy, which BALMS uses: magnitude index -> value per operation
RANGES = {"shearX": _linspace(0, 0.3), "shearY": _linspace(0, 0.3), "translateX": _linspace(0, 150 / 331),
          "translateY": _linspace(0, 150 / 331), "rotate": _linspace(0, 30), "color": _linspace(0.0, 0.9),
          "posterize": np.round(_linspace(8, 4)).astype(int), "solarize": _linspace(256, 0),
          "contrast": _linspace(0.0, 0.9), "sharpness": _linspace(0.0, 0.9), "brightness": _linspace(0.0, 0.9),
          "autocontrast": [0] * 10, "equalize": [0] * 10, "invert": [0] * 10}
SIGNED = ("shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness")
CIFAR10_POLICY = [  # 25 sub-policies: (op, probability, magnitude index) twice
    (("invert", .1, 7), ("contrast", .2, 6)), (("rotate", .7, 2), ("translateX", .3, 9)),
    (("sharpness", .8, 1), ("sharpness", .9, 3)), (("shearY", .5, 8), ("translateY", .7, 9)),
    (("autocontrast", .5, 8), ("equalize", .9, 2)), (("shearY", .2, 7), ("posterize", .3, 7)),
    (("color", .4, 3), ("brightness", .6, 7)), (("sharpness", .3, 9), ("brightness", .7, 9)),
    (("equalize", .6, 5), ("equalize", .5, 1)), (("contrast", .6, 7), ("sharpness", .6, 5)),
    (("color", .7, 7), ("translateX", .5, 8)), (("equalize", .3, 7), ("autocontrast", .4, 8)),
    (("translateY", .4, 3), ("sharpness", .2, 6)), (("brightness", .9, 6), ("color", .2, 8)),
    (("solarize", .5, 2), ("invert", .0, 3)), (("equalize", .2, 0), ("autocontrast", .6, 0)),
    (("equalize", .2, 8), ("equalize", .6, 4)), (("color", .9, 9), ("equalize", .6, 6)),
    (("autocontrast", .8, 4), ("solarize", .2, 8)), (("brightness", .1, 3), ("color", .7, 0)),
    (("solarize", .4, 5), ("autocontrast", .9, 3)), (("translateY", .9, 9), ("translateY", .7, 9)),
    (("autocontrast", .9, 2), ("solarize", .8, 3)), (("equalize", .8, 8), ("invert", .1, 3)),
    (("translateY", .7, 9), ("autocontrast", .9, 1)),
]
OPS = tuple(RANGES)
FILL = 128.0  # DeepVoltaire's fillcolor for the geometric operations


class AutoAugment(BatchTransform):
    """AutoAugment's CIFAR-10 policy as DeepVoltaire's PIL code applies it (BALMS's data
    pipeline), one sub-policy drawn per sample, on a batch of 0-255 pixels on the device.

    Each sample draws one of the 25 sub-policies and applies its two operations in turn,
    each with its probability; signed magnitudes get a random sign; rotation has none.
    Geometric operations map output pixel centres through PIL's affine convention and
    fill with grey 128 (shear bicubic, translate and rotate nearest); every operation
    ends on whole 0-255 values, as PIL's uint8 images do. Differences from PIL that are
    not bit-exact: torch's bicubic kernel (a = -0.75 against PIL's -0.5) and rounding in
    the blends of colour, contrast, brightness and sharpness."""

    name = "autoaugment"
    pixels_only = True

    def __init__(self):
        table = [[(OPS.index(op), p, float(RANGES[op][m])) for op, p, m in sub] for sub in CIFAR10_POLICY]
        self.tables = {"op": torch.tensor([[t[0] for t in sub] for sub in table]),
                       "prob": torch.tensor([[t[1] for t in sub] for sub in table]),
                       "value": torch.tensor([[t[2] for t in sub] for sub in table]),
                       "signed": torch.tensor([op in SIGNED for op in OPS])}
        self.on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def device_tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The policy tables on `device`, copied once: a host-to-device copy inside a captured
        step would break the capture (the engine's warm-up steps fill this before it)."""
        if device not in self.on_device:
            self.on_device[device] = {k: v.to(device) for k, v in self.tables.items()}
        return self.on_device[device]

    def draw(self, n, gen, rng, device):
        return {"policy": torch.randint(0, len(CIFAR10_POLICY), (n,), device=device, generator=gen),
                "u": torch.rand((n, 2), device=device, generator=gen),
                "sign": torch.randint(0, 2, (n, 2), device=device, generator=gen).float() * 2 - 1}

    def apply(self, x, target, drawn):
        tables = self.device_tables(x.device)
        policy = drawn["policy"]
        op, prob, value = (tables[k][policy] for k in ("op", "prob", "value"))
        for slot in range(2):
            o = op[:, slot]
            active = drawn["u"][:, slot] < prob[:, slot]
            v = value[:, slot] * torch.where(tables["signed"][o], drawn["sign"][:, slot], 1.0)
            x = _apply_ops(x, o, active, v)
        return x, target


def _apply_ops(x, op, active, v):
    """Each sample's operation `op` at value `v` where `active`; every candidate is computed
    for the whole batch and picked per sample (fixed shapes: graph-capturable)."""
    sheared = _affine(x, op, v, bicubic=True)
    moved = _affine(x, op, v, bicubic=False)
    factor = 1.0 + v  # ImageEnhance's factor: 1 keeps the image
    candidates = {
        "shearX": lambda: sheared, "shearY": lambda: sheared,
        "translateX": lambda: moved, "translateY": lambda: moved, "rotate": lambda: moved,
        "color": lambda: _blend(_grey(x).expand_as(x), x, factor),
        "contrast": lambda: _blend(_mean_grey(x).expand_as(x), x, factor),
        "brightness": lambda: _blend(torch.zeros_like(x), x, factor),
        "sharpness": lambda: _blend(_smooth(x), x, factor),
        "posterize": lambda: _posterize(x, v),
        "solarize": lambda: torch.where(x >= v.view(-1, 1, 1, 1), 255.0 - x, x),
        "autocontrast": lambda: _autocontrast(x),
        "equalize": lambda: _equalize(x),
        "invert": lambda: 255.0 - x,
    }
    out = x
    for i, name in enumerate(OPS):
        out = torch.where(((op == i) & active).view(-1, 1, 1, 1), candidates[name](), out)
    return out


def _affine(x, op, v, bicubic: bool):
    """PIL's Image.transform(AFFINE) per sample: output pixel centre (x + .5, y + .5) reads the
    input at A·(x + .5, y + .5, 1); a point outside the image takes the fill colour."""
    b, _, h, w = x.shape
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    a_, b_, c_, d_, e_, f_ = one, zero, zero, zero, one, zero
    if bicubic:
        a_, b_, c_, d_, e_, f_ = (one, torch.where(op == OPS.index("shearX"), v, zero), zero,
                                  torch.where(op == OPS.index("shearY"), v, zero), one, zero)
    else:
        phi = torch.where(op == OPS.index("rotate"), -torch.deg2rad(v), zero)  # PIL rotates counter-clockwise
        cos, sin = phi.cos(), phi.sin()
        cx, cy = w / 2.0, h / 2.0
        tx = torch.where(op == OPS.index("translateX"), v * w, zero)
        ty = torch.where(op == OPS.index("translateY"), v * h, zero)
        a_, b_, d_, e_ = cos, sin, -sin, cos
        c_ = cx - cos * cx - sin * cy + tx
        f_ = cy + sin * cx - cos * cy + ty
    px = (torch.arange(w, device=x.device) + 0.5).view(1, 1, w)
    py = (torch.arange(h, device=x.device) + 0.5).view(1, h, 1)
    view = lambda t: t.view(b, 1, 1)  # noqa: E731
    xin = view(a_) * px + view(b_) * py + view(c_)
    yin = view(d_) * px + view(e_) * py + view(f_)
    grid = torch.stack([2 * xin / w - 1, 2 * yin / h - 1], dim=-1)
    sampled = F.grid_sample(x, grid, mode="bicubic" if bicubic else "nearest", padding_mode="border",
                            align_corners=False)
    inside = ((xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)).unsqueeze(1)
    return torch.where(inside, sampled, FILL).round().clamp(0, 255)


def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, image, factor), as ImageEnhance uses it; uint8 truncation."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255).floor()


def _grey(x):
    """PIL's convert("L"): (299 R + 587 G + 114 B) / 1000 in its fixed-point form."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1].long(), x[:, 1:2].long(), x[:, 2:3].long()
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) // 65536).float()


def _mean_grey(x):
    return (_grey(x).mean(dim=(2, 3), keepdim=True) + 0.5).floor()


def _smooth(x):
    """ImageFilter.SMOOTH (3x3: 1 1 1 / 1 5 1 / 1 1 1, / 13); border pixels stay as they are.
    The kernel is built on the device (no host copy inside a captured step)."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    smoothed = F.conv2d(x, (kernel / 13.0).expand(c, 1, 3, 3), padding=1, groups=c).round()
    border = torch.ones_like(x, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1] = False
    return torch.where(border, x, smoothed)


def _posterize(x, bits):
    step = torch.pow(2.0, 8 - bits).view(-1, 1, 1, 1)
    return torch.floor(x / step) * step


def _autocontrast(x):
    """ImageOps.autocontrast (cutoff 0), per channel: [lo, hi] stretched to [0, 255], truncated."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)  # tensor / tensor: Python's exact quotient
    out = (x.double() * scale - lo * scale).clamp(0, 255).floor().float()
    return torch.where(hi > lo, out, x)


def _equalize(x):
    """ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels at the top value) // 255; identity when step is 0 or the
    channel has a single value."""
    b, c = x.shape[:2]
    values = x.reshape(b, c, -1).long()
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, values, torch.ones_like(values))
    at_top = hist.gather(2, values.amax(dim=2, keepdim=True))
    step = (values.shape[-1] - at_top) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    keep = (step == 0) | ((hist > 0).sum(2, keepdim=True) <= 1)
    return torch.where(keep, values, lut.gather(2, values)).reshape(x.shape).float()


class Cutout(BatchTransform):
    """Cutout (DeVries & Taylor) as BALMS applies it after AutoAugment: one `length` x `length`
    hole per image, centred on a uniformly drawn pixel and clipped at the borders, set to 0
    before normalisation."""

    name = "cutout"
    pixels_only = True

    def __init__(self, length: int = 16):
        self.length = length

    def draw(self, n, gen, rng, device):
        return {"centre": torch.rand((n, 2), device=device, generator=gen)}

    def apply(self, x, target, drawn):
        b, _, h, w = x.shape
        cy = (drawn["centre"][:, 0] * h).floor().view(b, 1, 1)
        cx = (drawn["centre"][:, 1] * w).floor().view(b, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        half = self.length // 2
        hole = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
        return x.masked_fill(hole.unsqueeze(1), 0.0), target


def augmentation_transforms(augmentation: str) -> list[BatchTransform]:
    """The batch transforms a recipe's augmentation asks for beyond crop and flip (which
    the data apply), in the order BALMS's pipeline runs them."""
    tokens = augmentation.split("+")
    transforms: list[BatchTransform] = []
    if "autoaugment" in tokens:
        transforms.append(AutoAugment())
    if "cutout" in tokens:
        transforms.append(Cutout(16))
    return transforms
