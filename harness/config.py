"""benchmarks.yaml and the fully resolved configuration of one run."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from harness import HarnessError

BENCHMARK_KEYS = {"rhos", "backbone", "metric", "generator", "val_per_class", "presets", "methods", "references"}
TOP_KEYS = {"version", "recipes", "benchmarks", "cifar_methods"}
PRESET_KEYS = {"stage1_epochs", "stage2_epochs"}


def benchmarks_path(explicit: str | os.PathLike | None = None) -> Path:
    """--benchmarks, else $HARNESS_BENCHMARKS, else ./benchmarks.yaml, else the repository's."""
    for candidate in (explicit, os.environ.get("HARNESS_BENCHMARKS"), "benchmarks.yaml",
                      Path(__file__).resolve().parent.parent / "benchmarks.yaml"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise HarnessError("benchmarks.yaml not found; pass --benchmarks PATH or set HARNESS_BENCHMARKS")


def load_benchmarks(explicit: str | os.PathLike | None = None) -> dict:
    path = benchmarks_path(explicit)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HarnessError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), dict):
        raise HarnessError(f"{path} has no 'benchmarks:' mapping")
    unknown = {k for k in doc if k not in TOP_KEYS and not str(k).endswith("_methods")}  # *_methods: anchors
    if unknown:
        raise HarnessError(f"{path}: unknown top-level keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    for name, bench in doc["benchmarks"].items():
        extra = set(bench) - BENCHMARK_KEYS
        if extra:
            raise HarnessError(f"{path}: benchmark '{name}' has unknown keys {sorted(extra)}; "
                               f"known: {sorted(BENCHMARK_KEYS)}")
        for preset, values in (bench.get("presets") or {}).items():
            bad = set(values or {}) - PRESET_KEYS
            if bad:
                raise HarnessError(f"{path}: preset '{preset}' of '{name}' has unknown keys {sorted(bad)}")
    doc["_path"] = str(path)
    return doc


def benchmark(doc: dict, dataset: str) -> dict:
    try:
        return doc["benchmarks"][dataset]
    except KeyError:
        raise HarnessError(f"dataset '{dataset}' has no entry in {doc['_path']}; "
                           f"benchmarks there: {', '.join(sorted(doc['benchmarks']))}") from None


def scale_stage(stage: dict, epochs: int) -> dict:
    """The same recipe over `epochs` epochs: warm-up and step epochs scale proportionally."""
    out = copy.deepcopy(stage)
    base = stage["epochs"]
    if epochs == base:
        return out
    factor = epochs / base
    out["epochs"] = epochs
    sched = out.get("schedule", {})
    if "warmup_epochs" in sched and sched["warmup_epochs"]:
        sched["warmup_epochs"] = max(1, round(sched["warmup_epochs"] * factor))
    if "steps" in sched:
        sched["steps"] = [[max(1, round(at * factor)), value] for at, value in sched["steps"]]
    out["paper_epochs"] = base
    return out


@dataclass(frozen=True)
class RunConfig:
    method: str
    dataset: str
    rho: float
    seed: int
    preset: str
    generator: str
    backbone: str
    val_per_class: int
    recipe: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def resolve(doc: dict, *, method: str, dataset: str, rho: float, seed: int, preset: str,
            epochs: int | None = None, generator: str | None = None, backbone: str | None = None,
            val_per_class: int | None = None, method_default_recipe: dict | None = None) -> RunConfig:
    bench = benchmark(doc, dataset)
    presets = bench.get("presets") or {"paper": {}}
    if preset not in presets:
        raise HarnessError(f"unknown preset '{preset}' for {dataset}; known presets: {', '.join(presets)}")
    if rho < 1:
        raise HarnessError(f"imbalance ratio rho must be >= 1, got {rho}; pass e.g. --rho 100")
    if seed < 0:
        raise HarnessError(f"seed must be >= 0, got {seed}")
    if epochs is not None and epochs < 1:
        raise HarnessError(f"--epochs must be >= 1, got {epochs}")
    methods = bench.get("methods") or {}
    recipe = methods.get(method) or method_default_recipe or methods.get("ce")
    if recipe is None:
        raise HarnessError(f"no recipe for method '{method}' on {dataset} in {doc['_path']}")
    recipe = copy.deepcopy(recipe)
    scale = presets[preset] or {}
    preset_epochs = scale.get("stage1_epochs") or recipe["stage1"]["epochs"]
    s1 = epochs or scale.get("stage1_epochs")
    if s1:
        recipe["stage1"] = scale_stage(recipe["stage1"], s1)
    if "stage2" in recipe and scale.get("stage2_epochs"):
        recipe["stage2"] = scale_stage(recipe["stage2"], scale["stage2_epochs"])
    if epochs and epochs != preset_epochs:
        preset = f"{preset}-e{epochs}"  # a custom budget is its own board, never ranked with the preset
    return RunConfig(
        method=method, dataset=dataset, rho=float(rho), seed=int(seed), preset=preset,
        generator=generator or bench.get("generator", "ldam"),
        backbone=backbone or bench["backbone"],
        val_per_class=int(bench.get("val_per_class", 20) if val_per_class is None else val_per_class),
        recipe=recipe,
    )
