"""Worker processes for the report: plots are drawn, and plugins imported, beside the main
work. Workers are forked, so they start at once with everything this process has imported;
where fork is not available the work runs here, in order."""
from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager


class InlineExecutor(Executor):
    """Runs each task when it is submitted."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # raised where the result is read, as from a worker
            future.set_exception(exc)
        return future


def start_workers(fn, tasks: dict) -> tuple[Executor, dict]:
    """fn(task) for every task in up to one worker per core, started now: the pool (shut it
    down when done) and a future per task key."""
    pool = worker_pool(len(tasks))
    with shared_heap():  # a fork context forks all its workers at the first submit
        futures = {key: pool.submit(fn, task) for key, task in tasks.items()}
    return pool, futures


def in_background(fn, *args) -> Future:
    """fn(*args) in a worker process of its own, while the caller goes on."""
    pool = worker_pool(1)
    with shared_heap():
        future = pool.submit(fn, *args)
    pool.shutdown(wait=False)   # the worker exits once it has answered
    return future


def worker_pool(tasks: int) -> Executor:
    workers = min(tasks, available_cpus())
    if workers < 1 or "fork" not in multiprocessing.get_all_start_methods():
        return InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


@contextmanager
def shared_heap():
    """Fork with the garbage collector's objects frozen: a forked worker shares this process's
    memory until it writes to it, and a collection writes to every object it visits; frozen
    ones it skips, which saves the workers about a sixth of their CPU time in page copies."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use, not the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
