"""The one training loop, with data resident on the device.

Images live as uint8 tensors on the device (pre-padded once for the crop);
each step gathers a batch, crops and flips it per sample with one indexed
gather, normalises it and runs the model. The host is read once per epoch
(the epoch's mean loss), never per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import HarnessError
from harness.data import LTData

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def cross_entropy(logits: torch.Tensor, feats: torch.Tensor, target: torch.Tensor, epoch: int) -> torch.Tensor:
    return F.cross_entropy(logits, target)


class TrainingDiverged(HarnessError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise HarnessError(f"unknown device '{name}'; use auto, cpu or cuda")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- data on the device

class DeviceData:
    """The run's tensors on the device plus the batched augmentation."""

    def __init__(self, data: LTData, mean, std, padding: int, flip: bool, device: torch.device):
        self.device = device
        self.num_classes = data.num_classes
        self.padding = padding
        self.flip = flip
        p = padding
        self.train_pad = F.pad(data.train_x, (p, p, p, p)).to(device)  # zero padding, as RandomCrop(padding)
        self.train_y = data.train_y.to(device)
        self.val_x, self.val_y = data.val_x.to(device), data.val_y.to(device)
        self.test_x, self.test_y = data.test_x.to(device), data.test_y.to(device)
        self.size = data.train_x.shape[-1]
        c = data.train_x.shape[1]
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        # (x/255 - mean)/std as one multiply-add
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.channel_idx = torch.arange(c, device=device).view(1, c, 1, 1)
        self.arange = torch.arange(self.size, device=device)
        self.train_counts = torch.bincount(self.train_y, minlength=self.num_classes)

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.float() * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last)

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop (zero padding) + horizontal flip per sample, done as one gather."""
        b, s, p = idx.shape[0], self.size, self.padding
        oy = torch.randint(0, 2 * p + 1, (b, 1), device=self.device, generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b, 1), device=self.device, generator=gen)
        rows = oy + self.arange
        cols = ox + self.arange
        if self.flip:
            flip = torch.rand((b, 1), device=self.device, generator=gen) < 0.5
            cols = torch.where(flip, ox + (s - 1 - self.arange), cols)
        x = self.train_pad[idx.view(b, 1, 1, 1), self.channel_idx,
                           rows.view(b, 1, s, 1), cols.view(b, 1, 1, s)]
        return self.normalise(x)


# ---------------------------------------------------------------- samplers

def instance_order(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=gen, device=device)


def class_aware_order(labels: np.ndarray, rng: np.random.RandomState, per_draw: int = 4,
                      num_samples: int | None = None) -> np.ndarray:
    """Decoupling's class-aware sampler: cycle through the classes in shuffled order
    (uniform class frequency), and for each class draw `per_draw` images from that
    class's own shuffled cycle. One epoch is max_c n_c * C samples, as in the
    official code. Returns the index sequence, groups of `per_draw` of one class."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    by_class = [np.where(labels == c)[0] for c in range(num_classes)]
    if num_samples is None:
        num_samples = max(len(ix) for ix in by_class) * num_classes
    n_draws = math.ceil(num_samples / per_draw)
    classes = np.concatenate([rng.permutation(num_classes) for _ in range(math.ceil(n_draws / num_classes))])[:n_draws]
    draws_per_class = np.bincount(classes, minlength=num_classes)
    streams = []
    for c, ix in enumerate(by_class):
        need = draws_per_class[c] * per_draw
        reps = math.ceil(need / len(ix)) if need else 0
        streams.append(np.concatenate([rng.permutation(ix) for _ in range(reps)])[:need] if reps else ix[:0])
    cursor = np.zeros(num_classes, dtype=np.int64)
    out = np.empty(n_draws * per_draw, dtype=np.int64)
    for d, c in enumerate(classes):
        out[d * per_draw:(d + 1) * per_draw] = streams[c][cursor[c]:cursor[c] + per_draw]
        cursor[c] += per_draw
    return out[:num_samples]


# ---------------------------------------------------------------- schedules

def lr_factor(schedule: dict, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for a 0-based epoch.

    warmup-step (LDAM-DRW): linear warm-up (e+1)/w over the first w epochs, then
    the factor of the last step whose epoch has been reached (factors are absolute,
    not cumulative). cosine: 0.5 (1 + cos(pi e / E)), stepped per epoch as
    torch's CosineAnnealingLR(T_max=E, eta_min=0).
    """
    kind = schedule.get("kind")
    if kind == "warmup-step":
        warm = schedule.get("warmup_epochs", 0)
        if epoch < warm:
            return (epoch + 1) / warm
        factor = 1.0
        for at, value in schedule.get("steps", []):
            if epoch >= at:
                factor = value
        return factor
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if kind == "constant":
        return 1.0
    raise HarnessError(f"unknown lr schedule '{kind}'; known: warmup-step, cosine, constant")


# ---------------------------------------------------------------- training

@dataclass
class TrainSpec:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: dict
    sampler: str = "instance"            # or "class_aware"
    loss: LossFn = cross_entropy
    params: list[nn.Parameter] | None = None  # None: every parameter of the model
    frozen_backbone: bool = False        # features computed without gradients
    bn_mode: str = "train"               # BatchNorm mode of a frozen backbone
    after_step: Callable[[], None] | None = None
    nesterov: bool = False

    @classmethod
    def from_recipe(cls, recipe: dict, **kw) -> "TrainSpec":
        keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "nesterov")
        return cls(**{k: recipe[k] for k in keys if k in recipe}, **kw)


@dataclass
class TrainLog:
    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0


def autocast_for(device: torch.device):
    # bf16 autocast on CUDA (BatchNorm stays fp32 under autocast); CPU runs fp32,
    # where bf16 measured slower on the 2-core machines.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def make_optimizer(params, spec: TrainSpec, device: torch.device) -> torch.optim.SGD:
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           nesterov=spec.nesterov, **extra)


def train(model, data: DeviceData, spec: TrainSpec, seed: int, progress=None) -> TrainLog:
    """Train `model` in place by `spec`. `progress(epoch, epochs, loss)` is called once per epoch."""
    device = data.device
    params = list(spec.params) if spec.params is not None else [p for p in model.parameters()]
    opt = make_optimizer(params, spec, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.RandomState(seed)
    labels_np = data.train_y.cpu().numpy() if spec.sampler == "class_aware" else None
    model.train()
    if spec.frozen_backbone and spec.bn_mode == "eval":
        model.body.eval()
    log = TrainLog()
    for epoch in range(spec.epochs):
        lr = spec.lr * lr_factor(spec.schedule, epoch, spec.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        if spec.sampler == "class_aware":
            order = torch.from_numpy(class_aware_order(labels_np, rng)).to(device)
        elif spec.sampler == "instance":
            order = instance_order(data.n_train, gen, device)
        else:
            raise HarnessError(f"unknown sampler '{spec.sampler}'; known: instance, class_aware")
        loss_sum = torch.zeros((), device=device)
        for start in range(0, order.shape[0], spec.batch_size):
            idx = order[start:start + spec.batch_size]
            x = data.train_batch(idx, gen)
            y = data.train_y[idx]
            with autocast_for(device):
                if spec.frozen_backbone:
                    with torch.no_grad():
                        feats = model.features(x)
                else:
                    feats = model.features(x)
                logits = model.fc(feats)
            loss = spec.loss(logits.float(), feats.float(), y, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if spec.after_step is not None:
                spec.after_step()
            loss_sum += loss.detach() * idx.shape[0]
            log.steps += 1
        epoch_loss = float(loss_sum) / order.shape[0]  # the one host read per epoch
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"loss became {epoch_loss} in epoch {epoch}")
        log.epoch_loss.append(epoch_loss)
        if progress is not None:
            progress(epoch, spec.epochs, epoch_loss)
    return log


@torch.no_grad()
def extract_features(model, data: DeviceData, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    model.eval()
    out = []
    with autocast_for(data.device):
        for start in range(0, x.shape[0], batch):
            out.append(model.features(data.normalise(x[start:start + batch])).float())
    return torch.cat(out) if out else torch.zeros(0, model.feat_dim, device=data.device)


@torch.no_grad()
def predict(model, data: DeviceData, x: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
    feats = extract_features(model, data, x)
    head = head if head is not None else model.fc
    return head(feats).argmax(1)
