"""The one training loop, with data resident on the device.

Images live as uint8 tensors on the device (pre-padded once for the crop);
each step gathers a batch, crops and flips it per sample with one indexed
gather, applies the batch transforms (AutoAugment, Cutout, mixup), normalises
it and runs the model. The host is read once per epoch (the epoch's mean
loss), never per step.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import HarnessError
from harness import schedules
from harness.augment import BatchTransform
from harness.checkpoints import load_epoch_checkpoint, save_epoch_checkpoint
from harness.data import LTData
from harness.distributed import all_reduce_sum, is_main, shard_positions, world
from harness.models import modules_under
from harness.provenance import cpu_model
from harness.samplers import ClassAwareSampler, epoch_samples

# (logits, features, target, 0-based epoch as a 0-dim device tensor) -> loss; the target is the
# labels, or whatever the batch transforms made of them (mixup: (y_a, y_b, λ))
LossFn = Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]


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
    """The device a run computed on, as stored. On the CPU it names the processor, the threads and
    the instruction set torch's kernels were picked for: each changes the rounding, and the same
    CE run (Fashion-MNIST-LT, preset quick) ends 0.19 points apart on AVX2 and on the baseline
    kernels of one machine, 0.54 apart on two machines (README, What a run records)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


# ---------------------------------------------------------------- data on the device

class DeviceData:
    """The run's tensors on the device plus the batched crop and flip."""

    streamed = False
    precision: str | None = None   # of the forward passes on this data (precision_on); the runner sets it

    def __init__(self, data: LTData, mean, std, padding: int, flip: bool, device: torch.device):
        self.device = device
        self.num_classes = data.num_classes
        self.padding = padding
        self.flip = flip
        p = padding
        self.train_x = data.train_x.to(device)
        self.train_pad = F.pad(self.train_x, (p, p, p, p))  # zero padding, as RandomCrop(padding)
        self.train_y = data.train_y.to(device)
        self.val_x, self.val_y = data.val_x.to(device), data.val_y.to(device)
        self.test_x, self.test_y = data.test_x.to(device), data.test_y.to(device)
        self.size = data.train_x.shape[-1]
        c = data.train_x.shape[1]
        self.mean, self.std = (torch.tensor(v, dtype=torch.float64).expand(c).tolist() for v in (mean, std))
        std_t = torch.tensor(std, dtype=torch.float32, device=device).expand(c).reshape(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).expand(c).reshape(1, c, 1, 1)
        # (x/255 - mean)/std as one multiply-add on 0-255 pixels
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.channel_idx = torch.arange(c, device=device).view(1, c, 1, 1)
        self.arange = torch.arange(self.size, device=device)
        self.train_counts = torch.bincount(self.train_y, minlength=self.num_classes)

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last)

    def inputs(self) -> dict:
        """How a test image becomes the model's input (a saved model's users need it)."""
        return {"mean": self.mean, "std": self.std,
                "pixels": f"{self.size}x{self.size} as stored, x / 255, then (x - mean) / std per channel"}

    def draw_augment(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Crop offsets and flips for n samples (RandomCrop(padding) + RandomHorizontalFlip)."""
        p = self.padding
        oy = torch.randint(0, 2 * p + 1, (n,), device=self.device, generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), device=self.device, generator=gen)
        flip = torch.rand((n,), device=self.device, generator=gen) < 0.5
        return {"oy": oy, "ox": ox, "flip": flip & self.flip}

    def crop_flip(self, idx, oy, ox, flip) -> torch.Tensor:
        """Crop (zero padding) + horizontal flip per sample, done as one gather: float 0-255 pixels."""
        b, s = idx.shape[0], self.size
        rows = oy.view(b, 1) + self.arange
        cols = torch.where(flip.view(b, 1), ox.view(b, 1) + (s - 1 - self.arange), ox.view(b, 1) + self.arange)
        x = self.train_pad[idx.view(b, 1, 1, 1), self.channel_idx, rows.view(b, 1, s, 1), cols.view(b, 1, 1, s)]
        return x.float()

    def labels(self, split: str) -> torch.Tensor:
        return {"train": self.train_y, "val": self.val_y, "test": self.test_y}[split]

    def eval_batches(self, split: str, batch: int = 1024):
        """Normalised, un-augmented images of `split` ("train", "val" or "test"), in order."""
        x = {"train": self.train_x, "val": self.val_x, "test": self.test_x}[split]
        for start in range(0, x.shape[0], batch):
            yield self.normalise(x[start:start + batch])


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
    per_class: int = 4                   # class-aware: images per class draw
    shuffle_batch: bool = False          # class-aware: permute each batch (Decoupling's `shuffle: true`)
    epoch_steps: str | None = None       # harness.samplers.epoch_samples; None: all (instance), floor (class-aware)
    loss: LossFn = cross_entropy         # (logits, feats, target, epoch as a 0-dim device tensor)
    # None: every parameter of the model; else parameters, or groups {"params", "lr_scale", "weight_decay"}
    params: list | None = None
    frozen_backbone: bool = False        # features computed without gradients
    bn_mode: str = "train"               # BatchNorm mode of a frozen backbone
    # module-name prefixes: only these run in train mode, the rest in eval mode (BatchNorm
    # statistics frozen), e.g. a fresh block trained on a frozen pretrained trunk; None: all
    train_mode_only: list[str] | None = None
    after_step: Callable[[], None] | None = None  # tensor ops only (it is captured in the CUDA graph)
    transforms: list[BatchTransform] = field(default_factory=list)  # per-step batch work, in order
    nesterov: bool = False
    cuda_graphs: bool = True             # capture the step on CUDA; eager elsewhere
    stage: str = "stage1"                # the recipe key it was read from: what an error tells --set to change

    RECIPE_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "nesterov", "per_class",
                   "shuffle_batch", "epoch_steps", "train_mode_only")

    @classmethod
    def from_recipe(cls, recipe: dict, **kw) -> "TrainSpec":
        return cls(**{k: recipe[k] for k in cls.RECIPE_KEYS if k in recipe}, **kw)


@dataclass
class TrainLog:
    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    graph: str = "eager"                 # "cuda-graph" or "eager (<reason>)"
    resumed_from: int | None = None      # the epoch an interrupted training resumed at


def precision_on(device: torch.device, precision: str | None) -> str:
    """The precision a run computes in: the one asked for, else the device's default: bf16 on
    CUDA (fast, and measured in the GPU proof), fp32 on the CPU (where bf16 measured slower on
    the 2-core machines). Every official code runs fp32: `--precision fp32` on CUDA is theirs on
    the same GPU (PyTorch's TF32 defaults for convolutions untouched, as they would be for them)."""
    return precision or ("bf16" if device.type == "cuda" else "fp32")


def autocast_for(device: torch.device, precision: str | None = None):
    # bf16 autocast (BatchNorm stays fp32 under autocast) or none. Inside a captured region
    # the autocast cache must be off (the graph keeps its own copies).
    if precision_on(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast(device.type, enabled=False)


def make_optimizer(params, spec: TrainSpec, device: torch.device, lr_tensors: bool = False) -> torch.optim.SGD:
    """SGD over `params`: parameters, or groups {"params", "lr_scale", "weight_decay"}. Each
    group's learning rate is spec.lr × its lr_scale; with `lr_tensors` it is a device tensor
    that a captured step updates in place."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{"lr_scale": 1.0, **g, "params": list(g["params"])} for g in groups]
    for g in groups:
        lr = spec.lr * g["lr_scale"]
        g["lr"] = torch.tensor(lr, device=device) if lr_tensors else lr
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           nesterov=spec.nesterov, **extra)


def graphs_wanted(spec: TrainSpec, device: torch.device) -> bool:
    return device.type == "cuda" and spec.cuda_graphs and not os.environ.get("HARNESS_NO_CUDA_GRAPHS")


class Trainer:
    """Trains one model by one spec, epoch by epoch.

    Each epoch draws its sample order, its augmentation (crop offsets, flips) and the
    randomness of every batch transform up front, one row per sample, plus the learning
    rate of every step; a step only indexes them. On CUDA the full-batch step is
    captured once as a CUDA graph that reads the epoch's buffers at a device-side step
    counter, so an epoch is one `replay()` per step and one host read at the end; the
    learning rates and the epoch number live in device tensors. The last, smaller batch
    runs eagerly. The math is the same on every path.
    """

    def __init__(self, model, data: DeviceData, spec: TrainSpec, seed: int):
        schedules.check(spec.schedule)
        self.model, self.data, self.spec = model, data, spec
        self.device = data.device
        # streamed data (files decoded by a DataLoader) arrive in fresh host batches: eager steps
        self.streamed = getattr(data, "streamed", False)
        if self.streamed and any(t.pixels_only for t in spec.transforms):
            names = ", ".join(t.name for t in spec.transforms if t.pixels_only)
            raise HarnessError(f"{names} needs device-resident images; streamed datasets support mixup only")
        self.distributed = world()[1] > 1
        self.use_graph = graphs_wanted(spec, self.device) and not (self.streamed or self.distributed)
        self.batch = spec.batch_size  # this process's share of a global batch under torchrun
        self.held_in_eval = held_in_eval(model, spec)
        self.forward = _Forward(model, spec.frozen_backbone)
        if self.distributed:  # gradients averaged over the processes by DistributedDataParallel
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.forward, find_unused_parameters=spec.params is not None or spec.frozen_backbone)
        self.opt = make_optimizer(model.parameters() if spec.params is None else spec.params, spec, self.device,
                                  lr_tensors=self.use_graph)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.rng = np.random.RandomState(seed)
        if spec.sampler not in ("instance", "class_aware"):
            raise HarnessError(f"unknown sampler '{spec.sampler}'; known: instance, class_aware")
        self.sampler = ClassAwareSampler(data.train_y.cpu().numpy(), spec.per_class, self.rng, spec.shuffle_batch) \
            if spec.sampler == "class_aware" else None
        default_steps = "floor" if self.sampler is not None else "all"
        self.samples = epoch_samples(spec.epoch_steps or default_steps, data.n_train, spec.batch_size, spec.sampler,
                                     stage=spec.stage)
        self.epoch_t = torch.zeros((), device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.step_t = torch.zeros((), dtype=torch.long, device=self.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.graph = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.log = TrainLog()
        self.epoch = 0

    # -- one step, tensor ops only ------------------------------------------------
    def _inputs(self, drawn: dict[str, torch.Tensor]):
        """The batch's model inputs and target: crop and flip, the batch transforms, normalisation."""
        if self.streamed:
            x, target = next(self.batches)
        else:
            idx = drawn["idx"]
            x, target = self.data.crop_flip(idx, drawn["oy"], drawn["ox"], drawn["flip"]), self.data.train_y[idx]
        for i, t in enumerate(self.spec.transforms):
            prefix = f"t{i}."
            x, target = t.apply(x, target, {k[len(prefix):]: v for k, v in drawn.items() if k.startswith(prefix)})
        return (x if self.streamed else self.data.normalise(x)), target

    def _update(self, drawn: dict[str, torch.Tensor], zero_grad: bool = True) -> None:
        spec = self.spec
        x, target = self._inputs(drawn)
        with autocast_for(self.device, self.data.precision):
            logits, feats = self.forward(x)
        loss = spec.loss(logits.float(), feats.float(), target, self.epoch_t)
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if spec.after_step is not None:
            spec.after_step()
        self.loss_sum += loss.detach() * x.shape[0]

    def _graph_step(self) -> None:
        i = self.step_t.view(1)  # a device-side index: no host sync inside the graph
        lr = self.buffers["lr"].index_select(0, i).squeeze(0)
        for group in self.opt.param_groups:
            group["lr"].copy_(lr * group["lr_scale"])
        self._update({k: v.index_select(0, i).squeeze(0) for k, v in self.buffers.items() if k != "lr"},
                     zero_grad=False)
        self.step_t += 1

    def _capture(self, steps: int, drawn: dict[str, torch.Tensor]) -> None:
        """Allocate the epoch buffers, warm up on a side stream, restore every state the
        warm-up touched, capture."""
        b = self.batch
        self.buffers = {k: torch.zeros((steps, b, *v.shape[1:]), dtype=v.dtype, device=self.device)
                        for k, v in drawn.items()}
        self.buffers["lr"] = torch.zeros(steps, device=self.device)
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_momentum = {id(p): st["momentum_buffer"].clone() for p, st in self.opt.state.items()
                          if st.get("momentum_buffer") is not None}
        hook_state = self._hook_state()
        hook_saved = [t.clone() for t in hook_state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._update({k: v[0] for k, v in self.buffers.items() if k != "lr"})
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
    def _draw(self) -> dict[str, torch.Tensor]:
        """The epoch's per-sample draws: sample order, augmentation, transform randomness."""
        spec = self.spec
        if self.sampler is not None:
            order = torch.from_numpy(self.sampler.draw(self.samples, spec.batch_size)).to(self.device)
        else:  # a permutation; `floor` epochs drop the images past the last full batch
            order = torch.randperm(self.data.n_train, generator=self.gen, device=self.device)[:self.samples]
        n = order.shape[0]
        drawn = {"idx": order}
        if not self.streamed:
            drawn.update(self.data.draw_augment(n, self.gen))
        for i, t in enumerate(spec.transforms):
            drawn.update({f"t{i}.{k}": v for k, v in t.draw(n, self.gen, self.rng, self.device).items()})
        # every process draws the same global epoch, then keeps its share of each batch
        positions, self.batch = shard_positions(n, spec.batch_size, self.device)
        if self.distributed:
            drawn = {k: v[positions] for k, v in drawn.items()}
        if self.streamed:  # the loader's workers draw the augmentation, seeded from this generator
            seed = int(torch.randint(0, 2**62, (1,), device=self.device, generator=self.gen))
            self.batches = iter(self.data.train_batches(drawn["idx"].cpu(), self.batch, seed))
        return drawn

    def begin_epoch(self) -> None:
        spec, epoch = self.spec, self.epoch
        self.epoch_t.fill_(float(epoch))
        self.loss_sum.zero_()
        self.drawn = self._draw()
        n, b = self.drawn["idx"].shape[0], self.batch
        self.full_steps, self.n = n // b, n
        self.lrs = spec.lr * schedules.factors(spec.schedule, epoch, spec.epochs, self.steps_in_epoch(),
                                               spec.batch_size, self.data.n_train)
        self.cursor = 0
        if self.use_graph and self.full_steps > 0:
            if self.graph is None or self.buffers["lr"].shape[0] < self.full_steps:
                try:
                    self._capture(self.full_steps, self.drawn)
                    self.log.graph = "cuda-graph"
                except Exception as exc:  # capture can fail on exotic ops: train eagerly instead
                    warnings.warn(f"CUDA graph capture failed, training eagerly: {type(exc).__name__}: {exc}")
                    self.use_graph, self.graph, self.buffers = False, None, {}
                    self.log.graph = f"eager ({type(exc).__name__} during capture)"
                    for group in self.opt.param_groups:
                        group["lr"] = float(group["lr"])
                    return self.begin_epoch()
            m = self.full_steps * b
            for k, v in self.drawn.items():
                self.buffers[k][:self.full_steps].copy_(v[:m].view(self.full_steps, b, *v.shape[1:]))
            self.buffers["lr"][:self.full_steps].copy_(torch.as_tensor(self.lrs[:self.full_steps]))
            self.step_t.zero_()

    def steps_in_epoch(self) -> int:
        return -(-self.n // self.batch)

    def step(self) -> None:
        """The next step of the current epoch."""
        b, start = self.batch, self.cursor
        k = start // b
        if self.graph is not None and k < self.full_steps:
            self.graph.replay()
        else:
            for group in self.opt.param_groups:
                lr = float(self.lrs[k]) * group["lr_scale"]
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            self._update({key: v[start:start + b] for key, v in self.drawn.items()})
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
        statistics, momentum, both random streams, the class-aware sampler's cycles and the
        hook's counters. Plain tensors and lists only, so it loads with
        torch.load(weights_only=True)."""
        kind, keys, pos, has_gauss, gauss = self.rng.get_state()
        return {"epoch": self.epoch, "epoch_loss": list(self.log.epoch_loss), "steps": self.log.steps,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(),
                "numpy_rng": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                "sampler": self.sampler.state_dict() if self.sampler is not None else {},
                "hook": [t.detach().clone() for t in self._hook_state()]}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        lr_tensors = [g["lr"] for g in self.opt.param_groups]
        self.opt.load_state_dict(state["optimizer"])
        for group, lr in zip(self.opt.param_groups, lr_tensors):
            group["lr"] = lr  # a captured graph reads each group's lr from this very tensor
        self.gen.set_state(state["generator"])
        keys, pos, has_gauss, gauss = state["numpy_rng"]
        self.rng.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if self.sampler is not None and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])
        for t, saved in zip(self._hook_state(), state["hook"]):
            t.copy_(saved)
        self.epoch = int(state["epoch"])
        self.log.epoch_loss = list(state["epoch_loss"])
        self.log.steps = int(state["steps"])

    def mode(self) -> None:
        self.model.train()
        for module in self.held_in_eval:   # one module at a time: eval() would recurse
            module.training = False

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def held_in_eval(model: nn.Module, spec: TrainSpec) -> list[nn.Module]:
    """The modules kept in eval mode (BatchNorm statistics frozen) while the rest trains: a
    frozen backbone's under `bn_mode: eval`, and every module outside `train_mode_only`."""
    if spec.bn_mode not in ("train", "eval"):
        raise HarnessError(f"bn_mode must be train or eval, got {spec.bn_mode!r}")
    held = list(model.body.modules()) if spec.frozen_backbone and spec.bn_mode == "eval" else []
    if spec.train_mode_only is not None:
        kept = {id(m) for m in modules_under(model, spec.train_mode_only, "train_mode_only")}
        held += [m for m in model.modules() if id(m) not in kept]
    return held


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


def fit_many(trainers: list[Trainer], progress=None, checkpoints: list | None = None, label: str = "training",
             announce=None, epoch_end=None) -> list[TrainLog]:
    """Train several models together, interleaved step by step; on CUDA each trainer
    issues its work on its own stream, so independent runs overlap on one GPU.
    Every trainer's math is exactly what it would be alone.

    `checkpoints`, one path (or None) per trainer: each trainer first resumes from
    the last good epoch checkpoint there (saying so through `announce(line)`), and
    writes one after every epoch. `epoch_end(i, epoch)` is called after trainer i's
    epoch and its checkpoint (it may evaluate the model, or raise to stop the training)."""
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
                if announce is not None:
                    announce(f"resuming {label} at epoch {t.epoch + 1} of {epochs} "
                             f"({t.epoch} done; checkpoint {path})")
        t.mode()
        if t.stream is not None:
            t.stream.wait_stream(torch.cuda.current_stream(t.device))
    # trainers resumed at different epochs: the ones behind catch up first
    for epoch in range(min(t.epoch for t in trainers), epochs):
        active = [(i, t, p) for i, (t, p) in enumerate(zip(trainers, paths)) if t.epoch == epoch]
        for _, t, _ in active:
            with t.on_stream():
                t.begin_epoch()
        for step in range(max(t.steps_in_epoch() for _, t, _ in active)):
            for _, t, _ in active:
                if step < t.steps_in_epoch():
                    with t.on_stream():
                        t.step()
        losses = []
        for i, t, path in active:
            with t.on_stream():
                losses.append(t.end_epoch())
                if path is not None and is_main():
                    save_epoch_checkpoint(path, t.state_dict())
                if epoch_end is not None:
                    epoch_end(i, epoch)
                    t.mode()   # an evaluation leaves the model in eval mode
        if progress is not None:
            progress(epoch, epochs, float(np.mean(losses)))
    for t in trainers:
        if t.stream is not None:
            torch.cuda.current_stream(t.device).wait_stream(t.stream)
    return [t.log for t in trainers]


def train(model, data: DeviceData, spec: TrainSpec, seed: int, progress=None, checkpoint=None, label: str = "training",
          announce=None, epoch_end=None) -> TrainLog:
    """Train `model` in place by `spec`. `progress(epoch, epochs, loss)` is called once per epoch,
    and `epoch_end(0, epoch)` as `fit_many` calls it."""
    return fit_many([Trainer(model, data, spec, seed)], progress, [checkpoint], label, announce, epoch_end)[0]


@torch.no_grad()
def extract_features(model, data: DeviceData, split: str) -> torch.Tensor:
    """Features of every image of `split` ("val" or "test"), in order, in eval mode."""
    model.eval()
    out = []
    with autocast_for(data.device, data.precision):
        for x in data.eval_batches(split):
            out.append(model.features(x).float())
    return torch.cat(out) if out else torch.zeros(0, model.feat_dim, device=data.device)


@torch.no_grad()
def head_outputs(model, data: DeviceData, split: str) -> torch.Tensor:
    """The head's outputs (fp32) for every image of `split`, in order."""
    return model.fc(extract_features(model, data, split)).float()


def predict(model, data: DeviceData, split: str) -> torch.Tensor:
    return head_outputs(model, data, split).argmax(1)
