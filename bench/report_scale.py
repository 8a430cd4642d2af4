"""Time `harness report` over a store of N synthetic runs (default 10,000).

    python bench/report_scale.py [--runs 10000] [--classes 10]

Builds a temporary SQLite store with bulk inserts (runs spread over 3 datasets x 3 ratios x
2 presets x 6 methods, with seeds; 18 boards, 36 plots), then reports twice, each time in a
fresh process as `harness report` would run: cold (empty plot cache) and warm (unchanged
data, the cache from the first). Prints the split of each: load, aggregate, plots, HTML,
Markdown, exports, and the CPU time of the report process and of its workers (on a machine
with fewer free cores than busy processes, wall time is bounded below by their sum / cores).
The report total starts at loading; importing harness.report (pandas, SQLAlchemy) is shown
on its own line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from harness.store import ClassMetric, Metric, Run, Store

METHODS = ["ce", "crt", "lws", "tau_norm", "fbl", "wb"]
# what every run records of its method and dataset (harness.runner), so a report needs no plugin
TITLES = {m: {"method_title": m.upper(), "method_label": m.upper(), "method_paper": f"paper of {m}"} for m in METHODS}
BOARDS = list(itertools.product(["cifar10-lt", "cifar100-lt", "fmnist-lt"], [100.0, 50.0, 10.0], ["paper", "quick"]))
STAGE1 = {"epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4,
          "schedule": {"kind": "warmup-step", "warmup_epochs": 5, "steps": [[160, 0.01], [180, 0.0001]]}}
PHASES = ["load", "titles", "aggregate", "plots", "HTML", "Markdown",
          "exports (CSV, LaTeX, PwC JSON, table)"]


def config_of(method: str, preset: str) -> dict:
    """A resolved config as the runner stores it (the report reads the recipe's epochs and augmentation)."""
    stage1 = dict(STAGE1, epochs=10, paper_epochs=200) if preset == "quick" else STAGE1
    recipe = {"stage1": stage1, "augmentation": "crop+flip"}
    if method in ("crt", "lws", "wb"):
        recipe["stage2"] = {"epochs": 10, "batch_size": 128, "lr": 0.05, "schedule": {"kind": "cosine"}}
    return {"method": method, "preset": preset, "recipe": recipe}


def populate(store: Store, n_runs: int, n_classes: int) -> None:
    rng = np.random.default_rng(0)
    stamp = datetime.now(timezone.utc)
    runs, metrics, classes = [], [], []
    for i in range(n_runs):
        dataset, rho, preset = BOARDS[i % len(BOARDS)]
        method = METHODS[(i // len(BOARDS)) % len(METHODS)]
        seed = i // (len(BOARDS) * len(METHODS))
        rid = f"r{i:06d}"
        runs.append(dict(id=rid, method=method, dataset=dataset, rho=rho, backbone="resnet32", seed=seed,
                         generator="ldam", preset=preset, config=config_of(method, preset), config_hash=rid,
                         status="completed", started_at=stamp, finished_at=stamp, wall_seconds=60.0, device="cpu",
                         git_commit="0" * 40, versions={}, data_checksum="x", stage1_cached=int(method != "ce"),
                         extra={"stage1_seconds": 50.0, **TITLES[method], "dataset_title": dataset}))
        base = 40 + 5 * METHODS.index(method) + rng.normal(0, 1)
        for group, shift in (("all", 0), ("many", 20), ("medium", 0), ("few", -20)):
            metrics.append(dict(run_id=rid, split="test", group=group, top1=base + shift, error=100 - base - shift,
                                n_classes=n_classes))
        for c in range(n_classes):
            classes.append(dict(run_id=rid, class_index=c, class_name=f"c{c}", train_count=500 // (c + 1),
                                accuracy=float(rng.uniform(0, 100)), weight_norm=float(rng.uniform(0.5, 2))))
    with store.engine.begin() as con:
        con.execute(insert(Run), runs)
        con.execute(insert(Metric), metrics)
        con.execute(insert(ClassMetric), classes)


def time_report(url: str, cache: Path, out: Path) -> dict:
    """One report, phase by phase, in the order build_boards runs them. Worker processes draw
    the plots meanwhile, so `plots` is the time left to wait for them."""
    times = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock
        clock = now

    from harness import report as rep
    from harness.config import load_benchmarks
    from harness.report_plots import PlotCache
    lap("import harness.report")
    store = Store(url)
    doc = load_benchmarks(None)
    results = rep.load_results(store)
    studies = rep.load_studies(store)
    lap("load")
    titles = rep.load_titles(store, rep.referenced_methods(doc, results))
    lap("titles")
    rendering = rep.start_plots(store, studies, PlotCache(cache), titles.labels)
    lap("plots")
    boards = rep.rank_boards(doc, results, studies)
    lap("aggregate")
    rep.name_boards(boards, titles)
    rep.attach_plots(boards, rendering)
    lap("plots")
    html = rep.render_html(boards, out)
    lap("HTML")
    md = rep.render_markdown(boards, out)
    lap("Markdown")
    for render in (rep.render_csv, rep.render_latex, rep.render_pwc_json, rep.render_terminal):
        render(boards)
    lap("exports (CSV, LaTeX, PwC JSON, table)")
    times["boards"], times["plots drawn"], times["files"] = len(boards), sum(map(len, (b.plots for b in boards))), \
        len(html) + len(md)
    times["cpu main"], times["cpu workers"] = cpu_seconds()
    return times


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process (imports included) and of its worker processes, once they exited."""
    while multiprocessing.active_children():
        time.sleep(0.01)
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, workers.ru_utime + workers.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--report", nargs=3, metavar=("URL", "CACHE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        url, cache, out = args.report
        print(json.dumps(time_report(url, Path(cache), Path(out))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'scale.db'}"
        t0 = time.perf_counter()
        populate(Store(url), args.runs, args.classes)
        populate_s = time.perf_counter() - t0
        cold, warm = (report_in_fresh_process(url, Path(tmp)) for _ in range(2))
    print(f"runs: {args.runs}, boards: {cold['boards']}, plots: {cold['plots drawn']}, files: {cold['files']}")
    print(f"populate store {populate_s:.2f} s")
    print(f"{'':40s} {'cold':>7s} {'warm':>7s}")
    print(f"{'import harness.report':40s} {cold['import harness.report']:7.2f} {warm['import harness.report']:7.2f}")
    for phase in PHASES:
        print(f"{phase:40s} {cold[phase]:7.2f} {warm[phase]:7.2f}")
    total = [sum(t[p] for p in PHASES) for t in (cold, warm)]
    print(f"{'report total':40s} {total[0]:7.2f} {total[1]:7.2f}")
    print(f"{'CPU s, main process (with imports)':40s} {cold['cpu main']:7.2f} {warm['cpu main']:7.2f}")
    print(f"{'CPU s, workers (plots)':40s} {cold['cpu workers']:7.2f} {warm['cpu workers']:7.2f}")


def report_in_fresh_process(url: str, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--report", url, str(tmp / "cache"), str(tmp / "site")],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


if __name__ == "__main__":
    main()
