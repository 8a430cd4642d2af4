"""Time `harness report` over a store of N synthetic runs (default 10,000).

    python bench/report_scale.py [--runs 10000] [--classes 10]

Builds a temporary SQLite store with bulk inserts (runs spread over 3 datasets x 3
ratios x 2 presets x 6 methods, with seeds), then times loading + aggregation,
HTML (with plots) and Markdown rendering, and prints the figures.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from harness import report as rep
from harness.store import ClassMetric, Metric, Run, Store

METHODS = ["ce", "crt", "lws", "tau_norm", "fbl", "wb"]
BOARDS = list(itertools.product(["cifar10-lt", "cifar100-lt", "fmnist-lt"], [100.0, 50.0, 10.0], ["paper", "quick"]))


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
                         generator="ldam", preset=preset, config={}, config_hash=rid, status="completed",
                         started_at=stamp, finished_at=stamp, wall_seconds=60.0, device="cpu", git_commit="0" * 40,
                         versions={}, data_checksum="x", stage1_cached=0, extra={}))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'scale.db'}")
        t0 = time.perf_counter()
        populate(store, args.runs, args.classes)
        t1 = time.perf_counter()
        boards = rep.build_boards(store, plots=True)
        t2 = time.perf_counter()
        html = rep.render_html(boards, Path(tmp) / "site")
        t3 = time.perf_counter()
        md = rep.render_markdown(boards, Path(tmp) / "site")
        t4 = time.perf_counter()
        rep.render_csv(boards)
        rep.render_pwc_json(boards)
        t5 = time.perf_counter()
    print(f"runs: {args.runs}, boards: {len(boards)}, files: {len(html) + len(md)}")
    print(f"populate store      {t1 - t0:7.2f} s")
    print(f"load + aggregate    {t2 - t1:7.2f} s (includes {sum(len(b.plots) for b in boards)} plots)")
    print(f"render HTML         {t3 - t2:7.2f} s")
    print(f"render Markdown     {t4 - t3:7.2f} s")
    print(f"CSV + PwC JSON      {t5 - t4:7.2f} s")
    print(f"report total        {t5 - t1:7.2f} s")


if __name__ == "__main__":
    main()
