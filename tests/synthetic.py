"""A tiny synthetic LT dataset (learnable: each class has its own mean pattern) and a
benchmarks.yaml for it, so tests run in seconds with no downloaded data."""
from __future__ import annotations

import textwrap

import numpy as np
import torch

from harness.datasets import DatasetSpec, RawSplits

SIZE = 8
CLASSES = 6


def synth_loader(spec: DatasetSpec, root, download, cache=None) -> RawSplits:
    rng = np.random.RandomState(7)
    patterns = rng.randint(0, 256, size=(CLASSES, 1, SIZE, SIZE))

    def make(n_per_class: int):
        ys = np.repeat(np.arange(CLASSES), n_per_class)
        noise = rng.randint(-40, 41, size=(len(ys), 1, SIZE, SIZE))
        xs = np.clip(patterns[ys] + noise, 0, 255).astype(np.uint8)
        return torch.from_numpy(xs), ys.astype(np.int64)

    train_x, train_y = make(160)
    test_x, test_y = make(20)
    return RawSplits(train_x, train_y, test_x, test_y, [f"c{i}" for i in range(CLASSES)])


SYNTH_LT = DatasetSpec(
    name="synth-lt", title="Synthetic-LT", num_classes=CLASSES, n_max=150, channels=1, size=SIZE,
    mean=(0.5,), std=(0.25,), crop_padding=1, flip=True, backbone="fmnist-cnn", loader=synth_loader,
    source="generated in the tests")

# rho 100 over 6 classes: 150, 59, 23, 9, 3, 1 -> many 1 / medium 2 / few 3
SYNTH_COUNTS = [150, 59, 23, 9, 3, 1]

BENCHMARKS_YAML = textwrap.dedent("""
    version: 1
    recipes:
      tiny: &tiny
        epochs: 3
        batch_size: 32
        lr: 0.05
        momentum: 0.9
        weight_decay: 5.0e-4
        schedule: {kind: warmup-step, warmup_epochs: 1, steps: [[2, 0.1]]}
      tiny2: &tiny2
        epochs: 2
        batch_size: 32
        lr: 0.05
        momentum: 0.9
        weight_decay: 5.0e-4
        schedule: {kind: cosine, step_at: epoch-start}
    benchmarks:
      synth-lt:
        rhos: [100]
        backbone: fmnist-cnn
        metric: top1
        generator: ldam
        val_per_class: 5
        presets:
          paper: {}
          quick: {stage1_fraction: 0.67, stage2_fraction: 0.5}   # 2 of 3 epochs; 1 of 2
        methods:
          ce: {stage1: *tiny}
          crt: {stage1: *tiny, stage2: *tiny2}
          lws: {stage1: *tiny, stage2: *tiny2}
          tau_norm: {stage1: *tiny}
          fbl: {stage1: *tiny, lambda: 60}
          wb: {stage1: {<<: *tiny, weight_decay: 5.0e-3}, stage2: {<<: *tiny2, weight_decay: 0.1}, beta: 0.9999, maxnorm_thresh: 0.1}
          ce_drw: {stage1: {<<: *tiny, drw_epoch: 1}, beta: 0.9999}
          ldam_drw: {stage1: {<<: *tiny, drw_epoch: 1}, beta: 0.9999, max_margin: 0.5, scale: 30}
          focal: {stage1: *tiny, gamma: 1.0}
          cb_loss: {stage1: *tiny, variant: focal, beta: 0.9999, gamma: 1.0}
          logit_adjust: {stage1: *tiny, tau: 1.0}
          balanced_softmax:
            stage1: {<<: *tiny, batch_size: 64, epoch_steps: floor,
                     schedule: {kind: warmup-cosine, warmup_epochs: 2, warmup_from: 0.5}}
            augmentation: crop+flip+autoaugment+cutout
          la_posthoc: {stage1: *tiny, tau_start: 0.0, tau_stop: 4.0, tau_step: 0.25}
          ncm: {stage1: *tiny}
          mislas: {stage1: *tiny, mixup_alpha: 1.0, stage2: {<<: *tiny2, epoch_steps: ceil+1, bn_mode: eval},
                   smooth_head: 0.4, smooth_tail: 0.1, lr_factor: 0.2}
        references:
          - {method: ce, rho: 100, top1: 50.0, backbone: fmnist-cnn, source: "made up for tests"}
""")
