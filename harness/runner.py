"""One run, end to end: validate, load data, train (reusing stage 1), evaluate, store.

Everything that can be wrong with the request is checked before the run row is
written, so bad input leaves the store untouched.
"""
from __future__ import annotations

import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness import HarnessError
from harness.augment import augmentation_transforms
from harness.checkpoints import (cache_root, check_cache_root, check_folder, drop_epoch_checkpoint,
                                 epoch_checkpoint_path, load_checkpoint, save_atomic, stage1_key, stage1_path)
from harness.config import RunConfig, has_key, load_benchmarks, resolve, with_overrides
from harness.data import (LTData, confidence_bins, group_accuracies, group_calibration_errors, per_class_accuracy,
                          shot_group)
from harness.distributed import announce, init_from_env, is_main, world
from harness.engine import (DeviceData, Trainer, TrainSpec, device_name, fit_many, head_outputs, precision_on,
                            resolve_device, train)
from harness.method import Method, RunContext, describe
from harness.migrate import NoStore
from harness.models import build_model, check_backbone, head_weight, reinitialise, under
from harness.provenance import git_commit, package_versions, this_process
from harness.registry import DATASETS, METHODS
from harness.store import ClassMetric, Run, Store, completed_of, now


@dataclass
class RunRequest:
    method: str
    dataset: str
    rho: float | str              # a ratio, or "natural": the dataset's own counts
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
    precision: str | None = None    # fp32 or bf16; None: the device's default (engine.precision_on)
    cache_dir: str | None = None
    save_model: str | None = None   # a folder: each run's final model goes there as <run id>.pt
    benchmarks: str | None = None
    progress: bool = True
    study: str | None = None      # set for the trials of `harness tune`: stored, never ranked
    # dotted recipe key -> value: the command line's --set (recorded as what it changes of the
    # shipped recipe, named on the board) and a tuning trial's (its preset says it was tuned)
    settings: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    preset_label: str | None = None                 # the preset name stored (`tuned`), its budget `preset`'s
    extra: dict = field(default_factory=dict)       # provenance stored with the runs (a trial's, a tuning's)
    # after every training epoch: (run id, epoch counted over both stages, val top-1); it may
    # raise RunStopped to end the run (a tuning trial pruned). None: no evaluation between epochs
    on_epoch: Callable[[str, int, float], None] | None = None


class RunStopped(Exception):
    """Raised by `RunRequest.on_epoch` to end a run on purpose (a pruned tuning trial): its row
    is failed with the reason, and its epoch checkpoints go, as nothing will resume it."""


@dataclass
class RunResult:
    run_id: str
    config: RunConfig
    metrics: dict          # split -> group -> top1 (percent or None)
    extra: dict
    stage1_cached: bool


def asked_precision(req: RunRequest) -> str | None:
    """The precision a run's config holds: None for the device's default, also where it is asked
    for by name (fp32 on the CPU computes what the default does: one config, one hash)."""
    if req.precision is not None and req.precision == precision_on(resolve_device(req.device), None):
        return None
    return req.precision


def prepare(req: RunRequest, seed: int) -> tuple[Method, object, RunConfig]:
    method = METHODS.get(req.method)
    spec = DATASETS.get(req.dataset)
    doc = load_benchmarks(req.benchmarks)
    rho, generator = req.rho, req.generator
    if rho == "natural":  # no subset is drawn: the run keeps the dataset's counts and records their ratio
        if spec.natural_rho is None:
            raise HarnessError(f"{req.dataset} is cut from a balanced source; pass a ratio, e.g. --rho 100")
        rho, generator = spec.natural_rho(Path(req.data_root) if req.data_root else None), "natural"
    cfg = resolve(doc, method=req.method, dataset=req.dataset, rho=float(rho), seed=seed, preset=req.preset,
                  epochs=req.epochs, generator=generator, backbone=req.backbone,
                  val_per_class=req.val_per_class,
                  method_default_recipe=getattr(method, "default_recipe", None),
                  default_augmentation=getattr(spec, "augmentation", "crop+flip"), precision=asked_precision(req),
                  settings=req.settings)
    if req.overrides:
        cfg = with_overrides(cfg, req.overrides, f"{req.dataset} / {req.method}")
    if req.preset_label:
        cfg = replace(cfg, preset=req.preset_label)
    missing = [key for key in getattr(method, "required_keys", ()) if not has_key(cfg.recipe, key)]
    if missing:
        raise HarnessError(f"the recipe of {req.method} on {req.dataset} lacks {', '.join(missing)}; "
                           f"add them in {load_benchmarks(req.benchmarks)['_path']}")
    check_rho = getattr(spec, "check_rho", None)
    if check_rho is not None and req.rho != "natural":   # a ratio asked for, not the one the data has
        check_rho(cfg.rho)
    check_backbone(cfg.backbone)
    return method, spec, cfg


def data_root(req: RunRequest) -> Path | None:
    """--data-root, checked; None: the dataset's default place."""
    root = Path(req.data_root) if req.data_root else None
    # a data root still to be made is torchvision's to make when it downloads there
    if root is not None and not root.is_dir() and not (req.download and not root.exists()):
        download = "" if root.exists() else ", or add --download to fetch the data there"
        raise HarnessError(f"data root {root} is not a directory; pass --data-root DIR or set HARNESS_DATA_ROOT"
                           f"{download}")
    return root


@dataclass
class Preview:
    """What `execute` would train for a request, with nothing trained and nothing written."""
    configs: list[RunConfig]            # one per seed, resolved and checked as `execute` does
    completed: dict[int, list[str]]     # seed -> ids of the store's completed runs of its config
    store_missing: str | None           # why no store was read (none there yet), else None


def data_name(req: RunRequest) -> str | None:
    """Which data the request reads, where its dataset is whatever the user gives (an image
    folder: its name and files); None for a registered benchmark. Runs, sweeps and studies
    match on it."""
    return DATASETS.get(req.dataset).data_name(Path(req.data_root) if req.data_root else None)


def model_folder(req: RunRequest) -> Path | None:
    """--save-model's folder, where one was asked for."""
    if req.save_model is None:
        return None
    if not str(req.save_model).strip():   # an unset variable in a script, not the current folder
        raise HarnessError("--save-model needs a folder, got an empty path; pass --save-model DIR")
    return Path(req.save_model)


def preview(req: RunRequest) -> Preview:
    configs = [prepare(req, seed)[2] for seed in req.seeds]
    data_root(req)          # checked; the data itself is left to the run: loading it may mean a download
    model_folder(req)       # made only by the run
    try:
        with Store(req.db, create=False) as store, store.session() as s:
            rows = completed_of(s, [cfg.config_hash() for cfg in configs], data_name(req))
    except NoStore as exc:   # a first run makes it
        return Preview(configs, {}, str(exc))
    ids: dict[str, list[str]] = {}
    for config_hash, run_id in rows:
        ids.setdefault(config_hash, []).append(run_id)
    return Preview(configs, {cfg.seed: sorted(ids.get(cfg.config_hash(), [])) for cfg in configs}, None)


def trainable(model: torch.nn.Module, groups: list[dict] | None, prefixes: list[str] | None) -> list | None:
    """The stage-1 parameters: the method's groups, limited by the recipe's `train_only`
    name prefixes (the rest frozen: no gradient, no update, no weight decay)."""
    if not prefixes:
        return groups
    keep = {id(p) for name, p in model.named_parameters() if under(name, prefixes)}
    if not keep:
        raise HarnessError(f"train_only {prefixes} matches no parameter of the model")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    groups = groups or [{"params": list(model.parameters())}]
    return [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in groups]


def execute(req: RunRequest) -> list[RunResult]:
    """Run every seed of the request. Everything is validated before a row is written
    (the request, the data, the cache paths); the seeds' stage-1 trainings run together
    (concurrently on one GPU)."""
    prepared = [prepare(req, seed) for seed in req.seeds]
    device = init_from_env(resolve_device(req.device))  # under torchrun: this process's device
    rank, world_size = world()
    _, spec, cfg0 = prepared[0]
    root = data_root(req)
    cache = check_cache_root(cache_root(req.cache_dir))
    model_dir = model_folder(req)
    if model_dir is not None:
        check_folder(model_dir, "model folder", "pass another --save-model DIR")
    data = spec.build(cfg0.rho, cfg0.generator, cfg0.val_per_class, root, req.download, cache)
    check_class_names(data.class_names)
    checksum = data.checksum()
    ddata = spec.device_data(data, device, cfg0.recipe)
    ddata.precision = cfg0.precision
    training_checksum = data.training_checksum()
    extra = {**req.extra, **({"data_name": data.data_name} if data.data_name else {})}
    jobs = [plan_job(method, cfg, spec, data, ddata, training_checksum, cache, extra) for method, _, cfg in prepared]
    # opened only once the request is known to be good: bad input creates nothing; under
    # torchrun only rank 0 writes (the others train their shards and evaluate alike)
    store = Store(req.db) if rank == 0 else None
    where = device_name(device) if world_size == 1 else f"{world_size} x {device_name(device)} (torchrun)"
    if store:
        for run_id in store.fail_dead_runs():
            announce(f"run {run_id} was still `running`, but its process is gone: marked failed")
    process = this_process()
    for job in jobs if store else []:
        job.ctx.extra.update(process=process, precision=precision_on(device, job.cfg.precision))
        store.start_run(Run(
            id=job.run_id, method=job.cfg.method, dataset=job.cfg.dataset, rho=job.cfg.rho,
            backbone=job.cfg.backbone, seed=job.cfg.seed, generator=job.cfg.generator, preset=job.cfg.preset,
            config=job.cfg.to_dict(), config_hash=job.cfg.config_hash(), status="running", started_at=now(),
            device=where, git_commit=git_commit(), versions=package_versions(device),
            data_checksum=checksum, extra=dict(job.ctx.extra), study=req.study))
    results, start = [], time.perf_counter()
    try:
        stage1([job for job in jobs if not job.cached], ddata, cache, req)
        for job in jobs:
            results.append(finish(job, data, ddata, store, cache, req))
    except BaseException as exc:  # KeyboardInterrupt too: the rows must say the runs did not finish
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
        if isinstance(exc, KeyboardInterrupt):   # the user's own stop, not a fault: no traceback to read
            error = "interrupted (Ctrl-C); the same command resumes from the last epoch's checkpoint"
            announce(f"interrupted: run {', '.join(job.run_id for job in jobs[len(results):])} marked failed; "
                     "the same command resumes from the last epoch's checkpoint")
        out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError)
        if out_of_memory:   # the setup's size, not a fault: name the fixes
            error = out_of_memory_text(exc, where, cfg0, len(jobs), precision_on(device, cfg0.precision))
        for job in jobs[len(results):] if store else []:
            store.fail_run(job.run_id, error, time.perf_counter() - start, getattr(exc, "epoch", None))
            if isinstance(exc, RunStopped):
                drop_epoch_checkpoint(epoch_checkpoint_path(cache, job.key))
                drop_epoch_checkpoint(epoch_checkpoint_path(cache, job.stage2_key))
        if out_of_memory:
            raise HarnessError(error) from None
        raise
    finally:
        if store:
            store.close()
    return results


@dataclass
class Job:
    method: Method
    cfg: RunConfig
    run_id: str
    model: torch.nn.Module
    ctx: RunContext
    key: str                  # the stage-1 identity: recipe, loss, head, groups, transforms, data
    trainer: Trainer | None = None   # None: stage 1 is loaded from the cache
    cached: bool = False

    @property
    def stage2_key(self) -> str:   # names stage 2's epoch checkpoints: stage-1 identity + full config
        return f"{self.key}-{self.cfg.config_hash()}-stage2"


def out_of_memory_text(exc: Exception, where: str, cfg: RunConfig, seeds: int, precision: str) -> str:
    """torch's CUDA OOM (a page of allocator statistics) as one line: what was asked for, where,
    and the changes that fit this run."""
    asked = ". ".join(str(exc).split(". ")[:2])     # "CUDA out of memory. Tried to allocate 2.00 GiB"
    halves = [f"{stage}.batch_size={max(1, cfg.recipe[stage]['batch_size'] // 2)}"
              for stage in ("stage1", "stage2") if stage in cfg.recipe]   # either stage may be the one
    fixes = [*(["fewer --seeds per command (they train at once)"] if seeds > 1 else []),
             *(["--precision bf16"] if precision == "fp32" else []),
             f"a smaller batch (--set {' or '.join(halves)})",
             "spreading each batch over GPUs with torchrun"]
    return f"{asked} on {where}, training {cfg.backbone}; try {', '.join(fixes[:-1])} or {fixes[-1]}"


def check_class_names(names: list[str]) -> None:
    """Before training, not at the run's completion, where the store (PostgreSQL, MySQL; SQLite
    would take it) refused a longer name and the training was lost."""
    limit = ClassMetric.class_name.type.length
    for name in names:
        if len(name) > limit:
            raise HarnessError(f"class name {name[:40]!r}... is {len(name)} characters; the results store keeps "
                               f"up to {limit}: rename that class folder")


def titles(method: Method, spec) -> dict:
    """What a report shows of the method and dataset, recorded with the run so that reading
    a store needs no plugin (importing one imports torch)."""
    about = describe(method)
    return {"method_title": about["title"], "method_label": about["label"], "method_paper": about["paper"],
            "dataset_title": spec.title}


def plan_job(method: Method, cfg: RunConfig, spec, data: LTData, ddata: DeviceData, training_checksum: str,
             cache: Path, extra: dict) -> Job:
    """Build the model and the method's stage-1 setup, and load stage 1 from the cache or
    prepare its trainer; nothing here writes."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.backbone, data.num_classes, spec.channels)
    reinitialise(model, cfg.recipe["stage1"].get("fresh"))
    ctx = RunContext(data=ddata, train_counts=data.train_counts, recipe=cfg.recipe, seed=cfg.seed)
    ctx.extra.update(extra, **titles(method, spec))
    if cfg.recipe_changes:   # a benchmarks file's own recipe: its board row is named by it, and not the paper's
        ctx.extra["recipe_changes"] = cfg.recipe_changes
    if world()[1] > 1:
        ctx.extra["world_size"] = world()[1]
    method.stage1_model(model, ctx)  # on the host: the model moves to the device once, with its stage-1 head
    model = model.to(ddata.device, memory_format=torch.channels_last)
    loss_id, loss = method.stage1_loss(ctx)
    groups = trainable(model, method.stage1_params(model, ctx), cfg.recipe["stage1"].get("train_only"))
    transforms = augmentation_transforms(cfg.recipe["augmentation"]) + method.stage1_transforms(ctx)
    identity = {"loss": loss_id, "head": type(model.fc).__qualname__, "transforms": [t.name for t in transforms],
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in groups or []]}
    key = stage1_key(cfg.to_dict(), identity, training_checksum)
    job = Job(method, cfg, uuid.uuid4().hex[:12], model, ctx, key)
    ctx.extra.update(stage1_checkpoint=stage1_path(cache, key).name, stage1_loss_id=loss_id)
    checkpoints = (stage1_path(cache, key), epoch_checkpoint_path(cache, key), epoch_checkpoint_path(cache, job.stage2_key))
    for path in checkpoints:
        if path.exists() and not path.is_file():
            raise HarnessError(f"checkpoint path {path} is not a file; remove it or pass another --cache-dir")
    cached = load_checkpoint(stage1_path(cache, key))
    if cached is not None:
        model.load_state_dict(cached["model"])
        job.cached = True
        record_stage1(job, cached["epoch_loss"], cached["seconds"], cached.get("engine", "unknown"))
    else:
        spec1 = TrainSpec.from_recipe(cfg.recipe["stage1"], loss=loss, params=groups, transforms=transforms)
        job.trainer = Trainer(model, ddata, spec1, cfg.seed)
    return job


def stage1(jobs: list[Job], ddata: DeviceData, cache: Path, req: RunRequest) -> None:
    """Train the stage 1 of every job not in the cache, together, checkpointing every epoch
    and resuming an interrupted training where it stopped."""
    groups: dict[int, list[Job]] = {}  # one group per epoch budget: trainers interleave step by step
    for job in jobs:
        groups.setdefault(job.trainer.spec.epochs, []).append(job)
    for group in groups.values():
        seeds = ", ".join(str(j.cfg.seed) for j in group)
        label = f"{group[0].cfg.method} stage 1 seed {seeds}"
        update, close = progress_printer(label, req.progress and is_main())
        partials = [epoch_checkpoint_path(cache, job.key) for job in group]
        t0 = time.perf_counter()
        try:
            logs = fit_many([job.trainer for job in group], update, partials, "stage 1", announce,
                            epoch_watch(req, group, ddata, 0))
        finally:
            close()
        seconds = (time.perf_counter() - t0) / len(group)
        for job, log, partial in zip(group, logs, partials):
            if is_main():
                save_atomic(stage1_path(cache, job.key), {"model": job.model.state_dict(),
                                                          "epoch_loss": log.epoch_loss, "seconds": seconds,
                                                          "engine": log.graph})
                drop_epoch_checkpoint(partial)
            if log.resumed_from is not None:
                job.ctx.extra["stage1_resumed_from_epoch"] = log.resumed_from
            record_stage1(job, log.epoch_loss, seconds, log.graph)


def class_accuracy(outputs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class top-1 (percent) of the head's outputs; NaN for a class without images."""
    return per_class_accuracy(outputs.argmax(1), labels, num_classes) * 100.0


def epoch_watch(req: RunRequest, jobs: list["Job"], ddata: DeviceData, offset: int):
    """`fit_many`'s epoch_end for these jobs: their val top-1 after each epoch to `req.on_epoch`,
    epochs counted over both stages (stage 2 goes on from `offset`, stage 1's epochs)."""
    if req.on_epoch is None or ddata.labels("val").numel() == 0:
        return None

    def epoch_end(i: int, epoch: int) -> None:
        job = jobs[i]
        val = class_accuracy(head_outputs(job.model, ddata, "val"), ddata.labels("val"), ddata.num_classes)
        top1 = group_accuracies(val, job.ctx.train_counts)["all"]
        if top1 is not None:
            req.on_epoch(job.run_id, offset + epoch, top1)
    return epoch_end


def record_stage1(job: Job, epoch_loss: list[float], seconds: float, engine: str) -> None:
    job.ctx.extra.update(stage1_seconds=seconds, stage1_engine=engine)
    job.ctx.curves += [{"kind": "train_loss", "x": e, "split": "stage1", "group": "all", "value": v}
                       for e, v in enumerate(epoch_loss)]


def progress_printer(label: str, enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="ep", file=sys.stderr, leave=True, dynamic_ncols=True)

    def update(epoch: int, epochs: int, loss: float) -> None:
        bar.total = epochs
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(epoch + 1 - bar.n)  # a resumed training starts part-way

    return update, bar.close


def reliability_curve(probs: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """The test images' reliability diagram: accuracy (%) per confidence bin that holds images, at
    the bin's centre (%), the same x for every seed, so a board averages them."""
    return [{"kind": "reliability", "x": round(b.centre * 100, 4), "split": "test", "group": "all",
             "value": b.accuracy * 100} for b in confidence_bins(probs, labels)]


def write_model(model: torch.nn.Module, job: Job, data: LTData, ddata: DeviceData, folder: Path) -> Path:
    """The run's final model as evaluated (stage 2 and the post-hoc head included), on the CPU,
    with what it takes to use it: `harness.models.load_model(path)` (torch's weights-only
    unpickler, the file's network layers allowed) gives {"model", "run_id", "config",
    "class_names", "inputs"}; the model's logits are for images normalised as `inputs` says."""
    path = (folder / f"{job.run_id}.pt").resolve()
    save_atomic(path, {"model": model.to("cpu").eval(), "run_id": job.run_id, "config": job.cfg.to_dict(),
                       "class_names": list(data.class_names), "inputs": ddata.inputs()})
    return path


def finish(job: Job, data: LTData, ddata: DeviceData, store: Store | None, cache: Path,
           req: RunRequest) -> RunResult:
    """Stage 2, post-hoc step, evaluation and the one-transaction write of one job."""
    method, cfg, model, ctx = job.method, job.cfg, job.model, job.ctx
    start = time.perf_counter()
    spec2 = method.stage2(model, ctx)
    if spec2 is not None:
        update, close = progress_printer(f"{cfg.method} stage 2 seed {cfg.seed}", req.progress and is_main())
        partial = epoch_checkpoint_path(cache, job.stage2_key)
        try:
            watch = epoch_watch(req, [job], ddata, offset=cfg.recipe["stage1"]["epochs"])
            log2 = train(model, ddata, spec2, cfg.seed + 1, update, checkpoint=partial, label="stage 2",
                         announce=announce, epoch_end=watch)
        finally:
            close()
        if is_main():
            drop_epoch_checkpoint(partial)
        ctx.extra["stage2_engine"] = log2.graph
        if log2.resumed_from is not None:
            ctx.extra["stage2_resumed_from_epoch"] = log2.resumed_from
        ctx.curves += [{"kind": "train_loss", "x": e, "split": "stage2", "group": "all", "value": v}
                       for e, v in enumerate(log2.epoch_loss)]
    method.finalize(model, ctx)
    metrics, test_acc = [], None
    for split in ("test", "val"):
        y = ddata.labels(split)
        if y.numel() == 0:
            continue
        outputs = head_outputs(model, ddata, split)
        acc = class_accuracy(outputs, y, ddata.num_classes)
        test_acc = acc if split == "test" else test_acc
        probs = method.probabilities(outputs, ctx)
        ece = {} if probs is None else group_calibration_errors(probs, y, data.train_counts)
        if split == "test" and probs is not None:
            ctx.curves += reliability_curve(probs, y)
        for group, top1 in group_accuracies(acc, data.train_counts).items():
            n = sum(1 for c in data.train_counts if group == "all" or shot_group(c) == group)
            metrics.append({"split": split, "group": group, "top1": top1,
                            "error": None if top1 is None else 100.0 - top1, "ece": ece.get(group),
                            "n_classes": n})
    norms = head_weight(model.fc).detach().float().norm(dim=1).cpu().numpy()
    class_rows = [{"class_index": c, "class_name": data.class_names[c], "train_count": int(data.train_counts[c]),
                   "accuracy": float(test_acc[c]), "weight_norm": float(norms[c])}
                  for c in range(data.num_classes)]
    # this run's own compute: its stage-1 share when it trained one, plus everything after
    own_seconds = time.perf_counter() - start + (0.0 if job.cached else ctx.extra["stage1_seconds"])
    if store is None:  # a torchrun process other than rank 0
        return RunResult(job.run_id, cfg, {}, ctx.extra, job.cached)
    if req.save_model is not None:   # written before the row completes: a completed run has its file
        ctx.extra["model_file"] = str(write_model(model, job, data, ddata, Path(req.save_model)))
    store.close_interrupted(cfg.config_hash(), job.run_id,
                            resumed="stage1_resumed_from_epoch" in ctx.extra or "stage2_resumed_from_epoch" in ctx.extra)
    store.complete_run(job.run_id, metrics=metrics, class_metrics=class_rows, curves=ctx.curves, extra=ctx.extra,
                       wall_seconds=own_seconds, stage1_cached=job.cached)
    summary: dict = {}
    for m in metrics:
        summary.setdefault(m["split"], {})[m["group"]] = m["top1"]
    return RunResult(job.run_id, cfg, summary, ctx.extra, job.cached)
