"""Many writers, one SQLite store: P processes each write N complete runs (start row,
then metrics + per-class rows + curve in one transaction), as a local sweep does.

    python bench/store_concurrency.py [--procs 8] [--runs 100] [--db sqlite:///...]

Prints rows written, failures ("database is locked" included) and the time taken.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from pathlib import Path

from harness.store import Run, Store, now


def writer(url: str, worker: int, n_runs: int) -> list[str]:
    store, errors = Store(url), []
    for i in range(n_runs):
        rid = uuid.uuid4().hex[:12]
        try:
            store.start_run(Run(id=rid, method="ce", dataset="bench", rho=100.0, backbone="resnet32", seed=i,
                                generator="ldam", preset="quick", config={"worker": worker}, config_hash=rid,
                                status="running", started_at=now(), device="cpu", git_commit="0" * 40,
                                versions={}, data_checksum="x", extra={}))
            store.complete_run(
                rid, metrics=[{"split": "test", "group": g, "top1": 50.0, "error": 50.0, "n_classes": 10}
                              for g in ("all", "many", "medium", "few")],
                class_metrics=[{"class_index": c, "class_name": f"c{c}", "train_count": 10, "accuracy": 50.0,
                                "weight_norm": 1.0} for c in range(100)],
                curves=[{"kind": "train_loss", "x": e, "split": "stage1", "group": "all", "value": 1.0}
                        for e in range(200)],
                extra={}, wall_seconds=1.0, stage1_cached=False)
        except Exception as exc:  # counted, not hidden: the figure is how many of these there are
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    return errors


def ready(_) -> int:
    """A pool worker that is up (this module imported); sleeps so that each worker takes one."""
    time.sleep(0.5)
    return os.getpid()


def open_at(url: str, when: float) -> str | None:
    """Open (so create) the store at `url` at the wall-clock time `when`: processes racing to
    create one store. The error, if any."""
    time.sleep(max(0.0, when - time.time()))
    try:
        Store(url).close()
    except Exception as exc:  # noqa: BLE001 -- counted by the caller
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: a temporary SQLite file)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'concurrency.db'}"
        Store(url)  # create the schema once, before the writers race
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(args.procs) as pool:
            errors = sum(pool.starmap(writer, [(url, w, args.runs) for w in range(args.procs)]), [])
        seconds = time.perf_counter() - t0
        runs = Store(url).list_runs()
        completed = sum(r.status == "completed" for r in runs)
    print(f"store: {url.split(':')[0]}, writers: {args.procs} processes x {args.runs} runs")
    print(f"rows: {len(runs)} runs, {completed} completed, expected {args.procs * args.runs}")
    print(f"failures: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"time: {seconds:.1f} s, {len(runs) / seconds:.0f} runs/s")


if __name__ == "__main__":
    main()
