"""benchmarks.yaml and the fully resolved configuration of one run."""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from numbers import Real
from pathlib import Path

import yaml

from harness import HarnessError, schedules

AUGMENTATIONS = ("crop", "flip", "autoaugment", "cutout", "rrc", "jitter")  # '+'-joined in a recipe

BENCHMARK_KEYS = {"rhos", "backbone", "metric", "generator", "val_per_class", "presets", "methods", "references",
                  "augmentation"}
TOP_KEYS = {"version", "recipes", "protocols", "benchmarks"}
ANCHOR_SUFFIXES = ("_methods", "_references")  # top-level lists/maps that exist only to be aliased
# a preset runs every recipe for the same fraction of its own epochs: methods whose recipes count
# epochs differently (BALMS: 13k iterations at batch 512, 4,334 epochs on Fashion-MNIST-LT) keep
# their budgets in the paper's proportion, where one epoch count for all starved them
PRESET_KEYS = {"stage1_fraction", "stage2_fraction"}
RETIRED_PRESET_KEYS = {"stage1_epochs": "stage1_fraction", "stage2_epochs": "stage2_fraction"}


def benchmarks_path(explicit: str | os.PathLike | None = None) -> Path:
    """--benchmarks (or $HARNESS_BENCHMARKS), which must exist; else ./benchmarks.yaml; else
    the copy installed with the package (the repository's, shipped in the wheel)."""
    given = explicit or os.environ.get("HARNESS_BENCHMARKS")
    if given:
        if not Path(given).is_file():
            raise HarnessError(f"benchmarks file {given} does not exist; fix --benchmarks / HARNESS_BENCHMARKS "
                               "or leave both out for the installed benchmarks.yaml")
        return Path(given)
    for candidate in (Path("benchmarks.yaml"), Path(__file__).resolve().parent / "benchmarks.yaml"):
        if candidate.is_file():
            return candidate
    raise HarnessError("benchmarks.yaml not found; pass --benchmarks PATH or set HARNESS_BENCHMARKS")


def load_benchmarks(explicit: str | os.PathLike | None = None) -> dict:
    path = benchmarks_path(explicit)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise HarnessError(f"{path} is not a text (UTF-8) file; pass the benchmarks.yaml you meant") from None
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))   # libyaml's: 5x faster
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HarnessError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), dict):
        raise HarnessError(f"{path} has no 'benchmarks:' mapping")
    unknown = {k for k in doc if k not in TOP_KEYS and not str(k).endswith(ANCHOR_SUFFIXES)}
    if unknown:
        raise HarnessError(f"{path}: unknown top-level keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    for name, bench in doc["benchmarks"].items():
        if not isinstance(bench, dict):
            raise HarnessError(f"{path}: benchmark '{name}' must be a mapping")
        extra = set(bench) - BENCHMARK_KEYS
        if extra:
            raise HarnessError(f"{path}: benchmark '{name}' has unknown keys {sorted(extra)}; "
                               f"known: {sorted(BENCHMARK_KEYS)}")
        for preset, values in (bench.get("presets") or {}).items():
            where = f"{path}: preset '{preset}' of '{name}'"
            retired = sorted(set(values or {}) & set(RETIRED_PRESET_KEYS))
            if retired:
                key = retired[0]
                raise HarnessError(f"{where}: {key} (one epoch count for every method) is replaced by "
                                   f"{RETIRED_PRESET_KEYS[key]}, the fraction of each recipe's epochs it runs: "
                                   f"{key}: 40 of 200-epoch recipes is {RETIRED_PRESET_KEYS[key]}: 0.2")
            bad = set(values or {}) - PRESET_KEYS
            if bad:
                raise HarnessError(f"{where} has unknown keys {sorted(bad)}; known: {sorted(PRESET_KEYS)}")
            for key, value in (values or {}).items():
                if not isinstance(value, Real) or isinstance(value, bool) or not 0 < value <= 1:
                    raise HarnessError(f"{where}: {key} must be a number in (0, 1], the fraction of each "
                                       f"recipe's epochs, got {value!r}")
    doc["_path"] = str(path)
    return doc


def benchmark(doc: dict, dataset: str) -> dict:
    try:
        return doc["benchmarks"][dataset]
    except KeyError:
        raise HarnessError(f"dataset '{dataset}' has no entry in {doc['_path']}; "
                           f"benchmarks there: {', '.join(sorted(doc['benchmarks']))}") from None


def preset_epochs(stage: dict, fraction: float) -> int:
    """A stage's epochs under a preset: the fraction of the recipe's own, at least one."""
    return max(1, round(stage["epochs"] * fraction))


def scale_stage(stage: dict, epochs: int) -> dict:
    """The same recipe over `epochs` epochs: warm-up, step epochs and every `*_epoch` key
    (DRW's start) scale proportionally."""
    out = copy.deepcopy(stage)
    base = stage["epochs"]
    if epochs == base:
        return out
    factor = epochs / base

    def scaled(at):   # an epoch the recipe names keeps its place; 0 (from the start) stays 0
        return max(1, round(at * factor)) if at else 0

    out["epochs"] = epochs
    sched = out.get("schedule", {})
    if sched.get("warmup_epochs"):
        least = 2 if sched.get("kind") == "warmup-cosine" else 1
        sched["warmup_epochs"] = max(least, round(sched["warmup_epochs"] * factor))
    if "steps" in sched:
        sched["steps"] = [[scaled(at), value] for at, value in sched["steps"]]
    for key in [k for k in out if k.endswith("_epoch")]:
        out[key] = scaled(out[key])
    out["paper_epochs"] = base
    return out


def merged(base: dict, over: dict) -> dict:
    """`base` with `over` laid on top, mappings merged key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


STAGE_REQUIRED = {"epochs": int, "batch_size": int, "lr": Real, "momentum": Real, "weight_decay": Real,
                  "schedule": dict}
KIND_NAMES = {int: "an integer", Real: "a number", dict: "a mapping"}
PREFIX_KEYS = ("train_only", "fresh", "train_mode_only")   # dotted-name prefixes (harness.models.under)
# what reads a stage: engine.TrainSpec.RECIPE_KEYS, the runner (bn_mode, the prefixes) and a preset's
# record of the paper's epochs; a method's own stage keys end in _epoch (DRW's drw_epoch), which
# presets scale. Any other key is a typo the run would silently train without.
STAGE_KEYS = {*STAGE_REQUIRED, "nesterov", "per_class", "shuffle_batch", "epoch_steps", "bn_mode", "paper_epochs",
              *PREFIX_KEYS}


UNDOABLE = {"backbone", "generator"}   # the run choices a deviation's `unless` may name


def check_recipe(recipe, where: str) -> None:
    """A one-line error for a recipe the engine could not run, before anything is written."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stage1"), dict):
        raise HarnessError(f"{where}: a recipe needs a 'stage1' mapping")
    for stage in ("stage1", "stage2"):
        if stage not in recipe:
            continue
        values = recipe[stage]
        for key in values if isinstance(values, dict) else []:
            if key not in STAGE_KEYS and not str(key).endswith("_epoch"):
                near = difflib.get_close_matches(str(key), sorted(STAGE_KEYS), n=1)
                raise HarnessError(f"{where}: unknown key {stage}.{key}" + (f" (did you mean {near[0]}?)" if near else "")
                                   + f"; a stage reads {', '.join(sorted(STAGE_KEYS))} and a method's *_epoch keys "
                                   "(its other keys go beside stage1)")
        for key, kind in STAGE_REQUIRED.items():
            value = values.get(key) if isinstance(values, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise HarnessError(f"{where}: {stage}.{key} must be {KIND_NAMES[kind]}, got {value!r}")
        if values["epochs"] < 1 or values["batch_size"] < 1 or values["lr"] <= 0 or values["weight_decay"] < 0:
            raise HarnessError(f"{where}: {stage} needs epochs >= 1, batch_size >= 1, lr > 0 and weight_decay >= 0")
        schedules.check(values["schedule"], f"{where}: {stage}.schedule")
        for key in PREFIX_KEYS:   # a bare string would be read as its characters, each a prefix
            prefixes = values.get(key, [])
            if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
                raise HarnessError(f"{where}: {stage}.{key} must be a list of module-name prefixes "
                                   f"(e.g. [body.layer4.2., fc.]), got {prefixes!r}")
        if values.get("bn_mode", "train") not in ("train", "eval"):
            raise HarnessError(f"{where}: {stage}.bn_mode must be train or eval, got {values['bn_mode']!r}")
        warm = values["schedule"].get("warmup_epochs", 0)
        if values["schedule"]["kind"] == "warmup-cosine" and warm >= values["epochs"]:
            raise HarnessError(f"{where}: {stage} warms up for {warm} of its {values['epochs']} epochs; "
                               "give it more epochs")
    for entry in recipe.get("deviations", []):
        if not (isinstance(entry, str) or isinstance(entry, dict) and isinstance(entry.get("text"), str)
                and isinstance(entry.get("unless", {}), dict) and set(entry.get("unless", {})) <= UNDOABLE):
            raise HarnessError(f"{where}: a deviation is a string or {{text: ..., unless: {{backbone|generator: "
                               f"value}}}}, got {entry!r}")
    tokens = str(recipe.get("augmentation", "")).split("+")
    unknown = [t for t in tokens if t and t not in AUGMENTATIONS]
    if unknown:
        raise HarnessError(f"{where}: unknown augmentation {unknown}; known: {', '.join(AUGMENTATIONS)}")


def check_epochs(recipe: dict, where: str) -> None:
    """The epochs a recipe names as written lie inside their stage: a milestone, warm-up or DRW start
    at or past a stage's last epoch would never act, and the run would train without it and say
    nothing. (A preset's scaling may round one onto the last epoch of a short stage; it is checked
    before.)"""
    for stage in ("stage1", "stage2"):
        values = recipe.get(stage)
        if values is None:
            continue
        epochs, sched = values["epochs"], values["schedule"]
        named = [(f"{stage}.schedule.steps epoch", at) for at, _ in sched.get("steps", [])]
        if sched["kind"] == "warmup-step" and sched.get("warmup_epochs"):
            named.append((f"{stage}.schedule.warmup_epochs", sched["warmup_epochs"]))
        named += [(f"{stage}.{key}", value) for key, value in values.items() if str(key).endswith("_epoch")]
        for name, at in named:
            if not isinstance(at, Real) or isinstance(at, bool) or not 0 <= at < epochs:
                raise HarnessError(f"{where}: {name} {at!r} is not an epoch of {stage}'s 0 ... {epochs - 1}; "
                                   f"move it inside, or give {stage} more epochs")
        milestones = [at for at, _ in sched.get("steps", [])]
        if milestones != sorted(milestones):
            raise HarnessError(f"{where}: {stage}.schedule.steps must be in epoch order, got {milestones}")


PRECISIONS = ("fp32", "bf16")


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
    # the arithmetic of forward passes, fp32 or bf16 (autocast); None: the device's default
    # (harness.engine.precision_on: bf16 on CUDA, fp32 on the CPU)
    precision: str | None = None
    # what the benchmarks file's recipe changes of the shipped one's (shipped_changes): recorded
    # with the run and named on its board row, no part of the config or its hash
    recipe_changes: str | None = None

    def to_dict(self) -> dict:
        """The stored config, which the hash covers. A run at its device's default precision
        stores none, as every run did before the choice existed, and so keeps their hash."""
        out = asdict(self)
        del out["recipe_changes"]
        if out["precision"] is None:
            del out["precision"]
        return out

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def resolve(doc: dict, *, settings: dict | None = None, **choices) -> RunConfig:
    """The full configuration of one run (`resolved`) with the command line's recipe settings
    (`--set`), and what its recipe changes of the shipped benchmarks.yaml's, where `doc` is
    another file or settings change it."""
    cfg = written = resolved(doc, **choices)
    if settings:
        cfg = with_settings(written, settings, f"{doc['_path']}: {written.dataset} / {written.method}")
    return replace(cfg, recipe_changes=shipped_changes(doc, cfg, written, choices))


def resolved(doc: dict, *, method: str, dataset: str, rho: float, seed: int, preset: str,
             epochs: int | None = None, generator: str | None = None, backbone: str | None = None,
             val_per_class: int | None = None, method_default_recipe: dict | None = None,
             default_augmentation: str = "crop+flip", precision: str | None = None) -> RunConfig:
    """The full configuration of one run: the benchmark's recipe for the method, its
    `by_rho` overrides for this ratio, the preset's budget, and the command line's
    choices. A method with no recipe on the benchmark takes CE's, and says so in the
    recipe's `deviations` (stored with the run, shown by `harness list recipes`)."""
    bench = benchmark(doc, dataset)
    presets = bench.get("presets") or {"paper": {}}
    if preset not in presets:
        raise HarnessError(f"unknown preset '{preset}' for {dataset}; known presets: {', '.join(presets)}")
    if not math.isfinite(rho) or rho < 1:
        raise HarnessError(f"imbalance ratio rho must be a finite number >= 1, got {rho}; pass e.g. --rho 100")
    if not 0 <= seed < 2**32:
        raise HarnessError(f"seed must be >= 0 and < 2**32, got {seed}")
    if epochs is not None and epochs < 1:
        raise HarnessError(f"--epochs must be >= 1, got {epochs}")
    if val_per_class is not None and val_per_class < 0:
        raise HarnessError(f"--val-per-class must be >= 0, got {val_per_class}")
    if precision not in (None, *PRECISIONS):
        raise HarnessError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    methods = bench.get("methods") or {}
    recipe, fallback = methods.get(method) or method_default_recipe, []
    if recipe is None:
        recipe = methods.get("ce")
        fallback = [f"no recipe for '{method}' on {dataset}: CE's recipe is used"]
    if recipe is None:
        raise HarnessError(f"no recipe for method '{method}' on {dataset} in {doc['_path']}")
    recipe = copy.deepcopy(recipe)
    by_rho = recipe.pop("by_rho", None) or {}
    recipe = merged(recipe, by_rho.get(rho) or {})
    recipe.setdefault("augmentation", bench.get("augmentation", default_augmentation))
    if fallback:
        recipe["deviations"] = recipe.get("deviations", []) + fallback
    recipe_backbone = recipe.pop("backbone", None)
    check_recipe(recipe, f"{doc['_path']}: {dataset} / {method}")
    check_epochs(recipe, f"{doc['_path']}: {dataset} / {method}")
    generator = generator or bench.get("generator", "ldam")
    backbone = backbone or recipe_backbone or bench["backbone"]
    recipe["deviations"] = deviations_of(recipe, backbone=backbone, generator=generator)
    if not recipe["deviations"]:
        del recipe["deviations"]
    fractions = presets[preset] or {}
    stage1_epochs = preset_epochs(recipe["stage1"], fractions.get("stage1_fraction", 1))
    recipe["stage1"] = scale_stage(recipe["stage1"], epochs or stage1_epochs)
    if "stage2" in recipe:
        recipe["stage2"] = scale_stage(recipe["stage2"], preset_epochs(recipe["stage2"],
                                                                       fractions.get("stage2_fraction", 1)))
    check_recipe(recipe, f"{dataset} / {method} at {recipe['stage1']['epochs']} epochs")
    if epochs and epochs != stage1_epochs:
        preset = f"{preset}-e{epochs}"  # a custom budget is its own board, never ranked with the preset
    return RunConfig(
        method=method, dataset=dataset, rho=float(rho), seed=int(seed), preset=preset,
        generator=generator, backbone=backbone,
        val_per_class=int(bench.get("val_per_class", 20) if val_per_class is None else val_per_class),
        recipe=recipe, precision=precision,
    )


SHIPPED_BENCHMARKS = (Path(__file__).parent / "benchmarks.yaml").resolve()   # the repository's, in the wheel


MISSING = object()   # a key one config has and the other lacks


def shipped_changes(doc: dict, cfg: RunConfig, written: RunConfig, choices: dict) -> str | None:
    """What `cfg` (resolved from a benchmarks file other than the shipped one: --benchmarks,
    HARNESS_BENCHMARKS, an ablation's copy; or with --set) changes of the shipped file's config
    for the same choices, as "key value (shipped value)" in key order; None where nothing
    changes. `written` is `doc`'s own config before --set: the shipped one where `doc` is the
    shipped file, and the baseline, "key value (was value)", where the shipped file has no
    recipe to hold it against (a dataset of its own). Deviations are words, not training: not
    compared."""
    shipped, label = written, "shipped"
    if Path(doc["_path"]).resolve() != SHIPPED_BENCHMARKS:
        label = "was"   # unless the shipped file holds a recipe for these choices
        if SHIPPED_BENCHMARKS.is_file():
            try:
                shipped = resolved(read_once(SHIPPED_BENCHMARKS, SHIPPED_BENCHMARKS.stat().st_mtime_ns), **choices)
                label = "shipped"
            except HarnessError:
                pass
    if shipped is cfg:   # the shipped recipe itself, nothing --set: nothing changed
        return None

    def compared(c: RunConfig) -> dict:
        setup = {k: v for k, v in c.to_dict().items() if k not in ("seed", "recipe")}
        return {**setup, **flat({k: v for k, v in c.recipe.items() if k != "deviations"})}

    ours, theirs = compared(cfg), compared(shipped)
    changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k, MISSING) != theirs.get(k, MISSING))
    shown = lambda value: json.dumps(value) if value is not MISSING else "—"  # noqa: E731
    return ", ".join(f"{k} {shown(ours.get(k, MISSING))} ({label} {shown(theirs.get(k, MISSING))})"
                     for k in changed) or None


@functools.lru_cache(maxsize=1)
def read_once(path: Path, mtime_ns: int) -> dict:
    """A benchmarks file read once per version of it (`resolved` only reads the document)."""
    return load_benchmarks(path)


def deviations_of(recipe: dict, **run) -> list[str]:
    """The recipe's deviations that hold for a run with these choices (backbone, generator):
    an entry {text, unless: {backbone: resnet34-cifar}} is one the command line can undo.
    Without choices, every deviation's text (what `harness list recipes` shows)."""
    out = []
    for entry in recipe.get("deviations", []):
        if isinstance(entry, str):
            out.append(entry)
        elif not any(run.get(key) == value for key, value in entry.get("unless", {}).items()):
            out.append(entry["text"])
    return out


def describe_stage(stage: dict | None) -> str:
    """One line for a stage: '200 ep, batch 128, lr 0.1, wd 0.0002, warmup-step'."""
    if not stage:
        return "—"
    schedule = stage.get("schedule", {})
    kind = schedule.get("kind", "?") + (f" ({schedule['step_at']})" if "step_at" in schedule else "")
    extra = [f"{k} {stage[k]}" for k in ("epoch_steps", *PREFIX_KEYS) if k in stage]
    return ", ".join([f"{stage.get('epochs')} ep", f"batch {stage.get('batch_size')}", f"lr {stage.get('lr')}",
                      f"wd {stage.get('weight_decay')}", kind, *extra])


def recipe_rows(doc: dict, dataset: str | None = None, method: str | None = None) -> list[list[str]]:
    """Every (dataset, method) recipe of benchmarks.yaml, with what it does not follow of the
    official code (`deviations`) and its per-ratio overrides."""
    rows = []
    for name, bench in doc["benchmarks"].items():
        if dataset and name != dataset:
            continue
        for method_name, recipe in (bench.get("methods") or {}).items():
            if method and method_name != method:
                continue
            per_rho = "; ".join(f"{rho}: " + ", ".join(f"{k} {v}" for k, v in sorted(flat(over).items()))
                                for rho, over in (recipe.get("by_rho") or {}).items())
            rows.append([name, method_name, recipe.get("backbone", bench.get("backbone", "")),
                         describe_stage(recipe.get("stage1")), describe_stage(recipe.get("stage2")),
                         recipe.get("augmentation", bench.get("augmentation", "dataset default")),
                         per_rho or "—", "; ".join(deviations_of(recipe)) or "—"])
    return rows


def recipe_values(doc: dict, dataset: str, method: str) -> list[list[str]]:
    """A method's recipe on a dataset as written (before a ratio's overrides and a preset's
    scaling), one dotted key per row: the keys `--set KEY=VALUE` changes."""
    methods = benchmark(doc, dataset).get("methods") or {}
    if method not in methods:
        raise HarnessError(f"{dataset} has no recipe for '{method}' in {doc['_path']}; "
                           f"its recipes: {', '.join(methods) or 'none'}")
    recipe = {k: v for k, v in methods[method].items() if k not in ("by_rho", "backbone")}
    return [[key, json.dumps(value)] for key, value in sorted(flat(recipe).items()) if not describes_the_paper(key)]


def trained_values(doc: dict, cfg: RunConfig, settings: dict) -> list[list[str]]:
    """The recipe `cfg` trains with, one dotted key per row: its value, and where that is not the
    value written for the method in `doc`, the written one and what changed it (--set, the
    ratio's `by_rho`, the preset's or --epochs' budget, a default the file does not write)."""
    written_recipe = (benchmark(doc, cfg.dataset).get("methods") or {}).get(cfg.method)
    by_rho = flat(((written_recipe or {}).get("by_rho") or {}).get(cfg.rho) or {})
    written = flat({k: v for k, v in (written_recipe or {}).items() if k not in ("by_rho", "backbone")})
    rows = []
    for key, value in sorted(flat(cfg.recipe).items()):
        if describes_the_paper(key):
            continue
        was = written.get(key, MISSING)
        if was == value:
            rows.append([key, json.dumps(value), "", ""])
            continue
        if key in settings:
            why = "--set"
        elif key in by_rho:
            why = f"rho {cfg.rho:g}"
        elif was is MISSING:
            why = "the benchmark's default" if written_recipe else "no recipe for it in the file"
        else:   # epochs and the milestones in them scale with the budget
            asked = re.search(r"-e(\d+)$", cfg.preset)   # resolved()'s label of --epochs N
            why = f"--epochs {asked[1]}" if asked and key.startswith("stage1.") else f"preset {cfg.preset}"
        rows.append([key, json.dumps(value), "—" if was is MISSING else json.dumps(was), why])
    return rows


def flat(mapping: dict, prefix: str = "") -> dict:
    """{"stage1": {"lr": 0.1}} -> {"stage1.lr": 0.1}"""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_keys(recipe: dict) -> set[str]:
    """The dotted keys of the values a run trains with (not of mappings, nor the words that say
    what the paper trains: deviations, paper_epochs): stage1.weight_decay, beta, ..."""
    return {key for key in flat(recipe) if not describes_the_paper(key)}


def describes_the_paper(key: str) -> bool:
    return key == "deviations" or key.endswith(".paper_epochs")


def with_overrides(cfg: RunConfig, overrides: dict, where: str) -> RunConfig:
    """The config with dotted recipe keys set (a tuning trial's values), checked again."""
    recipe = copy.deepcopy(cfg.recipe)
    unknown = [key for key in overrides if key not in recipe_keys(recipe)]
    if unknown:
        raise HarnessError(f"{', '.join(unknown)} not in the recipe of {where}; keys: "
                           f"{', '.join(sorted(recipe_keys(recipe)))}")
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = recipe
        for part in path:
            node = node[part]
        node[last] = value
    check_recipe(recipe, f"{where} with {overrides}")
    return replace(cfg, recipe=recipe)


def parse_setting(text: str) -> tuple[str, object]:
    """--set KEY=VALUE: the dotted recipe key and its value, a JSON value (5e-4, true, [1, 2])
    or else the text itself (cosine)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise HarnessError(f"--set takes KEY=VALUE, got '{text}'; pass e.g. --set stage1.weight_decay=5e-4")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw.strip()
    return key.strip(), value


def with_settings(cfg: RunConfig, settings: dict, where: str) -> RunConfig:
    """The config with the command line's recipe values (--set), each of the type the recipe
    holds there; the stage-1 budget is --epochs' (it scales the schedule with it)."""
    if "stage1.epochs" in settings:
        raise HarnessError("--set cannot change stage1.epochs; pass --epochs N (the schedule scales with it)")
    words = [key for key in settings if describes_the_paper(key)]
    if words:
        raise HarnessError(f"--set {words[0]}: it says what the paper trains, not what this run trains; "
                           "pass a key the run trains with")
    current = flat(cfg.recipe)
    for key, value in settings.items():
        if key in current and not same_kind(current[key], value):
            raise HarnessError(f"--set {key}={json.dumps(value)}: the recipe holds {json.dumps(current[key])} "
                               f"there; pass a value of that kind")
    cfg = with_overrides(cfg, settings, where)
    check_epochs(cfg.recipe, f"{where} with --set")
    return cfg


def same_kind(held, value) -> bool:
    """Whether `value` may replace `held` in a recipe: a number for a number (check_recipe wants
    whole ones where it counts), a flag for a flag, text for text, a list for a list; anything
    for null."""
    if held is None:
        return True
    if isinstance(held, bool) or isinstance(value, bool):
        return isinstance(held, bool) and isinstance(value, bool)
    if isinstance(held, Real):
        return isinstance(value, Real)
    return isinstance(value, type(held))


def has_key(recipe: dict, dotted: str) -> bool:
    node = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
