"""One run, end to end: validate, load data, train (reusing stage 1), evaluate, store.

Everything that can be wrong with the request is checked before the run row is
written, so bad input leaves the store untouched.
"""
from __future__ import annotations

import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness import HarnessError
from harness.checkpoints import cache_root, load_checkpoint, save_atomic, stage1_key, stage1_path
from harness.config import RunConfig, load_benchmarks, resolve
from harness.data import LTData, group_accuracies, per_class_accuracy, shot_group
from harness.engine import DeviceData, TrainSpec, device_name, predict, resolve_device, train
from harness.method import Method, RunContext
from harness.models import BACKBONES, build_model, head_weight
from harness.provenance import git_commit, package_versions
from harness.registry import DATASETS, METHODS
from harness.store import Run, Store, now


@dataclass
class RunRequest:
    method: str
    dataset: str
    rho: float
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "paper"
    epochs: int | None = None
    device: str = "auto"
    data_root: str | None = None
    download: bool = False
    db: str | None = None
    generator: str | None = None
    backbone: str | None = None
    val_per_class: int | None = None
    cache_dir: str | None = None
    benchmarks: str | None = None
    progress: bool = True


@dataclass
class RunResult:
    run_id: str
    config: RunConfig
    metrics: dict          # split -> group -> top1 (percent or None)
    extra: dict
    stage1_cached: bool


def prepare(req: RunRequest, seed: int) -> tuple[Method, object, RunConfig]:
    method = METHODS.get(req.method)
    spec = DATASETS.get(req.dataset)
    doc = load_benchmarks(req.benchmarks)
    cfg = resolve(doc, method=req.method, dataset=req.dataset, rho=req.rho, seed=seed, preset=req.preset,
                  epochs=req.epochs, generator=req.generator, backbone=req.backbone,
                  val_per_class=req.val_per_class,
                  method_default_recipe=getattr(method, "default_recipe", None))
    if cfg.backbone not in BACKBONES:
        raise HarnessError(f"unknown backbone '{cfg.backbone}'; known backbones: {', '.join(sorted(BACKBONES))}")
    return method, spec, cfg


def execute(req: RunRequest) -> list[RunResult]:
    """Run every seed of the request; validation of all seeds happens before any training."""
    prepared = [prepare(req, seed) for seed in req.seeds]
    device = resolve_device(req.device)
    _, spec, cfg0 = prepared[0]
    root = Path(req.data_root) if req.data_root else None
    if root is not None and not root.is_dir():
        raise HarnessError(f"data root {root} is not a directory; pass --data-root DIR or set HARNESS_DATA_ROOT")
    data = spec.build(cfg0.rho, cfg0.generator, cfg0.val_per_class, root, req.download)
    store = Store(req.db)  # opened only once the request is known to be good: bad input creates nothing
    checksum = data.checksum()
    return [run_one(method, spec, cfg, data, checksum, device, store, req) for method, spec, cfg in prepared]


def run_one(method: Method, spec, cfg: RunConfig, data: LTData, checksum: str, device: torch.device,
            store: Store, req: RunRequest) -> RunResult:
    run_id = uuid.uuid4().hex[:12]
    store.start_run(Run(
        id=run_id, method=cfg.method, dataset=cfg.dataset, rho=cfg.rho, backbone=cfg.backbone, seed=cfg.seed,
        generator=cfg.generator, preset=cfg.preset, config=cfg.to_dict(), config_hash=cfg.config_hash(),
        status="running", started_at=now(), device=device_name(device), git_commit=git_commit(),
        versions=package_versions(), data_checksum=checksum, extra={}))
    start = time.perf_counter()
    try:
        result = train_and_evaluate(method, spec, cfg, data, checksum, device, req)
    except BaseException as exc:  # KeyboardInterrupt too: the row must say the run did not finish
        store.fail_run(run_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}",
                       time.perf_counter() - start)
        raise
    metrics, class_rows, curves, extra, cached = result
    store.complete_run(run_id, metrics=metrics, class_metrics=class_rows, curves=curves, extra=extra,
                       wall_seconds=time.perf_counter() - start, stage1_cached=cached)
    summary: dict = {}
    for m in metrics:
        summary.setdefault(m["split"], {})[m["group"]] = m["top1"]
    return RunResult(run_id, cfg, summary, extra, cached)


def progress_printer(label: str, enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="ep", file=sys.stderr, leave=True, dynamic_ncols=True)

    def update(epoch: int, epochs: int, loss: float) -> None:
        bar.total = epochs
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

    return update, bar.close


def train_stage(model, ddata, spec: TrainSpec, seed: int, label: str, enabled: bool):
    update, close = progress_printer(label, enabled)
    try:
        return train(model, ddata, spec, seed, update)
    finally:
        close()


def train_and_evaluate(method: Method, spec, cfg: RunConfig, data: LTData, checksum: str,
                       device: torch.device, req: RunRequest):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ddata = DeviceData(data, spec.mean, spec.std, spec.crop_padding, spec.flip, device)
    model = build_model(cfg.backbone, data.num_classes, data.train_x.shape[1])
    model = model.to(device, memory_format=torch.channels_last)
    ctx = RunContext(data=ddata, train_counts=data.train_counts, recipe=cfg.recipe, seed=cfg.seed)

    loss_id, loss = method.stage1_loss(ctx)
    ckpt_path = stage1_path(cache_root(req.cache_dir), stage1_key(cfg.to_dict(), loss_id, checksum))
    cached = load_checkpoint(ckpt_path)
    if cached is not None:
        model.load_state_dict(cached["model"])
        stage1_loss, stage1_seconds = cached["epoch_loss"], cached["seconds"]
    else:
        t0 = time.perf_counter()
        log = train_stage(model, ddata, TrainSpec.from_recipe(cfg.recipe["stage1"], loss=loss), cfg.seed,
                          f"{cfg.method} stage 1 seed {cfg.seed}", req.progress)
        stage1_loss, stage1_seconds = log.epoch_loss, time.perf_counter() - t0
        save_atomic(ckpt_path, {"model": model.state_dict(), "epoch_loss": stage1_loss, "seconds": stage1_seconds})
    ctx.extra.update(stage1_checkpoint=ckpt_path.name, stage1_seconds=stage1_seconds, stage1_loss_id=loss_id)
    ctx.curves += [{"kind": "train_loss", "x": e, "split": "stage1", "group": "all", "value": v}
                   for e, v in enumerate(stage1_loss)]

    spec2 = method.stage2(model, ctx)
    if spec2 is not None:
        log2 = train_stage(model, ddata, spec2, cfg.seed + 1, f"{cfg.method} stage 2 seed {cfg.seed}", req.progress)
        ctx.curves += [{"kind": "train_loss", "x": e, "split": "stage2", "group": "all", "value": v}
                       for e, v in enumerate(log2.epoch_loss)]
    method.finalize(model, ctx)

    metrics, test_acc = [], None
    for split, x, y in (("test", ddata.test_x, ddata.test_y), ("val", ddata.val_x, ddata.val_y)):
        if y.numel() == 0:
            continue
        acc = per_class_accuracy(predict(model, ddata, x), y, data.num_classes) * 100.0
        test_acc = acc if split == "test" else test_acc
        for group, top1 in group_accuracies(acc, data.train_counts).items():
            n = sum(1 for c in data.train_counts if group == "all" or shot_group(c) == group)
            metrics.append({"split": split, "group": group, "top1": top1,
                            "error": None if top1 is None else 100.0 - top1, "n_classes": n})
    norms = head_weight(model.fc).detach().float().norm(dim=1).cpu().numpy()
    class_rows = [{"class_index": c, "class_name": data.class_names[c], "train_count": int(data.train_counts[c]),
                   "accuracy": float(test_acc[c]), "weight_norm": float(norms[c])}
                  for c in range(data.num_classes)]
    return metrics, class_rows, ctx.curves, ctx.extra, cached is not None
