"""`harness sweep`: the grid methods x datasets x rho x seeds from benchmarks.yaml,
minus what the store already holds, run so that each stage-1 training happens once.

Jobs that share a stage-1 recipe on the same data form one chain (CE, then cRT, LWS,
τ-norm reuse its checkpoint); a chain runs in order in one worker, chains run in
parallel over `--jobs` worker processes. All seeds of one (method, dataset, rho) are
one request, so they train together.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context

from harness import HarnessError
from harness.config import load_benchmarks
from harness.migrate import NoStore
from harness.runner import RunRequest, data_name, execute, prepare
from harness.store import Store, completed_of


@dataclass
class Planned:
    request: RunRequest          # its seeds are the ones still to run
    skipped_seeds: list[int]
    chain: str                   # jobs of one chain share a stage-1 checkpoint


def chain_key(dataset: str, rho, stage1: dict, precision: str | None = None) -> str:
    """What the jobs of one chain share: the data, the ratio, the stage-1 recipe and the
    precision asked for (RunConfig.precision)."""
    return json.dumps([dataset, rho, stage1, precision], sort_keys=True)


def plan(base: RunRequest, methods=None, datasets=None, rhos=None, seeds=(0,), create: bool = True) -> list[Planned]:
    """Expand the grid, validated before anything runs; seeds already completed with the
    same config hash are skipped. `create=False` (a dry run) reads a store that is there and
    makes none."""
    doc = load_benchmarks(base.benchmarks)
    benches = doc["benchmarks"]
    for name in datasets or []:
        if name not in benches:
            raise HarnessError(f"dataset '{name}' has no entry in {doc['_path']}; "
                               f"benchmarks there: {', '.join(sorted(benches))}")
    # (method, dataset, rho, [(seed, config hash)], stage-1 recipe, data name): every request validated first
    grid = []
    for dataset in datasets or list(benches):
        # an image folder's; an unregistered dataset fails here, with the known names
        data = data_name(replace(base, dataset=dataset))
        bench = benches[dataset]
        for rho in rhos or bench.get("rhos", []):
            rho = rho if rho == "natural" else float(rho)
            for method in methods or list(bench.get("methods", {})):
                hashes, stage1 = [], None
                for seed in seeds:
                    _, _, cfg = prepare(replace(base, method=method, dataset=dataset, rho=rho, seeds=[seed]), seed)
                    hashes.append((seed, cfg.config_hash()))
                    stage1 = cfg.recipe["stage1"]
                grid.append((method, dataset, rho, hashes, stage1, data))
    # opened only once the grid is known to be good: bad input creates no store
    asked: dict[str | None, list[str]] = {}
    for *_, hashes, _, data in grid:
        asked.setdefault(data, []).extend(h for _, h in hashes)
    try:
        with Store(base.db, create=create) as store, store.session() as s:
            done = {(h, data) for data, config_hashes in asked.items()
                    for h, _ in completed_of(s, config_hashes, data)}
    except NoStore:   # nothing done yet
        done = set()
    planned = []
    for method, dataset, rho, hashes, stage1, data in grid:
        todo = [seed for seed, h in hashes if (h, data) not in done]
        skipped = [seed for seed, h in hashes if (h, data) in done]
        if hashes:
            planned.append(Planned(replace(base, method=method, dataset=dataset, rho=rho, seeds=todo), skipped,
                                   chain_key(dataset, rho, stage1, base.precision)))
    return planned


def chains(planned: list[Planned]) -> list[list[Planned]]:
    grouped: dict[str, list[Planned]] = {}
    for p in planned:
        if p.request.seeds:
            grouped.setdefault(p.chain, []).append(p)
    return list(grouped.values())


def run_chain(chain: list[Planned]) -> list[tuple[Planned, str | None, list]]:
    """Run one chain in order; a failed job is reported and the chain goes on."""
    out = []
    for p in chain:
        try:
            results = execute(p.request)
            out.append((p, None, [(r.run_id, r.config.seed, r.metrics["test"]["all"]) for r in results]))
        except Exception as exc:  # noqa: BLE001 -- one crashed job must not end the sweep; its row says failed
            out.append((p, str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}", []))
    return out


def execute_sweep(planned: list[Planned], jobs: int, report=print, executor: str = "local",
                  address: str | None = None) -> tuple[int, int]:
    """Run the planned chains, locally (`jobs` worker processes) or as Ray tasks;
    returns (runs completed, jobs failed)."""
    work = chains(planned)
    total = sum(len(p.request.seeds) for c in work for p in c)
    completed = failed = 0

    def account(results) -> None:
        nonlocal completed, failed
        for p, error, runs in results:
            r = p.request
            label = f"{r.method} on {r.dataset} rho {r.rho}, seeds {' '.join(map(str, r.seeds))}"
            if error:
                failed += 1
                report(f"[{completed}/{total}] FAILED {label}: {error}")
            else:
                completed += len(runs)
                tops = ", ".join(f"{rid} top-1 {top1:.2f}" for rid, _, top1 in runs)
                report(f"[{completed}/{total}] {label}: {tops}")

    if executor == "ray":
        for results in ray_chains(work, address):
            account(results)
    elif jobs <= 1:
        for chain in work:
            account(run_chain(chain))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(run_chain, chain) for chain in work]):
                account(fut.result())
    return completed, failed


def ray_chains(work: list[list[Planned]], address: str | None):
    """Each chain as one Ray task (one GPU each where the cluster has GPUs), on the
    cluster at `address` or on a local Ray instance; yields results as tasks finish."""
    try:
        import ray
    except ImportError:
        raise HarnessError("--executor ray needs Ray: pip install 'ltr-harness[ray]' (or pip install ray)") from None
    started_here = not ray.is_initialized()
    if started_here:
        local = {} if address else {"object_store_memory": 256 * 2**20}  # results are small; keep shm free
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False, **local)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus, max_retries=0)(run_chain)
        pending = [task.remote(chain) for chain in work]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()
