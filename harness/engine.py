"""The one training loop, with data resident on the device.

Images live as uint8 tensors on the device (pre-padded once for the crop);
each step gathers a batch, crops and flips it per sample with one indexed
gather, normalises it and runs the model. The host is read once per epoch
(the epoch's mean loss), never per step.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import HarnessError
from harness.checkpoints import load_epoch_checkpoint, save_epoch_checkpoint
from harness.data import LTData
from harness.distributed import all_reduce_sum, is_main, shard_positions, world

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def cross_entropy(logits: torch.Tensor, feats: torch.Tensor, target: torch.Tensor, epoch) -> torch.Tensor:
    return F.cross_entropy(logits, target)


class TrainingDiverged(HarnessError):
    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


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

    def draw_augment(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets and flips for n samples (RandomCrop(padding) + RandomHorizontalFlip)."""
        p = self.padding
        oy = torch.randint(0, 2 * p + 1, (n,), device=self.device, generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), device=self.device, generator=gen)
        flip = torch.rand((n,), device=self.device, generator=gen) < 0.5
        return oy, ox, flip & self.flip

    def augment(self, idx, oy, ox, flip) -> torch.Tensor:
        """Crop (zero padding) + horizontal flip per sample, done as one gather."""
        b, s = idx.shape[0], self.size
        rows = oy.view(b, 1) + self.arange
        cols = torch.where(flip.view(b, 1), ox.view(b, 1) + (s - 1 - self.arange), ox.view(b, 1) + self.arange)
        x = self.train_pad[idx.view(b, 1, 1, 1), self.channel_idx, rows.view(b, 1, s, 1), cols.view(b, 1, 1, s)]
        return self.normalise(x)

    def train_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.augment(idx, *self.draw_augment(idx.shape[0], gen))

    def labels(self, split: str) -> torch.Tensor:
        return {"val": self.val_y, "test": self.test_y}[split]

    def eval_batches(self, split: str, batch: int = 1024):
        """Normalised, un-augmented images of `split` ("val" or "test"), in order."""
        x = {"val": self.val_x, "test": self.test_x}[split]
        for start in range(0, x.shape[0], batch):
            yield self.normalise(x[start:start + batch])


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
    loss: LossFn = cross_entropy         # (logits, feats, target, epoch as a 0-dim device tensor)
    params: list[nn.Parameter] | None = None  # None: every parameter of the model
    frozen_backbone: bool = False        # features computed without gradients
    bn_mode: str = "train"               # BatchNorm mode of a frozen backbone
    after_step: Callable[[], None] | None = None  # tensor ops only (it is captured in the CUDA graph)
    nesterov: bool = False
    cuda_graphs: bool = True             # capture the step on CUDA; eager elsewhere

    @classmethod
    def from_recipe(cls, recipe: dict, **kw) -> "TrainSpec":
        keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "nesterov")
        return cls(**{k: recipe[k] for k in keys if k in recipe}, **kw)


@dataclass
class TrainLog:
    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    graph: str = "eager"                 # "cuda-graph" or "eager (<reason>)"
    resumed_from: int | None = None      # the epoch an interrupted training resumed at


def autocast_for(device: torch.device):
    # bf16 autocast on CUDA (BatchNorm stays fp32 under autocast); CPU runs fp32,
    # where bf16 measured slower on the 2-core machines.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def make_optimizer(params, spec: TrainSpec, device: torch.device, lr=None) -> torch.optim.SGD:
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=spec.lr if lr is None else lr, momentum=spec.momentum,
                           weight_decay=spec.weight_decay, nesterov=spec.nesterov, **extra)


def graphs_wanted(spec: TrainSpec, device: torch.device) -> bool:
    return device.type == "cuda" and spec.cuda_graphs and not os.environ.get("HARNESS_NO_CUDA_GRAPHS")


class Trainer:
    """Trains one model by one spec, epoch by epoch.

    Each epoch draws its sample order and its augmentation (crop offsets, flips) up
    front on the device; a step only indexes them. On CUDA the full-batch step is
    captured once as a CUDA graph that reads the epoch's buffers at a device-side
    step counter, so an epoch is one `replay()` per step and one host read at the
    end; the learning rate and the epoch number live in device tensors. The last,
    smaller batch runs eagerly. The math is the same on every path.
    """

    def __init__(self, model, data: DeviceData, spec: TrainSpec, seed: int):
        self.model, self.data, self.spec = model, data, spec
        self.device = data.device
        self.params = list(spec.params) if spec.params is not None else list(model.parameters())
        # streamed data (files decoded by a DataLoader) arrive in fresh host batches: eager steps
        self.streamed = getattr(data, "streamed", False)
        self.distributed = world()[1] > 1
        self.use_graph = graphs_wanted(spec, self.device) and not (self.streamed or self.distributed)
        self.batch = spec.batch_size  # this process's share of a global batch under torchrun
        self.forward = _Forward(model, spec.frozen_backbone)
        if self.distributed:  # gradients averaged over the processes by DistributedDataParallel
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.forward, find_unused_parameters=spec.params is not None or spec.frozen_backbone)
        self.lr_t = torch.tensor(spec.lr, device=self.device) if self.use_graph else None
        self.opt = make_optimizer(self.params, spec, self.device, self.lr_t)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.rng = np.random.RandomState(seed)
        self.labels_np = data.train_y.cpu().numpy() if spec.sampler == "class_aware" else None
        if spec.sampler not in ("instance", "class_aware"):
            raise HarnessError(f"unknown sampler '{spec.sampler}'; known: instance, class_aware")
        self.epoch_t = torch.zeros((), device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.step_t = torch.zeros((), dtype=torch.long, device=self.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.graph = None
        self.log = TrainLog()
        self.epoch = 0

    # -- one step, tensor ops only ------------------------------------------------
    def _step(self, idx, oy, ox, flip, zero_grad: bool = True) -> None:
        self._update(self.data.augment(idx, oy, ox, flip), self.data.train_y[idx], zero_grad)

    def _update(self, x, y, zero_grad: bool = True) -> None:
        spec = self.spec
        with autocast_for(self.device):
            logits, feats = self.forward(x)
        loss = spec.loss(logits.float(), feats.float(), y, self.epoch_t)
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if spec.after_step is not None:
            spec.after_step()
        self.loss_sum += loss.detach() * y.shape[0]

    def _graph_step(self) -> None:
        i = self.step_t.view(1)  # a device-side index: no host sync inside the graph
        pick = lambda buf: buf.index_select(0, i).squeeze(0)  # noqa: E731
        self._step(pick(self.ep_idx), pick(self.ep_oy), pick(self.ep_ox), pick(self.ep_flip), zero_grad=False)
        self.step_t += 1

    def _capture(self, steps: int) -> None:
        """Warm up on a side stream, restore every state the warm-up touched, capture."""
        b = self.spec.batch_size
        self.ep_idx = torch.zeros((steps, b), dtype=torch.long, device=self.device)
        self.ep_oy = torch.zeros((steps, b), dtype=torch.long, device=self.device)
        self.ep_ox = torch.zeros((steps, b), dtype=torch.long, device=self.device)
        self.ep_flip = torch.zeros((steps, b), dtype=torch.bool, device=self.device)
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_momentum = {id(p): st["momentum_buffer"].clone() for p, st in self.opt.state.items()
                          if st.get("momentum_buffer") is not None}
        hook_state = self._hook_state()
        hook_saved = [t.clone() for t in hook_state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step_t.zero_()
                self._step(self.ep_idx[0], self.ep_oy[0], self.ep_ox[0], self.ep_flip[0])
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(saved[k])
            for p, state in self.opt.state.items():
                if state.get("momentum_buffer") is None:
                    continue
                if id(p) in saved_momentum:  # a resumed run's momentum
                    state["momentum_buffer"].copy_(saved_momentum[id(p)])
                else:  # a zero momentum buffer gives exactly SGD's first step (buf = grad)
                    state["momentum_buffer"].zero_()
            for t, s in zip(hook_state, hook_saved):
                t.copy_(s)
        self.opt.zero_grad(set_to_none=True)
        self.step_t.zero_()
        self.loss_sum.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_step()
        self.graph = graph

    # -- epochs ---------------------------------------------------------------------
    def _draw(self) -> tuple[torch.Tensor, ...]:
        if self.spec.sampler == "class_aware":
            order = torch.from_numpy(class_aware_order(self.labels_np, self.rng)).to(self.device)
        else:
            order = instance_order(self.data.n_train, self.gen, self.device)
        # every process draws the same global epoch, then keeps its share of each batch
        positions, self.batch = shard_positions(order.shape[0], self.spec.batch_size, self.device)
        if self.streamed:  # the loader's workers draw the augmentation, seeded from this generator
            seed = int(torch.randint(0, 2**62, (1,), device=self.device, generator=self.gen))
            self.batches = iter(self.data.train_batches(order[positions].cpu(), self.batch, seed))
            return order[positions], None, None, None
        drawn = (order, *self.data.draw_augment(order.shape[0], self.gen))
        return tuple(t[positions] for t in drawn) if self.distributed else drawn

    def begin_epoch(self) -> None:
        spec, epoch = self.spec, self.epoch
        lr = spec.lr * lr_factor(spec.schedule, epoch, spec.epochs)
        if self.lr_t is not None:
            self.lr_t.fill_(lr)
        else:
            for group in self.opt.param_groups:
                group["lr"] = lr
        self.epoch_t.fill_(float(epoch))
        self.loss_sum.zero_()
        self.order, self.oy, self.ox, self.flip = self._draw()
        n, b = self.order.shape[0], self.batch
        self.full_steps, self.n = n // b, n
        self.cursor = 0
        if self.use_graph and self.full_steps > 0:
            if self.graph is None or self.ep_idx.shape[0] < self.full_steps:
                try:
                    self._capture(self.full_steps)
                    self.log.graph = "cuda-graph"
                except Exception as exc:  # capture can fail on exotic ops: train eagerly instead
                    warnings.warn(f"CUDA graph capture failed, training eagerly: {type(exc).__name__}: {exc}")
                    self.use_graph, self.graph = False, None
                    self.log.graph = f"eager ({type(exc).__name__} during capture)"
                    return self.begin_epoch()
            m = self.full_steps * b
            self.ep_idx[:self.full_steps].copy_(self.order[:m].view(-1, b))
            self.ep_oy[:self.full_steps].copy_(self.oy[:m].view(-1, b))
            self.ep_ox[:self.full_steps].copy_(self.ox[:m].view(-1, b))
            self.ep_flip[:self.full_steps].copy_(self.flip[:m].view(-1, b))
            self.step_t.zero_()

    def steps_in_epoch(self) -> int:
        return -(-self.n // self.batch)

    def step(self) -> None:
        """The next step of the current epoch."""
        b, start = self.batch, self.cursor
        if self.streamed:
            self._update(*next(self.batches))
        elif self.graph is not None and start // b < self.full_steps:
            self.graph.replay()
        else:
            sl = slice(start, start + b)
            self._step(self.order[sl], self.oy[sl], self.ox[sl], self.flip[sl])
        self.cursor += b
        self.log.steps += 1

    def end_epoch(self) -> float:
        total = all_reduce_sum(torch.stack([self.loss_sum, torch.tensor(float(self.n), device=self.device)]))
        loss = float(total[0]) / float(total[1])  # the one host read per epoch
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} in epoch {self.epoch}", self.epoch)
        self.log.epoch_loss.append(loss)
        self.epoch += 1
        return loss

    # -- resumable state ----------------------------------------------------------------
    def _hook_state(self) -> list[torch.Tensor]:
        """The tensors the after-step hook mutates (WB's MaxNorm counters), if any."""
        return getattr(self.spec.after_step, "state_tensors", lambda: [])()

    def state_dict(self) -> dict:
        """Everything the next epoch depends on, at an epoch boundary: weights, BatchNorm
        statistics, momentum, both random streams and the hook's counters. Plain tensors
        and lists only, so it loads with torch.load(weights_only=True)."""
        kind, keys, pos, has_gauss, gauss = self.rng.get_state()
        hook_state = self._hook_state()
        return {"epoch": self.epoch, "epoch_loss": list(self.log.epoch_loss), "steps": self.log.steps,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(),
                "numpy_rng": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                "hook": [t.detach().clone() for t in hook_state]}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.lr_t is not None:  # the captured graph reads the lr from this very tensor
            for group in self.opt.param_groups:
                group["lr"] = self.lr_t
        self.gen.set_state(state["generator"])
        keys, pos, has_gauss, gauss = state["numpy_rng"]
        self.rng.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        for t, saved in zip(self._hook_state(), state["hook"]):
            t.copy_(saved)
        self.epoch = int(state["epoch"])
        self.log.epoch_loss = list(state["epoch_loss"])
        self.log.steps = int(state["steps"])

    def mode(self) -> None:
        self.model.train()
        if self.spec.frozen_backbone and self.spec.bn_mode == "eval":
            self.model.body.eval()

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


class _Forward(nn.Module):
    """logits and features of a Classifier in one call (the unit DDP wraps); the
    features of a frozen backbone are computed without gradients."""

    def __init__(self, model, frozen_backbone: bool):
        super().__init__()
        self.model, self.frozen = model, frozen_backbone

    def forward(self, x):
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            feats = self.model.features(x)
        return self.model.fc(feats), feats


def fit_many(trainers: list[Trainer], progress=None, checkpoints: list | None = None) -> list[TrainLog]:
    """Train several models together, interleaved step by step; on CUDA each trainer
    issues its work on its own stream, so independent runs overlap on one GPU.
    Every trainer's math is exactly what it would be alone.

    `checkpoints`, one path (or None) per trainer: each trainer first resumes from
    the last good epoch checkpoint there, and writes one after every epoch."""
    if not trainers:
        return []
    epochs = trainers[0].spec.epochs
    if any(t.spec.epochs != epochs for t in trainers):
        raise HarnessError("trainers trained together must have the same number of epochs")
    paths = checkpoints or [None] * len(trainers)
    for t, path in zip(trainers, paths):
        if path is not None:
            state = load_epoch_checkpoint(path)
            if state is not None:
                t.load_state_dict(state)
                t.log.resumed_from = t.epoch
        t.mode()
        if t.stream is not None:
            t.stream.wait_stream(torch.cuda.current_stream(t.device))
    # trainers resumed at different epochs: the ones behind catch up first
    for epoch in range(min(t.epoch for t in trainers), epochs):
        active = [(t, p) for t, p in zip(trainers, paths) if t.epoch == epoch]
        for t, _ in active:
            with t.on_stream():
                t.begin_epoch()
        for i in range(max(t.steps_in_epoch() for t, _ in active)):
            for t, _ in active:
                if i < t.steps_in_epoch():
                    with t.on_stream():
                        t.step()
        losses = []
        for t, path in active:
            with t.on_stream():
                losses.append(t.end_epoch())
                if path is not None and is_main():
                    save_epoch_checkpoint(path, t.state_dict())
        if progress is not None:
            progress(epoch, epochs, float(np.mean(losses)))
    for t in trainers:
        if t.stream is not None:
            torch.cuda.current_stream(t.device).wait_stream(t.stream)
    return [t.log for t in trainers]


def train(model, data: DeviceData, spec: TrainSpec, seed: int, progress=None, checkpoint=None) -> TrainLog:
    """Train `model` in place by `spec`. `progress(epoch, epochs, loss)` is called once per epoch."""
    return fit_many([Trainer(model, data, spec, seed)], progress, [checkpoint])[0]


@torch.no_grad()
def extract_features(model, data: DeviceData, split: str) -> torch.Tensor:
    """Features of every image of `split` ("val" or "test"), in order, in eval mode."""
    model.eval()
    out = []
    with autocast_for(data.device):
        for x in data.eval_batches(split):
            out.append(model.features(x).float())
    return torch.cat(out) if out else torch.zeros(0, model.feat_dim, device=data.device)


@torch.no_grad()
def predict(model, data: DeviceData, split: str) -> torch.Tensor:
    return model.fc(extract_features(model, data, split)).argmax(1)
