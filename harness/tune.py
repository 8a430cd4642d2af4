"""`harness tune`: a method's hyper-parameters chosen on the validation split (DESIGN.md §9).

Optuna's TPE sampler (seeded) proposes values for dotted recipe keys; each trial is an
ordinary run of the harness, stored with `runs.study` set so that no leaderboard ranks
it, and scored by its validation top-1 alone (test numbers are stored, never read). The
study lives in Optuna's RDB storage in the results store's own database, so processes on
several machines pointed at one PostgreSQL URL work on one study, and a study that was
interrupted goes on with the trials it has. The best trial's values are then trained
with the requested seeds as preset `tuned` (`<preset>-tuned` for another budget than
paper), a board of its own, with the search in each run's provenance.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field, replace

from harness import HarnessError
from harness.config import recipe_keys
from harness.runner import RunRequest, RunStopped, asked_precision, data_name, execute, prepare

# Optuna's liveness check: a trial whose process has not beaten for GRACE_SECONDS is dead
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120
SPACE = re.compile(r"^\s*(loguniform|uniform|int|categorical)\((.*)\)\s*$")


@dataclass(frozen=True)
class Dimension:
    """One searched recipe key: `stage1.weight_decay=loguniform(1e-4,5e-2)`."""

    key: str
    kind: str
    values: tuple

    @classmethod
    def parse(cls, text: str) -> "Dimension":
        key, sep, space = text.partition("=")
        match = SPACE.match(space)
        if not sep or not key.strip() or not match:
            raise HarnessError(f"search space '{text}' is malformed; write KEY=loguniform(lo,hi), uniform(lo,hi), "
                               "int(lo,hi) or categorical(a,b,...)")
        kind, args = match.groups()
        values = tuple(parse_value(v) for v in args.split(",") if v.strip())
        if kind == "categorical":
            if not values:
                raise HarnessError(f"search space '{text}' lists no values")
        elif len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
            raise HarnessError(f"search space '{text}' needs two numbers lo < hi")
        elif kind == "loguniform" and values[0] <= 0:
            raise HarnessError(f"search space '{text}': loguniform needs lo > 0")
        elif kind == "int" and not all(float(v).is_integer() for v in values):
            raise HarnessError(f"search space '{text}': int needs whole numbers")
        return cls(key.strip(), kind, values)

    def suggest(self, trial):
        lo, hi = (self.values + (None, None))[:2]
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, lo, hi, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, lo, hi)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(lo), int(hi))
        return trial.suggest_categorical(self.key, list(self.values))

    def distribution(self):
        """What `suggest` draws from, for a trial added by hand (`reclaim_orphans`)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.values))
        lo, hi = self.values
        if self.kind == "int":
            return IntDistribution(int(lo), int(hi))
        return FloatDistribution(lo, hi, log=self.kind == "loguniform")

    @property
    def text(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.values))})"


def parse_value(text: str):
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class TuneRequest:
    run: RunRequest                    # method, dataset, rho, preset, data, store, device; seeds: the final runs'
    params: list[str] = field(default_factory=list)   # KEY=SPACE, on top of the method's declared tunables
    trials: int = 20
    study: str | None = None
    jobs: int = 1
    final: bool = True                 # train the chosen values with the requested seeds afterwards
    prune: bool = False                # stop trials whose val top-1 trails the others' (`pruner`)


def search_space(req: TuneRequest) -> list[Dimension]:
    """The method's declared space (from its paper) with the user's dimensions laid over it;
    every key must be one of the method's resolved recipe."""
    from harness.registry import METHODS

    method = METHODS.get(req.run.method)
    fixed = req.run.settings   # --set: held at its value, not searched
    space = {key: Dimension.parse(f"{key}={text}") for key, text in getattr(method, "tunables", {}).items()
             if key not in fixed}
    asked = {d.key: d for d in map(Dimension.parse, req.params)}
    both = [key for key in asked if key in fixed]
    if both:
        raise HarnessError(f"{', '.join(both)} is both searched (--param) and fixed (--set); pass it to one of them")
    space.update(asked)
    if not space:
        raise HarnessError(f"{req.run.method} declares no search space; pass --param KEY=SPACE "
                           "(e.g. stage1.weight_decay=loguniform(1e-4,5e-2))")
    _, spec, cfg = prepare(req.run, req.run.seeds[0])
    if not spec.holds_validation(cfg.generator, cfg.val_per_class):   # refused before a trial trains for nothing
        raise HarnessError("tuning scores trials on the validation split, and "
                           + (f"{spec.title} at --rho natural has none"
                              if cfg.generator == "natural" else
                              "--val-per-class 0 leaves none; pass --val-per-class N (N >= 1)"))
    known = recipe_keys(cfg.recipe)
    unknown = [key for key in space if key not in known]
    if unknown:
        raise HarnessError(f"{', '.join(unknown)} not in the recipe of {req.run.method} on {req.run.dataset}; "
                           f"keys: {', '.join(sorted(known))}")
    return list(space.values())


def study_name(req: TuneRequest, space: list[Dimension]) -> str:
    if req.study:
        return req.study
    r = req.run
    # a benchmark default overridden (backbone, generator, validation split, precision, a recipe
    # value --set) is another study; without overrides the name is what it always was, so stored
    # studies resume
    overridden = [[k, v] for k, v in (("generator", r.generator), ("backbone", r.backbone),
                                       ("val_per_class", r.val_per_class), ("precision", asked_precision(r)))
                  if v is not None]
    overridden += [["set", key, value] for key, value in sorted(r.settings.items())]
    # an image folder's trials are of that folder (the benchmarks' names are their data)
    folder = data_name(r)
    overridden += [["data", folder]] if folder else []
    digest = hashlib.sha256(json.dumps([[d.key, d.text] for d in space] + overridden).encode()).hexdigest()[:8]
    rho = r.rho if r.rho == "natural" else f"{float(r.rho):g}"
    return f"{r.method}-{r.dataset}-rho{rho}-{r.preset}-seed{r.seeds[0]}-{digest}"


def tuned_preset(preset: str) -> str:
    return "tuned" if preset == "paper" else f"{preset}-tuned"


def pruner(prune: bool, epochs: int):
    """Optuna's median rule: a trial whose val top-1 after an epoch is below the median of the
    earlier trials' at that epoch stops there, once 5 trials have finished and from half its
    epochs on (before a step-decay schedule's drops, accuracy says little of the end)."""
    import optuna

    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=epochs // 2)


def trial_epochs(run: RunRequest) -> int:
    """A trial's epochs over both stages: the steps its val top-1 is reported at."""
    _, _, cfg = prepare(run, run.seeds[0])
    return sum(cfg.recipe[stage]["epochs"] for stage in ("stage1", "stage2") if stage in cfg.recipe)


def open_study(url: str, name: str, seed: int, prune_rule=None):
    """The study in Optuna's RDB storage in the store's database (created or loaded); trials
    are pruned by `prune_rule` (a pruner is not stored with the study: each process brings it)."""
    try:
        import optuna
    except ImportError:
        raise HarnessError("harness tune needs Optuna, a dependency of ltr-harness: pip install optuna") \
            from None
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    for attempt in range(5):  # processes starting together race to create Optuna's tables: the loser retries
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
            return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=seed), pruner=prune_rule)
        except (SQLAlchemyError, RuntimeError, ValueError) as exc:
            if attempt < 4 and isinstance(exc, SQLAlchemyError):
                time.sleep(0.5 + random.random())
                continue
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise HarnessError(f"results store {url} cannot hold the study: {reason}") from exc


def objective(req: TuneRequest, space: list[Dimension], name: str):
    """A trial: one run at the proposed values, scored on validation top-1 only; with pruning,
    its val top-1 after every epoch goes to the pruner, which may stop it there."""
    import optuna

    class TrialPruned(optuna.TrialPruned, RunStopped):
        """Optuna's pruned trial, a run stopped on purpose for the runner."""

    def run_trial(trial) -> float:
        params = {d.key: d.suggest(trial) for d in space}

        def on_epoch(run_id: str, epoch: int, val_top1: float) -> None:
            trial.report(val_top1, epoch)
            if trial.should_prune():
                raise TrialPruned(f"val top-1 {val_top1:.2f} after epoch {epoch + 1} is below the median "
                                  "of the earlier trials there")
        run = replace(req.run, seeds=req.run.seeds[:1], overrides=params, study=name, progress=False, save_model=None,
                      extra={"trial": {"number": trial.number, "params": params}},
                      on_epoch=on_epoch if req.prune else None)
        [result] = execute(run)
        value = result.metrics.get("val", {}).get("all")   # no "val": the data has no validation images
        if value is None or not math.isfinite(value):
            raise HarnessError("a trial has no validation accuracy; tuning needs a validation split (--val-per-class)")
        return value
    return run_trial


def complete_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def finished_trials(study) -> list:
    """What `--trials` counts: complete trials, and trials the pruner stopped."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def trial_line(trial) -> str:
    if trial.state.name == "COMPLETE":   # a pruned trial has a value too: its last reported one
        return f"trial {trial.number}: val top-1 {trial.value:.2f} at {trial.params}"
    last = trial.last_step
    reached = "" if last is None else f" after epoch {last + 1} (val top-1 {trial.intermediate_values[last]:.2f})"
    return f"trial {trial.number}: {trial.state.name.lower()}{reached} at {trial.params}"


def reclaim_orphans(study, space: list[Dimension], name: str, store, report=print) -> int:
    """Trial runs the store completed but the study never recorded (the process died between
    the run's row and Optuna's): added to the study as complete trials with their validation
    top-1, so that their training counts. Returns how many."""
    import optuna
    from sqlalchemy import select

    from harness.store import Metric, Run

    recorded_numbers = {t.number for t in complete_trials(study)}
    recorded_runs = {t.user_attrs["run_id"] for t in study.trials if "run_id" in t.user_attrs}   # added back before
    with store.session() as s:
        rows = s.execute(select(Run.id, Run.extra, Metric.top1).join(Metric).where(
            Run.study == name, Run.status == "completed", Metric.split == "val", Metric.group == "all")).all()
    added = 0
    for run_id, extra, val_top1 in sorted(rows, key=lambda row: row[1]["trial"]["number"]):
        if run_id in recorded_runs or extra["trial"]["number"] in recorded_numbers or val_top1 is None:
            continue
        study.add_trial(optuna.trial.create_trial(
            params=extra["trial"]["params"], distributions={d.key: d.distribution() for d in space},
            value=val_top1, user_attrs={"run_id": run_id}))
        report(f"trial {extra['trial']['number']}: its run {run_id} completed, unrecorded by the study: "
               f"added with val top-1 {val_top1:.2f}")
        added += 1
    return added


def close_dead_trials(study, name: str, store, report=print) -> None:
    """Trials whose heartbeat stopped (their process was killed mid-training) are failed in the
    study, as Optuna does before each trial it starts, and their `running` rows with them."""
    import optuna

    optuna.storages.fail_stale_trials(study)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
    for run_id in store.fail_dead_trials(name, failed):
        report(f"run {run_id}: its trial's process died mid-training; marked failed")


def study_lock(store, name: str):
    """The lock under which processes working on study `name` take turns (settle, search_number)."""
    return store.exclusive(f"harness tune {name}")


def settle(url: str, name: str, space: list[Dimension], seed: int, store, report=print) -> None:
    """Settle what killed `harness tune` processes left of the study before this one searches,
    under the study's lock, so that processes starting together settle each thing once: dead
    trials and their rows fail (`close_dead_trials`); runs that completed unrecorded are added
    back (`reclaim_orphans`)."""
    with study_lock(store, name):
        study = open_study(url, name, seed)
        close_dead_trials(study, name, store, report)
        reclaim_orphans(study, space, name, store, report)


def search_number(url: str, name: str, store) -> int:
    """This search's place among every search of the study (0 for the first), taken under the
    study's lock. A search samples with seed + its number: searches sharing one seed, parallel
    or one after another, would each propose the values of the first (its startup draws)."""
    with study_lock(store, name):
        study = open_study(url, name, 0)
        number = study.user_attrs.get("searches", 0)
        study.set_user_attr("searches", number + 1)
    return number


def run_search(req: TuneRequest, space: list[Dimension], name: str, url: str, report=print):
    """Trials until the study holds `req.trials` finished ones (complete or pruned; those of
    earlier or parallel processes count); returns the study. After each trial, rows of trials
    that died meanwhile (killed within the grace period before this search began) are closed."""
    import optuna

    from harness.store import Store

    with Store(url) as store:
        seed = req.run.seeds[0] + search_number(url, name, store)
    study = open_study(url, name, seed, pruner(req.prune, trial_epochs(req.run)))
    done = len(finished_trials(study))
    report(f"study {name}: {done} of {req.trials} trials done")
    if done >= req.trials:
        return study
    stop = optuna.study.MaxTrialsCallback(req.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                              optuna.trial.TrialState.PRUNED))
    with Store(url) as store:
        def after(study, trial) -> None:
            report(trial_line(trial))
            close_dead_trials(study, name, store, report)
        study.optimize(objective(req, space, name), callbacks=[stop, after], catch=())
    return study


def search_worker(req: TuneRequest, space: list[Dimension], name: str, url: str) -> None:
    run_search(req, space, name, url, report=lambda line: None)


def tune(req: TuneRequest, report=print) -> dict:
    """Validate everything, search, then train the best values with the requested seeds."""
    from harness.store import Store, db_url

    if req.trials < 1:
        raise HarnessError(f"--trials must be >= 1, got {req.trials}")
    if req.jobs < 1:
        raise HarnessError("--jobs must be >= 1")
    space = search_space(req)
    name = study_name(req, space)
    url = db_url(req.run.db)
    with Store(url) as store:   # an unusable store is refused here, before a study is made
        settle(url, name, space, req.run.seeds[0], store, report)   # before any worker
    if req.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(req.jobs, mp_context=get_context("spawn")) as pool:
            for future in [pool.submit(search_worker, req, space, name, url) for _ in range(req.jobs)]:
                future.result()
    study = run_search(req, space, name, url, report)
    best = study.best_trial
    tuning = {"study": name, "objective": "val top-1", "n_trials": len(complete_trials(study)),
              **({"n_pruned": len(finished_trials(study)) - len(complete_trials(study))} if req.prune else {}),
              "space": {d.key: d.text for d in space}, "chosen": best.params, "best_trial": best.number,
              "best_val_top1": best.value}
    report(f"chosen (trial {best.number}, val top-1 {best.value:.2f}): {best.params}")
    if req.final:
        final = replace(req.run, overrides=best.params, preset_label=tuned_preset(req.run.preset),
                        extra={"tuning": tuning})
        results = execute(final)
        tuning["runs"] = [r.run_id for r in results]
        tuning["results"] = [r.metrics["test"] for r in results]
    return tuning
