"""Leaderboards from the store: pandas tables -> Jinja2 (HTML), tabulate (Markdown,
terminal), CSV, LaTeX and the Papers-with-Code sota-extractor JSON.

A board is one (dataset, rho, preset): results of different presets are never
ranked together, and trials of a hyper-parameter search (runs.study set) never at all.
Seeds are aggregated here, at report time (mean, sample std, n), per method and setup
(backbone, generator, epochs, augmentation): the setup a paper reference is compared with.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, or_, select, true
from tabulate import tabulate

from harness import HarnessError
from harness.config import load_benchmarks
from harness.formatting import fmt
from harness.report_plots import (PER_CLASS, RELIABILITY, TAU_SWEEP, TUNING, WEIGHT_NORMS, PlotCache, PlotJob,
                                  Rendering, data_uri, default_cache)
from harness.report_protocol import (DEFAULT_AUGMENTATION, SETUP, Reference, closest_differences, compare,
                                     our_protocol, readable)
from harness.store import ClassMetric, CurvePoint, Metric, Run, Store

GROUPS = ("all", "many", "medium", "few")
TASK = "Long-tail Learning"
METRIC_NAMES = {"top1": "Top-1 Accuracy", "error": "Error Rate", "ece": "ECE"}
BOARD_KEY = ["dataset", "data", "rho", "preset"]   # data: which folder, for a dataset that is the user's (else "")
ROW_KEY = ["method", *SETUP]       # a board row: one method on one setup
RANKED = and_(Run.status == "completed", Run.study.is_(None))
# a study's chosen setting, retrained: preset tuned, or <preset>-tuned for another budget (harness.tune)
TUNED_PRESETS = or_(Run.preset == "tuned", Run.preset.like("%-tuned"))
# the folder a folder-lt run read (harness.streaming.folder_name), "" for a registered benchmark's
BOARD_DATA = func.coalesce(Run.extra["data_name"].as_string(), "")
PLOT_ORDER = (PER_CLASS, WEIGHT_NORMS, RELIABILITY, TAU_SWEEP, TUNING)


# ---------------------------------------------------------------- loading

@dataclass(frozen=True)
class Selection:
    """The boards to render (`harness report --dataset/--rho/--preset`); an empty field keeps all."""
    datasets: tuple[str, ...] = ()
    rhos: tuple[float, ...] = ()
    presets: tuple[str, ...] = ()

    def where(self):
        """The runs of the selected boards, as an SQL condition. A ratio matches as the boards
        print it (six significant digits), so a dataset's natural ratio is found by what is shown."""
        return and_(Run.dataset.in_(self.datasets) if self.datasets else true(),
                    or_(*(Run.rho.between(r * (1 - 1e-5), r * (1 + 1e-5)) for r in self.rhos))
                    if self.rhos else true(),
                    Run.preset.in_(self.presets) if self.presets else true())

    def __str__(self) -> str:
        return " ".join([*(f"--dataset {d}" for d in self.datasets), *(f"--rho {r:g}" for r in self.rhos),
                         *(f"--preset {p}" for p in self.presets)])


EVERY_BOARD = Selection()


def counted_runs(only: Selection = EVERY_BOARD):
    """The runs the boards count, as a subquery of their ids, board keys and setups: completed,
    no trials, of the selected boards, and of a seed run again on one setup (a fixed recipe, a
    rerun) only its latest.
    The tables, the per-class plots and the τ sweep all read these, so a plot never averages in
    a superseded run or another setup's. Recipe fields come out of the stored config by SQL JSON
    paths, which SQLite, PostgreSQL and MySQL all evaluate; a run that recorded no augmentation
    trained with the default."""
    epochs = Run.config[("recipe", "stage1", "epochs")].as_integer()
    augmentation = func.coalesce(Run.config[("recipe", "augmentation")].as_string(), DEFAULT_AUGMENTATION)
    # a run from before the precision was recorded computed in its device's default
    precision = func.coalesce(Run.extra["precision"].as_string(),
                              case((Run.device.like("%cpu (%"), "fp32"), else_="bf16"))
    tau_chosen_on = Run.extra["tau_selected_on"].as_string()   # τ-norm, post-hoc LA: val, or test without one
    recipe = Run.extra["recipe_changes"].as_string()   # None: the shipped benchmarks.yaml's recipe
    newest_first = func.row_number().over(
        partition_by=[Run.dataset, BOARD_DATA, Run.rho, Run.preset, Run.method, Run.backbone, Run.generator, epochs,
                      augmentation, recipe, precision, tau_chosen_on, Run.seed],
        order_by=[Run.finished_at.desc(), Run.id.desc()])
    runs = select(Run.id, Run.dataset, BOARD_DATA.label("data"), Run.rho, Run.preset, Run.method, Run.backbone,
                  Run.generator, epochs.label("epochs"), augmentation.label("augmentation"), recipe.label("recipe"),
                  precision.label("precision"), tau_chosen_on.label("tau_chosen_on"),
                  newest_first.label("newest_first")).where(RANKED, only.where()).subquery()
    return select(runs).where(runs.c.newest_first == 1).subquery("counted")


def load_results(store: Store, only: Selection = EVERY_BOARD) -> pd.DataFrame:
    """One row per counted run: its setup, test top-1 per shot group (top1_all ... top1_few), test
    ECE (ece_all; NULL where not measured) and compute, in one query."""
    counted = counted_runs(only)
    top1 = [func.max(case((Metric.group == g, Metric.top1))).label(f"top1_{g}") for g in GROUPS]
    ece = func.max(case((Metric.group == "all", Metric.ece))).label("ece_all")
    query = (select(Run.id, Run.method, Run.dataset, counted.c.data, Run.rho, Run.backbone, Run.generator, Run.seed,
                    Run.preset, Run.finished_at, Run.wall_seconds, Run.device, Run.git_commit, Run.stage1_cached,
                    counted.c.epochs, counted.c.augmentation, counted.c.recipe, counted.c.precision,
                    counted.c.tau_chosen_on,
                    Run.extra["stage1_seconds"].as_float().label("stage1_seconds"), *top1, ece)
             .join(counted, counted.c.id == Run.id)
             .outerjoin(Metric, and_(Metric.run_id == Run.id, Metric.split == "test"))
             .group_by(Run.id, counted.c.data, counted.c.epochs, counted.c.augmentation, counted.c.recipe,
                       counted.c.precision, counted.c.tau_chosen_on))
    with store.engine.connect() as con:
        df = pd.read_sql(query, con)
    if df.empty:
        return df
    df["epochs"] = df["epochs"].astype("Int64")
    # compute spent on this result: its own wall time plus a reused stage 1's
    reused = df["stage1_seconds"].fillna(0.0).where(df["stage1_cached"] == 1, 0.0)
    df["minutes"] = (df["wall_seconds"].fillna(0) + reused) / 60.0
    df["gpu"] = ~df["device"].str.contains(r"\bcpu\b", regex=True)   # any other device is an accelerator
    df["finished_at"] = pd.to_datetime(df["finished_at"], utc=True)
    return df.sort_values("finished_at", kind="stable").reset_index(drop=True)


def load_class_means(store: Store, only: Selection = EVERY_BOARD) -> pd.DataFrame:
    """Per board, method, setup and class: the training count and, averaged in SQL over the
    counted runs' seeds, test accuracy and classifier weight norm."""
    counted = counted_runs(only)
    keys = (*(counted.c[k] for k in BOARD_KEY + ROW_KEY), ClassMetric.class_index)
    query = (select(*keys, func.min(ClassMetric.train_count).label("train_count"),
                    func.avg(ClassMetric.accuracy).label("accuracy"),
                    func.avg(ClassMetric.weight_norm).label("weight_norm"))
             .join(counted, counted.c.id == ClassMetric.run_id).group_by(*keys).order_by(*keys))
    with store.engine.connect() as con:
        return pd.read_sql(query, con)


def load_curves(store: Store, kind: str, only: Selection = EVERY_BOARD) -> pd.DataFrame:
    """Per board and row, a curve (split, group, x -> value) averaged over its counted runs: the
    τ sweep ("tau_sweep"), the test reliability diagram ("reliability", where the runs have one)."""
    counted = counted_runs(only)
    keys = (*(counted.c[k] for k in BOARD_KEY + ROW_KEY), CurvePoint.split, CurvePoint.group, CurvePoint.x)
    query = (select(*keys, func.avg(CurvePoint.value).label("value"))
             .join(counted, counted.c.id == CurvePoint.run_id).where(CurvePoint.kind == kind)
             .group_by(*keys).order_by(*keys))
    with store.engine.connect() as con:
        return pd.read_sql(query, con)


@dataclass
class Study:
    """The hyper-parameter search whose chosen setting a tuned run retrained."""
    method: str
    name: str
    objective: str
    n_trials: int | None
    n_pruned: int               # trials the pruner stopped (`harness tune --prune`): counted, never chosen
    space: dict
    chosen: dict
    trials: pd.DataFrame        # number, objective: its completed trials in the store


def load_studies(store: Store, only: Selection = EVERY_BOARD) -> dict[tuple, list[Study]]:
    """Per tuned board, the studies its counted runs name in extra["tuning"] (a study whose
    chosen setting was retrained again after another search is not behind the board), each with
    its trials' objective (validation top-1) by trial number (extra["trial"]["number"])."""
    counted = counted_runs(only)
    with store.engine.connect() as con:
        tuned = pd.read_sql(select(Run.dataset, counted.c.data, Run.rho, Run.preset, Run.method,
                                   Run.extra["tuning"].label("tuning"))
                            .join(counted, counted.c.id == Run.id).where(TUNED_PRESETS).order_by(Run.method), con)
        tuned = tuned[tuned["tuning"].map(lambda t: isinstance(t, dict) and "study" in t)]
        if tuned.empty:
            return {}
        names = sorted({t["study"] for t in tuned["tuning"]})
        trials = pd.read_sql(select(Run.study, Run.extra[("trial", "number")].as_integer().label("number"),
                                    Metric.top1.label("objective"))
                             .join(Metric, and_(Metric.run_id == Run.id, Metric.split == "val", Metric.group == "all"))
                             .where(Run.status == "completed", Run.study.in_(names))
                             .order_by(Run.study, "number"), con)
    studies: dict[tuple, dict[str, Study]] = {}
    for row in tuned.itertuples():
        found = studies.setdefault((row.dataset, row.data, row.rho, row.preset), {})
        name = row.tuning["study"]
        found.setdefault(name, Study(
            method=row.method, name=name, objective=row.tuning.get("objective", "val top-1"),
            n_trials=row.tuning.get("n_trials"), n_pruned=row.tuning.get("n_pruned", 0),
            space=row.tuning.get("space") or {},
            chosen=row.tuning.get("chosen") or {},
            trials=trials.loc[trials["study"] == name, ["number", "objective"]].reset_index(drop=True)))
    return {key: list(found.values()) for key, found in studies.items()}


# ---------------------------------------------------------------- boards

@dataclass
class Board:
    dataset: str
    title: str                  # the dataset's title, once named (name_boards); the dataset until then
    data: str                   # which folder, for a dataset that is whatever the user gives ("": a benchmark)
    rho: float
    preset: str
    metric: str                 # the benchmark's leading metric: top1 or error
    rows: pd.DataFrame          # aggregated, ranked, compared with the papers
    references: list[Reference] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)   # name -> data URI
    studies: list[Study] = field(default_factory=list)    # tuned boards: the searches behind them
    about: dict[str, dict] = field(default_factory=dict)  # method -> its title, label and paper (Titles)

    @property
    def key(self) -> tuple:
        return self.dataset, self.data, self.rho, self.preset

    @property
    def slug(self) -> str:
        return slugify(f"{self.dataset}{f'-{self.data}' if self.data else ''}-rho{self.rho:g}-{self.preset}")

    @property
    def name(self) -> str:
        return f"{self.title} (ρ={self.rho:g})"

    def label(self, method: str) -> str:
        """The method as the board's tables name it (its label, once named; its registry name until then)."""
        return self.about.get(method, {}).get("label", method)


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def build_boards(store: Store, benchmarks: str | None = None, plots: bool = True,
                 plot_cache: Path | None = None, only: Selection = EVERY_BOARD) -> list[Board]:
    """Load and rank the selected boards while worker processes draw the plots that are not
    cached under `plot_cache` (default: the harness cache). An empty store has no boards; a
    selection that matches none of a store's is refused, naming the boards there are."""
    doc = load_benchmarks(benchmarks)
    results = load_results(store, only)
    if results.empty:
        if only != EVERY_BOARD:
            check_selection(store, only)
        return []
    studies = load_studies(store, only)
    titles = load_titles(store, referenced_methods(doc, results))
    rendering = (start_plots(store, studies, PlotCache(plot_cache or default_cache()), titles.labels, only)
                 if plots else None)
    boards = rank_boards(doc, results, studies)
    name_boards(boards, titles)
    if rendering:
        attach_plots(boards, rendering)
    return boards


def check_selection(store: Store, only: Selection) -> None:
    with store.engine.connect() as con:
        boards = con.execute(select(Run.dataset, BOARD_DATA, Run.rho, Run.preset).where(RANKED).distinct()
                             .order_by(Run.dataset, BOARD_DATA, Run.rho.desc(), Run.preset)).all()
    if boards:
        there = ", ".join(f"{dataset}{f' ({data})' if data else ''} ρ={rho:g} {preset}"
                          for dataset, data, rho, preset in boards)
        raise HarnessError(f"no board matches {only}; pass one of the store's: {there}")


def rank_boards(doc: dict, results: pd.DataFrame, studies: dict[tuple, list[Study]]) -> list[Board]:
    boards = []
    for (dataset, data, rho, preset), rows in aggregate(results).groupby(BOARD_KEY, sort=True):
        refs = references_for(doc, dataset, rho)
        rows = compare_with_papers(rank(rows.drop(columns=BOARD_KEY)), refs, preset)
        metric = doc["benchmarks"].get(dataset, {}).get("metric", "top1")
        boards.append(Board(dataset=dataset, title=dataset, data=data, rho=float(rho), preset=preset, metric=metric,
                            rows=rows, references=refs, studies=studies.get((dataset, data, rho, preset), [])))
    order = {"paper": 0}
    boards.sort(key=lambda b: (b.dataset, b.data, -b.rho, order.get(b.preset, 1), b.preset))
    return boards


# ---------------------------------------------------------------- titles

@dataclass(frozen=True)
class Titles:
    datasets: dict[str, str]     # dataset -> title
    methods: dict[str, dict]     # method -> {"title", "label", "paper"}; labels unique among them

    @property
    def labels(self) -> dict[str, str]:
        return {method: about["label"] for method, about in self.methods.items()}


def load_titles(store: Store, named: Iterable[str] = ()) -> Titles:
    """Titles and labels of the stored runs' datasets and methods, and of the methods `named`
    (the references'), as the runs recorded them; only a name no run recorded them for (a run
    older than labels, a reference's method with no run) is looked up in its plugin (importing
    a plugin imports torch, about a second)."""
    query = select(Run.dataset, Run.method, Run.extra["dataset_title"].as_string(),
                   Run.extra["method_title"].as_string(), Run.extra["method_label"].as_string(),
                   Run.extra["method_paper"].as_string()).where(RANKED)
    with store.engine.connect() as con:
        rows = con.execute(query.distinct()).all()
    datasets, recorded = {}, {}
    for dataset, method, dataset_name, title, label, paper in rows:
        if dataset_name:
            datasets[dataset] = dataset_name
        if title and (label or method not in recorded):
            recorded[method] = {"title": title, "label": label or "", "paper": paper or ""}
    for dataset, *_ in rows:
        if dataset not in datasets:
            datasets[dataset] = dataset_title(dataset)
    methods = {}
    for method in sorted({row[1] for row in rows} | set(named)):
        about = recorded.get(method)
        methods[method] = about if about and about["label"] else method_about(method, about)
    return Titles(datasets, distinct_labels(methods))


def distinct_labels(methods: dict[str, dict]) -> dict[str, dict]:
    """Where two methods share a label (a plugin's "CE"), each is told apart by its registry name."""
    shared = Counter(about["label"] for about in methods.values())
    return {method: {**about, "label": about["label"] + (f" ({method})" if shared[about["label"]] > 1 else "")}
            for method, about in methods.items()}


def referenced_methods(doc: dict, results: pd.DataFrame) -> set[str]:
    """The methods that the paper references of the boards of `results` name: their reference
    tables show them."""
    boards = results[["dataset", "rho"]].drop_duplicates().itertuples(index=False)
    return {ref.method for dataset, rho in boards for ref in references_for(doc, dataset, rho)}


def name_boards(boards: list[Board], titles: Titles) -> None:
    for b in boards:
        b.title = titles.datasets.get(b.dataset, b.dataset) + (f": {b.data}" if b.data else "")
        b.about = {m: titles.methods[m] for m in {*b.rows["method"], *(ref.method for ref in b.references)}}


def dataset_title(dataset: str) -> str:
    from harness.registry import DATASETS

    try:
        return DATASETS.get(dataset).title
    except Exception:  # a dataset whose plugin is gone still has results worth showing
        return dataset


def method_about(name: str, recorded: dict | None = None) -> dict:
    """Title, label and paper of a registered method; a stored method no longer installed keeps
    what its runs recorded (a run older than labels: its registry name as its label), or shows
    its name only."""
    from harness.registry import METHODS

    try:
        method = METHODS.get(name)
    except HarnessError:
        return {"title": name, "paper": "", **(recorded or {}), "label": (recorded or {}).get("label") or name}
    from harness.method import describe

    return describe(method)


# ---------------------------------------------------------------- aggregation

def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """Per board, method and setup: n, mean and sample std (NaN for one seed) of top-1 by shot
    group over seeds, of ECE where every seed measured it, mean compute, the latest date and the
    commits."""
    spread = {f"{grp}_{stat}": (f"top1_{grp}", stat) for grp in GROUPS for stat in ("mean", "std")}
    rows = results.groupby(BOARD_KEY + ROW_KEY, sort=False, dropna=False).agg(
        n=("seed", "size"), seeds=("seed", sorted), **spread, ece_mean=("ece_all", mean_of_all),
        ece_std=("ece_all", std_of_all), minutes=("minutes", "mean"), gpu=("gpu", "any"),
        date=("finished_at", "max"), commit=("git_commit", short_commits)).reset_index()
    rows["date"] = rows["date"].dt.strftime("%Y-%m-%d")
    setup = rows[list(SETUP)].astype(object)
    rows[list(SETUP)] = setup.where(setup.notna(), None)   # a setup field not recorded is None, not NA
    return rows


def mean_of_all(values: pd.Series) -> float:
    """The mean, or NaN where a value is missing: a mean over some of a row's seeds is not its."""
    return values.mean() if values.notna().all() else np.nan


def std_of_all(values: pd.Series) -> float:
    return values.std() if values.notna().all() else np.nan


def short_commits(commits: pd.Series) -> str:
    return ", ".join(sorted({c[:7] + ("+dirty" if c.endswith("+dirty") else "") for c in commits}))


def rank(rows: pd.DataFrame) -> pd.DataFrame:
    """Ranked by mean top-1; a tie marks a row whose mean ± std reaches the row above."""
    rows = rows.sort_values("all_mean", ascending=False, kind="stable").reset_index(drop=True)
    rows["rank"] = np.arange(1, len(rows) + 1)
    rows["tie"] = [False] + [intervals_overlap(rows.iloc[i - 1], rows.iloc[i]) for i in range(1, len(rows))]
    return rows


def intervals_overlap(above: pd.Series, row: pd.Series) -> bool:
    """mean ± std intervals touch or overlap (one seed: a point interval)."""
    def interval(r):
        s = r["all_std"] if r["all_std"] is not None and not pd.isna(r["all_std"]) else 0.0
        return r["all_mean"] - s, r["all_mean"] + s
    lo_a, _ = interval(above)
    _, hi_b = interval(row)
    return hi_b >= lo_a


def references_for(doc: dict, dataset: str, rho: float) -> list[Reference]:
    bench = doc["benchmarks"].get(dataset, {})
    return [Reference.from_entry(r) for r in bench.get("references") or [] if float(r.get("rho", 0)) == float(rho)]


def compare_with_papers(rows: pd.DataFrame, refs: list[Reference], preset: str) -> pd.DataFrame:
    """Per row the paper top-1 shown (and its ECE where the paper reports one), Δ (paper preset,
    comparable reference only) and how the reference's protocol differs from the row's (DESIGN.md §4)."""
    comparisons = [compare(our_protocol(row), row["all_mean"], [r for r in refs if r.method == row["method"]],
                           with_delta=preset == "paper") for row in rows.to_dict("records")]
    rows = rows.copy()
    rows["paper"] = [c.reference.top1 if c.reference else None for c in comparisons]
    rows["paper_ece"] = [c.reference.ece if c.reference else None for c in comparisons]
    rows["delta"] = [c.delta for c in comparisons]
    rows["paper_source"] = [c.reference.source if c.reference else None for c in comparisons]
    rows["paper_differs"] = [list(c.differs) for c in comparisons]
    return rows


# ---------------------------------------------------------------- plots

def start_plots(store: Store, studies: dict[tuple, list[Study]], cache: PlotCache, labels: dict[str, str],
                only: Selection = EVERY_BOARD) -> Rendering:
    """The selected boards' plots, keyed (board key, plot name), their lines named by the methods'
    labels (Titles.labels); those not cached start drawing now."""
    jobs, lines = {}, {}
    for key, g in load_class_means(store, only).groupby(BOARD_KEY, sort=False):
        g = g.assign(line=line_names(g, labels))
        lines[key] = sorted(set(g["line"]))   # the per-class plot's order, so its lines' looks
        jobs[key, PER_CLASS] = PlotJob(PER_CLASS, g[["line", "train_count", "accuracy"]].reset_index(drop=True))
        jobs[key, WEIGHT_NORMS] = PlotJob(WEIGHT_NORMS,
                                          g[["line", "class_index", "train_count", "weight_norm"]]
                                          .reset_index(drop=True))
    for key, g in load_curves(store, "reliability", only).groupby(BOARD_KEY, sort=False):
        g = g.assign(line=line_names(g, labels))
        # a row's line looks as in the per-class plot (NCM, with no probabilities, is in that one only)
        order = lines.get(key) or sorted(set(g["line"]))
        g = g.assign(look=[order.index(line) for line in g["line"]])
        jobs[key, RELIABILITY] = PlotJob(RELIABILITY, g[["line", "look", "x", "value"]].reset_index(drop=True))
    for key, g in load_curves(store, "tau_sweep", only).groupby(BOARD_KEY, sort=False):
        g = g.assign(setup=setup_names(g))
        jobs[key, TAU_SWEEP] = PlotJob(TAU_SWEEP, g[["setup", "split", "group", "x", "value"]].reset_index(drop=True))
    for key, board_studies in studies.items():
        trials = pd.concat([s.trials.assign(study=s.name) for s in board_studies], ignore_index=True)
        if not trials.empty:
            jobs[key, TUNING] = PlotJob(TUNING, trials[["study", "number", "objective"]])
    return Rendering(jobs, cache, prune=only == EVERY_BOARD)   # a selection keeps the other boards' plots


def line_names(rows: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """Per row of a board's plot data, the line it belongs to: its method's label, and its setup
    where the board has that method on several."""
    return [f"{labels.get(method, method)}{f' ({setup})' if setup else ''}"
            for method, setup in zip(rows["method"], setup_names(rows))]


def setup_names(rows: pd.DataFrame) -> list[str]:
    """Per row of a board's plot data, its setup as the plot names it: the setup fields in which
    the board's setups of that method differ ("" where the board has the method on one setup),
    and a τ chosen on test wherever it was."""
    setups = rows[["method", *SETUP]].astype(object)
    varying = {method: varying_fields(s, SETUP) for method, s in setups.groupby("method")}
    return [", ".join(shown_setup(r, varying[r["method"]])) for _, r in setups.iterrows()]


def attach_plots(boards: list[Board], rendering: Rendering) -> None:
    pngs = rendering.result()
    for b in boards:
        b.plots = {name: data_uri(pngs[b.key, name]) for name in PLOT_ORDER if (b.key, name) in pngs}


# ---------------------------------------------------------------- formatting

def fmt_mean_std(mean, std) -> str:
    return f"{fmt(mean)} ± {fmt(std)}"


def fmt_delta(delta) -> str:
    return "—" if delta is None or pd.isna(delta) else f"{delta:+.2f}"


def error_of(mean):
    return None if mean is None or pd.isna(mean) else 100.0 - mean


def fmt_minutes(row) -> str:
    return f"{row['minutes']:.1f} {'GPU' if row['gpu'] else 'CPU'}"


def differs_names(differs) -> str:
    """The compact cell: which protocol fields differ (the reference table says how)."""
    return ", ".join(d.name for d in differs)


def differs_text(differs) -> str:
    return "; ".join(str(d) for d in differs)


# setup values that change what a row's number means: named on the row even where every row has them
ALWAYS_NAMED = {"tau_chosen_on": lambda value: value == "test", "recipe": lambda value: value is not None}
# setup fields of some rows only: None there is "not this method's" (τ) or "the shipped recipe",
# neither shown nor a difference
SOME_METHODS = {"tau_chosen_on", "recipe"}
SETUP_LABELS = {"tau_chosen_on": "τ chosen on"}


def varying_fields(rows: pd.DataFrame, fields) -> list[str]:
    """The setup fields in which `rows` differ."""
    return [f for f in fields if rows[f].nunique(dropna=f in SOME_METHODS) > 1]


def shown_setup(row, varying: list[str]) -> list[str]:
    """A row's setup fields as "name value": those in `varying`, then any ALWAYS_NAMED value it has."""
    names = varying + [f for f, named in ALWAYS_NAMED.items() if f not in varying and named(row[f])]
    return [f"{SETUP_LABELS.get(f, f)} {readable(row[f])}" for f in names
            if not (f in SOME_METHODS and row[f] is None)]


def setup_cells(board: Board) -> list[str]:
    """Each row's backbone, plus the setup fields (generator, epochs, augmentation, recipe,
    precision, τ's split) in which this board's rows differ from each other, a recipe another
    benchmarks file changed, and a τ chosen on test."""
    varying = varying_fields(board.rows, SETUP[1:])
    return [" · ".join([r["backbone"], *shown_setup(r, varying)]) for _, r in board.rows.iterrows()]


BOARD_HEADERS = ["Rank", "Method", "Setup", "Lead", "Other", "n", "Many", "Medium", "Few", "ECE", "Paper top-1",
                 "Paper ECE", "Δ", "Paper differs", "Compute (min)", "Date", "Commit"]
NUMERIC = {"Rank", "Top-1", "Error", "n", "Many", "Medium", "Few", "ECE", "Paper top-1", "Paper ECE", "Δ",
           "Compute (min)"}


def has_ece(board: Board) -> bool:
    """Whether any row of the board has a calibration error: a board of runs stored before ECE
    was measured, or of NCM alone, has no ECE column."""
    return bool(board.rows["ece_mean"].notna().any())


def has_paper_ece(board: Board) -> bool:
    """Whether the paper a row is compared with reports an ECE for any row of the board."""
    return bool(board.rows["paper_ece"].notna().any())


def board_table(board: Board) -> tuple[list[str], list[list[str]]]:
    """The board as display strings; the leading metric first, ECE where the board has any."""
    lead = "Error" if board.metric == "error" else "Top-1"
    other = "Top-1" if board.metric == "error" else "Error"
    optional = {"ECE": has_ece(board), "Paper ECE": has_paper_ece(board)}
    shown = [h for h in BOARD_HEADERS if optional.get(h, True)]
    headers = [{"Lead": lead, "Other": other}.get(h, h) for h in shown]
    rows = []
    for (_, r), setup in zip(board.rows.iterrows(), setup_cells(board)):
        top1 = fmt_mean_std(r["all_mean"], r["all_std"])
        err = fmt_mean_std(error_of(r["all_mean"]), r["all_std"])
        cells = {"Rank": f"{r['rank']}{' (tie)' if r['tie'] else ''}", "Method": board.label(r["method"]),
                 "Setup": setup, "Lead": err if board.metric == "error" else top1, "Other": top1 if board.metric == "error" else err,
                 "n": str(r["n"]), "Many": fmt(r["many_mean"]), "Medium": fmt(r["medium_mean"]),
                 "Few": fmt(r["few_mean"]), "ECE": fmt_ece(r), "Paper top-1": fmt(r["paper"]),
                 "Paper ECE": fmt(r["paper_ece"]), "Δ": fmt_delta(r["delta"]),
                 "Paper differs": differs_names(r["paper_differs"]),
                 "Compute (min)": fmt_minutes(r), "Date": r["date"], "Commit": r["commit"]}
        rows.append([cells[h] for h in shown])
    return headers, rows


def fmt_ece(row) -> str:
    return "—" if pd.isna(row["ece_mean"]) else fmt_mean_std(row["ece_mean"], row["ece_std"])


def reference_table(board: Board) -> tuple[list[str], list[list[str]]]:
    """Every reference of this (dataset, rho), those of methods on the board first, with how each
    differs from our row of its method that it differs from least."""
    with_ece = any(ref.ece is not None for ref in board.references)
    headers = ["Method (paper)", "Variant", "Top-1", "Error", "Many", "Medium", "Few", *(["ECE"] if with_ece else []),
               "Protocol", "Differs from ours", "Source"]
    ours = board.rows.to_dict("records")
    on_board = set(board.rows["method"])
    rows = []
    for ref in sorted(board.references, key=lambda r: r.method not in on_board):  # ours first, in file order
        found = closest_differences(ref, ours)
        differs = "" if found is None else differs_text(found) or "same as ours"
        rows.append([board.label(ref.method), ref.variant or "", fmt(ref.top1), fmt(error_of(ref.top1)), fmt(ref.many),
                     fmt(ref.medium), fmt(ref.few), *([fmt(ref.ece)] if with_ece else []), ref.summary(), differs,
                     ref.source])
    return headers, rows


def tuning_table(board: Board) -> tuple[list[str], list[list[str]]]:
    """Per study behind a tuned board: its method, trials, search space and chosen values."""
    headers = ["Method", "Study", "Objective", "Trials", "Search space", "Chosen"]
    rows = [[board.label(s.method), s.name, s.objective,
             (f"{len(s.trials)} of {s.n_trials}" if s.n_trials else str(len(s.trials)))
             + (f" (+{s.n_pruned} pruned)" if s.n_pruned else ""),
             "; ".join(f"{k}: {v}" for k, v in s.space.items()),
             ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in s.chosen.items())]
            for s in board.studies]
    return headers, rows


def method_results(boards: list[Board]) -> dict[str, list[dict]]:
    """Per method, the Papers-with-Code results table: Task | Dataset | Metric | Value | Model."""
    out: dict[str, list[dict]] = {}
    for b in boards:
        for (_, r), setup in zip(b.rows.iterrows(), setup_cells(b)):
            model = f"{b.label(r['method'])} ({setup}, preset {b.preset}, n={r['n']})"
            values = [("error", error_of(r["all_mean"])), ("top1", r["all_mean"])]
            values += [("ece", r["ece_mean"])] if pd.notna(r["ece_mean"]) else []
            for metric, value in values:
                out.setdefault(r["method"], []).append({
                    "task": TASK, "dataset": b.name, "metric": METRIC_NAMES[metric], "value": value,
                    "model": model, "rank": int(r["rank"]), "board": b.slug, "preset": b.preset})
    return out


# ---------------------------------------------------------------- renderers

def jinja_env():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("harness", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = fmt
    env.filters["slugify"] = slugify
    return env


def render_html(boards: list[Board], out: Path) -> list[Path]:
    env = jinja_env()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    methods = method_results(boards)
    about = {m: a for b in boards for m, a in b.about.items()}
    nav = sorted(((m, about[m]["label"]) for m in methods), key=lambda pair: pair[1].casefold())  # (id, label)
    index = env.get_template("index.html").render(boards=boards, methods=nav, leaders=leaders(boards))
    written.append(write(out / "index.html", index))
    for b in boards:
        headers, rows = board_table(b)
        html = env.get_template("board.html").render(
            board=b, headers=headers, rows=rows, numeric=NUMERIC, row_methods=list(b.rows["method"]),
            differs=[differs_text(d) for d in b.rows["paper_differs"]], references=reference_table(b),
            tuning=tuning_table(b), methods=nav, columns_note=columns_note(b))
        written.append(write(out / f"{b.slug}.html", html))
    for method, results in methods.items():
        html = env.get_template("method.html").render(method=method, about=about[method], results=results,
                                                      methods=nav)
        written.append(write(out / f"method-{slugify(method)}.html", html))
    return written


def leaders(boards: list[Board]) -> list[dict]:
    out = []
    for b in boards:
        top = b.rows.iloc[0]
        out.append({"board": b, "method": top["method"], "label": b.label(top["method"]), "top1": top["all_mean"],
                    "n_methods": len(b.rows), "n_runs": int(b.rows["n"].sum())})
    return out


def render_markdown(boards: list[Board], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    lines = ["# Leaderboards", "", "Generated by `harness report` from the results store. "
             "Each board is one dataset (an image folder: one folder), imbalance ratio and preset; presets are "
             "never ranked together. "
             "Values are mean ± sample std over seeds; \"—\" is an empty shot group or a single seed's std.", ""]
    rows = [[f"[{l['board'].name}]({l['board'].slug}.md)", l["board"].preset, l["label"], fmt(l["top1"]),
             l["n_methods"], l["n_runs"]] for l in leaders(boards)]
    lines.append(tabulate(rows, headers=["Benchmark", "Preset", "Leader", "Top-1", "Methods", "Runs"],
                          tablefmt="github", disable_numparse=True))
    lines.append("")
    for b in boards:
        text = markdown_board(b)
        written.append(write(out / f"{b.slug}.md", text))
        lines += [text, ""]
    written.insert(0, write(out / "README.md", "\n".join(lines)))
    return written


COMPARISON_NOTE = ("Δ = ours − a paper's top-1 for the same method trained on our backbone, generator, epochs and "
                   "augmentation (paper preset and shipped recipe only); \"Paper differs\" names the rest of its "
                   "protocol that is not ours, or, without Δ, why it is not comparable. The reference table says how.")
ECE_NOTE = ("ECE: expected calibration error on test (%, lower is better, not ranked; MiSLAS's 15 confidence "
            "bins); \"—\" where it was not measured: NCM's distances are not logits, and runs stored before it "
            "was kept none.")
COLUMNS_NOTE = ("Setup: the backbone, then what differs between rows; \"τ chosen on test\" (a run without a "
                "validation split) is an oracle; \"recipe …\" names what a copy of benchmarks.yaml or --set changed "
                "of the shipped recipe. Compute: minutes per seed (its share where seeds "
                "trained together), a reused stage 1's included.")


PAPER_ECE_NOTE = "Paper ECE: the calibration error the paper of \"Paper top-1\" reports beside it, where it does."


def columns_note(board: Board) -> str:
    notes = [ECE_NOTE] * has_ece(board) + [PAPER_ECE_NOTE] * has_paper_ece(board) + [COLUMNS_NOTE]
    return " ".join(notes)


def markdown_board(b: Board) -> str:
    headers, rows = board_table(b)
    text = [f"## {TASK} on {b.name} — preset `{b.preset}`", "",
            f"Ranked by top-1 (leading metric: {METRIC_NAMES[b.metric]}). \"(tie)\": mean ± std overlaps the row above. "
            + COMPARISON_NOTE + " " + columns_note(b), "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    if b.references:
        rh, rr = reference_table(b)
        text += ["", "Paper-reported (reference, not measured here):", "",
                 tabulate(rr, headers=rh, tablefmt="github", disable_numparse=True)]
    if b.studies:
        th, tr = tuning_table(b)
        text += ["", "Hyper-parameter searches behind this board (trials are not ranked):", "",
                 tabulate(tr, headers=th, tablefmt="github", disable_numparse=True)]
    return "\n".join(text) + "\n"


TEXT_WIDTHS = {"Variant": 24, "Protocol": 34, "Differs from ours": 40, "Source": 34,   # wrapped in a terminal
               "Search space": 40, "Chosen": 30}


def render_terminal(boards: list[Board]) -> str:
    parts = []
    for b in boards:
        headers, rows = board_table(b)
        parts.append(f"{TASK} on {b.name} — preset {b.preset}\n" + tabulate(rows, headers=headers,
                                                                           disable_numparse=True))
        if b.references:
            rh, rr = reference_table(b)
            parts.append("paper-reported:\n" + tabulate(rr, headers=rh, disable_numparse=True,
                                                         maxcolwidths=[TEXT_WIDTHS.get(h) for h in rh]))
        if b.studies:
            th, tr = tuning_table(b)
            parts.append("hyper-parameter searches:\n" + tabulate(tr, headers=th, disable_numparse=True,
                                                                   maxcolwidths=[TEXT_WIDTHS.get(h) for h in th]))
    return "\n\n".join(parts) if parts else "no completed runs in the store"


def board_frame(boards: list[Board]) -> pd.DataFrame:
    """All boards as one numeric table (CSV export)."""
    frames = []
    for b in boards:
        df = b.rows.drop(columns=["seeds"]).copy()
        df["paper_differs"] = df["paper_differs"].map(differs_text)
        df.insert(0, "preset", b.preset)
        df.insert(0, "rho", b.rho)
        df.insert(0, "dataset", b.dataset)
        df.insert(1, "data", b.data)
        df.insert(df.columns.get_loc("method") + 1, "label", df["method"].map(b.label))
        df["error_mean"] = 100.0 - df["all_mean"]
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def render_csv(boards: list[Board]) -> str:
    return board_frame(boards).to_csv(index=False)


# pdflatex's UTF-8 input knows accented Latin letters and the middle dot, not Greek letters or
# these: without them a table with "τ chosen on test" does not compile
LATEX_SYMBOLS = {"±": r"$\pm$", "−": "$-$", "×": r"$\times$", "≤": r"$\leq$", "≥": r"$\geq$", "→": r"$\to$",
                 "–": "--", "—": "---"}
GREEK_CAPITALS = {"Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega"}


def latex_symbol(ch: str) -> str:
    """A character pdflatex cannot take as it is, as LaTeX; any other as it is."""
    if ch in LATEX_SYMBOLS:
        return LATEX_SYMBOLS[ch]
    name = unicodedata.name(ch, "").replace("LAMDA", "LAMBDA").replace("FINAL ", "")   # Unicode's λ, ς
    kind, _, letter = name.removeprefix("GREEK ").partition(" LETTER ")
    if not name.startswith("GREEK ") or not letter.isalpha():   # a letter with an accent is not one of these
        return ch
    if kind == "SMALL" and letter != "OMICRON":
        return f"$\\{letter.lower()}$"
    if kind == "CAPITAL" and letter.capitalize() in GREEK_CAPITALS:
        return f"$\\{letter.capitalize()}$"
    return ch


def latex_escape(text: str) -> str:
    text = re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")
    return "".join(latex_symbol(ch) if ord(ch) > 127 else ch for ch in text)


def render_latex(boards: list[Board]) -> str:
    return "\n\n".join(latex_board(b) for b in boards) + "\n"


def latex_board(b: Board) -> str:
    """One table; a paper number whose protocol differs from ours carries a note mark (a, b, ...)
    and the notes under the table say how."""
    body, notes, with_ece, with_paper_ece = [], [], has_ece(b), has_paper_ece(b)
    for (_, r), setup in zip(b.rows.iterrows(), setup_cells(b)):
        paper = fmt(r["paper"])
        if r["paper_differs"]:
            mark = note_mark(len(notes))
            paper += f"\\textsuperscript{{{mark}}}"
            notes.append(f"\\textsuperscript{{{mark}}}{latex_escape(b.label(r['method']))}: "
                         f"{latex_escape(differs_text(r['paper_differs']))}.")
        ece = [latex_mean_std(r["ece_mean"], r["ece_std"])] if with_ece else []
        body.append(" & ".join([latex_escape(b.label(r["method"])), latex_escape(setup),
                                latex_mean_std(r["all_mean"], r["all_std"]), fmt(error_of(r["all_mean"])),
                                fmt(r["many_mean"]), fmt(r["medium_mean"]), fmt(r["few_mean"]), *ece,
                                str(r["n"]), paper, *([fmt(r["paper_ece"])] if with_paper_ece else []),
                                fmt_delta(r["delta"])]).replace("—", "--") + r" \\")
    return "\n".join([
        "\\begin{table}[t]", "\\centering",
        f"\\caption{{{latex_escape(TASK)} on {latex_escape(b.title)} ($\\rho={b.rho:g}$), preset {latex_escape(b.preset)}"
        f"{'; ECE: expected calibration error, 15 bins' if with_ece or with_paper_ece else ''}.}}",
        f"\\begin{{tabular}}{{ll{'r' * (8 + with_ece + with_paper_ece)}}}", "\\toprule",
        f"Method & Setup & Top-1 & Error & Many & Medium & Few & {'ECE & ' if with_ece else ''}$n$ & Paper & "
        f"{'Paper ECE & ' if with_paper_ece else ''}$\\Delta$ \\\\",
        "\\midrule",
        *body, "\\bottomrule", "\\end{tabular}",
        *(["\\par\\smallskip\\footnotesize " + " \\\\\n".join(notes)] if notes else []),
        "\\end{table}"])


def latex_mean_std(mean, std) -> str:
    """mean $\\pm$ std; the mean alone for one seed; "—" for none (the table writes it "--")."""
    if mean is None or pd.isna(mean):
        return "—"
    return fmt(mean) + ("" if std is None or pd.isna(std) else f" $\\pm$ {std:.2f}")


def note_mark(index: int) -> str:
    """a, b, ..., z, aa, ab, ...: the mark of the index-th note."""
    mark = ""
    index += 1
    while index:
        index, letter = divmod(index - 1, 26)
        mark = chr(ord("a") + letter) + mark
    return mark


def render_pwc_json(boards: list[Board]) -> str:
    """The shape of paperswithcode/sota-extractor's evaluation tables:
    task -> datasets -> sota -> rows with metrics; each row adds the paper it was compared with."""
    datasets = []
    for b in boards:
        # a method on several setups is several rows: each named with its setup, as the board shows it
        several = b.rows["method"].duplicated(keep=False).tolist()
        rows = [{"model_name": f"{b.label(r['method'])} ({setup})" if twice else b.label(r["method"]),
                 "paper_title": b.about.get(r["method"], {}).get("paper", ""), "paper_url": "", "paper_date": None,
                 "code_links": [], "model_links": [], "uses_additional_data": False,
                 "metrics": {"Top-1 Accuracy": fmt(r["all_mean"]), "Error Rate": fmt(error_of(r["all_mean"])),
                             **({METRIC_NAMES["ece"]: fmt(r["ece_mean"])} if pd.notna(r["ece_mean"]) else {})},
                 "paper_reference": paper_reference(r)}
                for (_, r), setup, twice in zip(b.rows.iterrows(), setup_cells(b), several)]
        datasets.append({"dataset": f"{b.name} [{b.preset}]", "description": "", "dataset_links": [],
                         "subdatasets": [], "dataset_citations": [],
                         "sota": {"metrics": [METRIC_NAMES[b.metric],
                                              METRIC_NAMES["top1" if b.metric == "error" else "error"],
                                              *([METRIC_NAMES["ece"]] if has_ece(b) else [])],
                                  "rows": rows}})
    task = {"task": TASK, "description": "", "categories": ["Computer Vision"], "datasets": datasets,
            "subtasks": [], "synonyms": [], "source_link": None}
    return json.dumps([task], indent=2, ensure_ascii=False)


def paper_reference(row: pd.Series) -> dict | None:
    if row["paper"] is None or pd.isna(row["paper"]):
        return None
    delta = None if row["delta"] is None or pd.isna(row["delta"]) else round(float(row["delta"]), 2)
    ece = {} if row["paper_ece"] is None or pd.isna(row["paper_ece"]) else {"ece": row["paper_ece"]}
    return {"top1": row["paper"], **ece, "delta": delta, "source": row["paper_source"],
            "differs": [str(d) for d in row["paper_differs"]]}


SITE_RECORD = ".harness-report"   # under --out: the files the reports wrote there, one name per line


def render_site(boards: list[Board], out: Path, html: bool = True, markdown: bool = True) -> tuple[list[Path], list[Path]]:
    """The HTML and/or Markdown pages under `out`: the files written, and those removed. A page
    an earlier report wrote there of a kind rendered now, and this one did not write (a board
    or method whose runs were deleted, or left out by a selection), is removed, so that it is not
    published beside the boards, linked from nowhere. A file no report wrote is never touched."""
    written = (render_html(boards, out) if html else []) + (render_markdown(boards, out) if markdown else [])
    record = out / SITE_RECORD
    before = set(record.read_text(encoding="utf-8").splitlines()) if record.exists() else set()
    kinds = {suffix for suffix, rendered in ((".html", html), (".md", markdown)) if rendered}
    stale = sorted(name for name in before - {p.name for p in written} if Path(name).suffix in kinds)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    write(record, "".join(f"{name}\n" for name in sorted(before - set(stale) | {p.name for p in written})))
    return written, [out / name for name in stale]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
