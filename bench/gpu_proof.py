"""Prove the GPU claims of DESIGN.md §10 in steps that each end within ~9 minutes.

    python bench/gpu_proof.py --out DIR [--step correctness|speed|table] [--budget-s 540]
                              [--export DEST] [--smoke]

  correctness  pytest tests/test_cuda.py: captured against eager steps (bf16 tolerance), resume,
               concurrent seeds, after-step hooks, the tail batch, batch transforms and
               parameter groups inside the CUDA graph; the outcome of every test
  speed        bench/throughput.py in one process (engine, bare loop, reference loop: img/s,
               ms/step, MFU, a/b, a/c); data loading; one full CE run at the first ratio, with
               training, evaluation and start-up stated apart; the same run for every seed at once
  table        in phases, what matters most first: the six methods x seeds at rho 100 (the
               timed table), CE on balanced CIFAR-10 (the JPEG copy's penalty), the six at
               rho 10, CE at rho 100 in fp32 (what the default bf16 autocast costs against the
               official codes' fp32), then every other registered method at rho 100 and at
               rho 10; each phase a `harness sweep` into one store; `harness report`

Without --step the steps run in that order as far as the budget goes. Everything lands in DIR:
figures.json (every number as {"value", "unit"}, and the goals), results.db (the table),
speed.db (the timed runs, kept apart: their configurations are the table's), reports/,
proof.log, cache/ (checkpoints, decoded images) and data/ (the extracted images). What
figures.json or the stores already hold is not done again, so each call goes on where the last
stopped. At the budget a step interrupts its subprocess (SIGINT to its process group: the
harness marks its unfinished runs failed; SIGKILL 20 s later) and ends cleanly; a sweep resumes
from the epoch checkpoints in cache/ on the next call.

The GPU machines lack SQLAlchemy, Alembic, Mako and Optuna and have no network: there the
wheels of bench/gpu_prep.py (--wheels, .whl/) are installed first and its copy of
cifar10-jpeg.tar.gz (--data, .devdata/) is extracted. `--export DEST` writes what a later call
needs and what a reader wants as at most 8 flat files under 16 MiB each (what the GPU machines
bring back): figures.json, results.db, speed.db, proof.log, reports.tar.gz and resume-N.tar
(the checkpoints an interrupted sweep resumes from, unpacked into cache/ by the next call).

--smoke runs every step on the CPU in about a minute, never reading the real data: a synthetic
JPEG folder in CIFAR-10's layout (60 training and 20 test images per class) read through a
plugin dataset with n_max 50, CIFAR-10-LT's recipes on the small CNN, the quick preset at one
epoch, one seed; its phases are ce and crt, the balanced run, CE in bf16 (the CPU's other
precision), then la_posthoc.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("correctness", "speed", "table")
GRACE_S = 20.0            # an interrupted subprocess's time to mark its runs failed and exit, then SIGKILL
EXPORT_RESERVE_S = 15.0   # kept back from every step for writing figures and the export
EXPORT_PART_BYTES = 15 * 2**20   # the GPU machines bring back files under 16 MiB, at most 8 of them
DATA_TOP = "cifar10-jpeg"        # the folder cifar10-jpeg.tar.gz unpacks to
SITE = Path(tempfile.gettempdir()) / "ltr-harness-site"   # where the wheels go on the GPU machine
BALANCED_RHO = "1"
ORIGINAL_BALANCED_TOP1 = (92.5, 93.0)   # DESIGN.md §10: balanced CIFAR-10 ResNet-32 on the original images
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Phase:
    """One sweep of the table. The phases run in order, what matters most first, so that a
    session whose device time runs out still leaves the figures that matter: the six methods at
    the goal's ratio (the timed table), the JPEG penalty that every comparison with a paper
    needs, the six at the other ratio, then the baselines."""
    name: str
    methods: tuple[str, ...]     # () = every registered method no other phase names
    rhos: tuple[str, ...]
    one_seed: bool = False                 # the target's first seed only
    val_per_class: int | None = None       # None: the benchmark's validation split
    precision: str | None = None           # None: the device's default; else --precision, the other one


# CE on balanced CIFAR-10, every training image kept (no validation split): the JPEG copy's penalty
BALANCED = Phase("balanced", ("ce",), (BALANCED_RHO,), one_seed=True, val_per_class=0)
SIX = ("ce", "crt", "lws", "tau_norm", "fbl", "wb")
POSTHOC_FIRST = ("la_posthoc", "ncm")   # they reuse CE's stage 1: seconds each, so they go first


@dataclass(frozen=True)
class Target:
    """What the proof trains, on which device, and with what budget per measurement."""
    dataset: str
    rhos: tuple[str, ...]            # the table's ratios; the first is the timed runs' and the goals'
    seeds: tuple[int, ...]
    preset: str
    phases: tuple[Phase, ...]        # the table, in the order it runs; the first is the timed table
    device: str
    throughput: tuple[str, ...]      # bench/throughput.py's arguments besides --device
    report_reserve_s: float          # kept back from the sweep for `harness report`
    smoke: bool = False


GPU = Target("cifar10-lt", ("100", "10"), (0, 1, 2), "paper",
             (Phase("six-100", SIX, ("100",)), BALANCED, Phase("six-10", SIX, ("10",)),
              Phase("ce-fp32-100", ("ce",), ("100",), precision="fp32"),
              Phase("baselines-100", (), ("100",)), Phase("baselines-10", (), ("10",))),
             "cuda", ("--steps", "200", "--repeats", "3"), 90.0)
SMOKE = Target("cifar10-smoke", ("10",), (0,), "quick",
               (Phase("six-10", ("ce", "crt"), ("10",)), BALANCED, Phase("ce-bf16-10", ("ce",), ("10",), precision="bf16"),
                Phase("baselines-10", ("la_posthoc",), ("10",))),
               "cpu", ("--steps", "2", "--repeats", "1", "--batch", "16"), 20.0, smoke=True)
SMOKE_N_MAX = 50
SMOKE_IMAGES = {"train": 60, "test": 20}   # per class: n_max plus 10 for the validation split
SMOKE_BACKBONE = "fmnist-cnn"              # the small CNN (any input size): a CPU epoch in a fraction of a second


def rho_key(rho) -> str:
    return f"{float(rho):g}"


def q(value, unit: str) -> dict:
    """A figure: every number in figures.json carries its unit."""
    return {"value": value, "unit": unit}


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)   # naive UTC, as SQLite returns the runs' times


class Log:
    """Lines to stdout (a GPU machine returns its tail) and to proof.log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        return self.end - reserve - time.monotonic()


@dataclass
class Finished:
    returncode: int | None    # None: stopped at the budget
    seconds: float
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def heed_interrupts() -> None:
    """In the child, before exec: SIGINT's default disposition. A proof started in the background
    (`nohup ... &`, a non-interactive shell's `&`) ignores SIGINT, its children inherit that, and
    Python then installs no KeyboardInterrupt: the harness would never hear the budget's SIGINT,
    and would be killed GRACE_S later without marking its runs failed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_bounded(cmd: list[str], seconds: float, log: Log) -> Finished:
    """Run `cmd` from the repository root in a process group of its own, its output streamed to
    `log`. After `seconds` the whole group gets SIGINT (the harness then marks its unfinished
    runs failed; checkpoints are written atomically, so none is left torn) and SIGKILL if it
    has not ended GRACE_S later. Nothing of the group outlives the call."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True, preexec_fn=heed_interrupts)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log("  | " + lines[-1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(seconds, 0.0))
        stopped = False
    except subprocess.TimeoutExpired:
        stopped = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever of the group is left (a DataLoader worker, a stuck child)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    reader.join(timeout=GRACE_S)
    return Finished(None if stopped else proc.returncode, time.monotonic() - start, lines)


# ---------------------------------------------------------------- the machine: packages and data

def harness_installed() -> bool:
    """Whether this Python has the ltr-harness distribution (its entry points register the
    methods and datasets) and every package it requires."""
    try:
        requires = metadata.requires("ltr-harness") or []
    except metadata.PackageNotFoundError:
        return False
    for line in requires:
        if "extra ==" in line:
            continue
        try:
            metadata.distribution(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group())
        except metadata.PackageNotFoundError:
            return False
    return True


def install_wheels(wheels: Path, log: Log) -> Path:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        sys.exit(f"the harness is not installed here and {wheels} holds no wheels: run bench/gpu_prep.py "
                 "where pip reaches PyPI and bring .whl along")
    log(f"installing {len(found)} wheels from {wheels} into {SITE}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, found)], check=True)
    return SITE


def check_entry_points() -> None:
    """The installed harness must register what pyproject.toml declares: a wheel built before a
    method was added would leave that method out of the table without a word."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, names in declared.items():
        missing = sorted(set(names) - {ep.name for ep in metadata.entry_points(group=group)})
        if missing:
            sys.exit(f"the installed ltr-harness does not register the {group} {', '.join(missing)} that "
                     "pyproject.toml declares: rebuild it (bench/gpu_prep.py; here, pip install -e .)")


def write_smoke_plugin(site: Path) -> Path:
    """The smoke's dataset, registered as a third-party plugin is: CIFAR-10-LT's spec with a
    small n_max, so that a folder of a few hundred JPEGs in CIFAR-10's layout serves."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "gpu_proof_smoke.py").write_text(textwrap.dedent(f"""\
        from dataclasses import replace

        from harness.datasets import CIFAR10_LT

        DATASET = replace(CIFAR10_LT, name="{SMOKE.dataset}", title="CIFAR-10-LT (smoke, n_max {SMOKE_N_MAX})",
                          n_max={SMOKE_N_MAX}, source="synthetic JPEGs of bench/gpu_proof.py --smoke")
        """))
    info = site / "gpu_proof_smoke-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gpu-proof-smoke\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[harness.datasets]\n{SMOKE.dataset} = gpu_proof_smoke:DATASET\n")
    return site


def write_smoke_benchmarks(path: Path) -> Path:
    """CIFAR-10-LT's benchmark (recipes, references) for the smoke's dataset, on the small CNN,
    its preset one epoch of its methods' 200-epoch stage 1 and 10-epoch stage 2."""
    import yaml

    doc = yaml.safe_load((REPO / "benchmarks.yaml").read_text())
    bench = {**doc["benchmarks"]["cifar10-lt"], "rhos": [float(r) for r in SMOKE.rhos], "backbone": SMOKE_BACKBONE,
             "presets": {SMOKE.preset: {"stage1_fraction": 0.005, "stage2_fraction": 0.1}}}
    path.write_text(yaml.safe_dump({"version": doc["version"], "benchmarks": {SMOKE.dataset: bench}}))
    return path


def write_smoke_tar(path: Path) -> Path:
    """Random JPEGs in the layout of cifar10-jpeg.tar.gz, each class around a colour of its own."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, per_class in SMOKE_IMAGES.items():
            for c, name in enumerate(CIFAR10_CLASSES):
                colour = torch.rand((1, 3, 1, 1), generator=gen) * 255
                noise = torch.randn((per_class, 3, 32, 32), generator=gen) * 40
                for i, image in enumerate((colour + noise).clamp(0, 255).to(torch.uint8)):
                    buffer = io.BytesIO()
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=75)
                    jpeg = buffer.getvalue()
                    info = tarfile.TarInfo(f"{DATA_TOP}/{split}/{name}/{i:04d}.jpg")
                    info.size = len(jpeg)
                    tar.addfile(info, io.BytesIO(jpeg))
    return path


def extract(tar_path: Path, into: Path, log: Log) -> Path:
    """The image folder of `tar_path` under `into`, unpacked once (into a temporary folder
    first, so that an interrupted unpacking never passes for the data)."""
    root = into / DATA_TOP
    if root.is_dir():
        return root
    if not tar_path.is_file():
        sys.exit(f"no {tar_path}: bench/gpu_prep.py copies cifar10-jpeg.tar.gz into .devdata/ (bring it along)")
    log(f"extracting {tar_path} into {into}")
    partial = into / ".extracting"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(partial, filter="data")
    os.replace(partial / DATA_TOP, root)
    shutil.rmtree(partial)
    return root


# ---------------------------------------------------------------- the output folder

class Layout:
    def __init__(self, out: Path):
        self.out = out
        self.figures = out / "figures.json"
        self.store = out / "results.db"          # the table and the balanced run
        self.speed_store = out / "speed.db"      # the timed runs
        self.cache = out / "cache"               # the table's checkpoints; decoded images (HARNESS_CACHE)
        self.speed_cache = out / "cache-speed"   # a timed run's checkpoints, removed once it is timed
        self.reports = out / "reports"
        self.board = out / "board.csv"
        self.junit = out / "correctness.xml"
        self.data = out / "data"
        self.smoke = out / "smoke"
        self.log = out / "proof.log"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def completed_runs(db: Path, **match) -> list:
    """The completed runs of the store at `db` whose columns equal `match`."""
    from harness.store import Store

    with Store(sqlite_url(db)) as store:
        return [r for r in store.list_runs()
                if r.status == "completed" and all(getattr(r, k) == v for k, v in match.items())]


def top1_on_test(run) -> float:
    return next(m.top1 for m in run.metrics if m.split == "test" and m.group == "all")


def repeated(flag: str, values) -> list[str]:
    """A multi-value option as one flag per value, the form every version of the CLI takes."""
    return [arg for value in values for arg in (flag, str(value))]


# ---------------------------------------------------------------- the steps

class Proof:
    def __init__(self, target: Target, layout: Layout, budget: Budget, log: Log, tar: Path):
        self.target, self.layout, self.budget, self.log, self.tar = target, layout, budget, log, tar
        self.figures = json.loads(layout.figures.read_text()) if layout.figures.is_file() else {}
        described = {"dataset": target.dataset, "rhos": list(target.rhos), "seeds": list(target.seeds),
                     "preset": target.preset,
                     "phases": {ph.name: {"methods": list(ph.methods) or "every other registered method",
                                          "rhos": list(ph.rhos)} for ph in target.phases},
                     "device": target.device, "smoke": target.smoke}
        if self.figures.setdefault("target", described) != described:
            sys.exit(f"{layout.figures} holds figures of another target ({self.figures['target']}); "
                     "use another --out")
        self.failed: list[str] = []

    @functools.cached_property
    def data_root(self) -> Path:
        """The image folder, extracted when a step first needs it."""
        return extract(self.tar, self.layout.data, self.log)

    def save(self) -> None:
        partial = self.layout.figures.with_suffix(".tmp")
        partial.write_text(json.dumps(self.figures, indent=1, default=str))
        os.replace(partial, self.layout.figures)

    def harness(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "harness.cli", *args]

    def time_left(self, name: str, reserve: float = EXPORT_RESERVE_S) -> float:
        seconds = self.budget.left(reserve)
        if seconds <= 0:
            self.log(f"{name}: no time left in this call; the next call does it")
        return seconds

    def run(self, name: str, cmd: list[str], reserve: float = EXPORT_RESERVE_S) -> Finished | None:
        """`cmd` within what is left of the budget less `reserve`; None when nothing is left."""
        seconds = self.time_left(name, reserve)
        if seconds <= 0:
            return None
        self.log(f"{name}: {' '.join(cmd)}")
        finished = run_bounded(cmd, seconds, self.log)
        if finished.returncode is None:
            self.log(f"{name}: stopped at the budget after {finished.seconds:.0f} s; the next call goes on")
        elif finished.ok:
            self.log(f"{name}: done in {finished.seconds:.1f} s")
        else:
            self.failed.append(name)
            self.log(f"{name}: FAILED (exit {finished.returncode}) after {finished.seconds:.1f} s")
        return finished

    # -- correctness ------------------------------------------------------------------
    def correctness(self) -> None:
        if "correctness" in self.figures:
            self.log("correctness: recorded in figures.json")
            return
        from tests.test_cuda import UPDATE_TOLERANCE

        self.layout.junit.unlink(missing_ok=True)
        finished = self.run("correctness", [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs",
                                            "-p", "no:cacheprovider", f"--junitxml={self.layout.junit}"])
        if finished is None or finished.returncode is None:
            return
        tests = junit_outcomes(self.layout.junit) if self.layout.junit.is_file() else {}
        counts = Counter(t["outcome"] for t in tests.values())
        status = {0: "passed", 1: "failed"}.get(finished.returncode, f"error (pytest exit {finished.returncode})")
        if status == "passed" and not counts["passed"]:
            status = "skipped"
        self.figures["correctness"] = {
            "status": status, "tests": tests,
            **{outcome: q(counts[outcome], "tests") for outcome in ("passed", "failed", "error", "skipped")},
            "bf16_update_tolerance": q(UPDATE_TOLERANCE, "relative distance of two trainings' parameter updates"),
            "wall": q(finished.seconds, "s")}
        self.save()

    # -- speed --------------------------------------------------------------------------
    def speed(self) -> None:
        speed = self.figures.setdefault("speed", {})
        parts = (("throughput", self.throughput), ("data_loading", self.data_loading),
                 ("single_run", lambda: self.timed_run("single", self.target.seeds[:1])),
                 ("concurrent_runs", lambda: self.timed_run("concurrent", self.target.seeds)))
        for name, measure in parts:
            if name in speed:
                self.log(f"speed: {name} recorded in figures.json")
                continue
            measured = measure()
            if measured is None:
                return
            speed[name] = measured
            self.save()

    def throughput(self) -> dict | None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "throughput.json"
            finished = self.run("speed: throughput", [sys.executable, "bench/throughput.py", "--device",
                                                      self.target.device, *self.target.throughput, "--json", str(out)])
            return json.loads(out.read_text()) if finished is not None and finished.ok else None

    def data_loading(self) -> dict | None:
        """Decoding the JPEG folder and cutting the LT subset, as a run does before it trains:
        once with an empty decoded-image cache, once reading it back."""
        from harness.runner import RunRequest, prepare

        if self.time_left("speed: data loading") <= 0:
            return None

        _, spec, cfg = prepare(RunRequest(method="ce", dataset=self.target.dataset, rho=float(self.target.rhos[0]),
                                          preset=self.target.preset), seed=0)
        seconds = []
        with tempfile.TemporaryDirectory() as cache:
            os.environ["HARNESS_CACHE"], kept = cache, os.environ["HARNESS_CACHE"]
            try:
                for _ in range(2):
                    start = time.perf_counter()
                    data = spec.build(cfg.rho, cfg.generator, cfg.val_per_class, self.data_root)
                    data.checksum()
                    seconds.append(time.perf_counter() - start)
            finally:
                os.environ["HARNESS_CACHE"] = kept
        return {"decode_jpegs_and_cut": q(seconds[0], "s"), "from_decoded_cache_and_cut": q(seconds[1], "s"),
                "train_images": q(len(data.train_y), "images"), "test_images": q(len(data.test_y), "images"),
                "where": "host (CPU), one process"}

    def timed_run(self, name: str, seeds: tuple[int, ...]) -> dict | None:
        """One `harness run` of CE at the first ratio for `seeds` (trained together), from
        nothing: a fresh checkpoint cache, so no stage 1 is reused or resumed."""
        cache = self.layout.speed_cache
        shutil.rmtree(cache, ignore_errors=True)
        before = {r.id for r in completed_runs(self.layout.speed_store)}
        finished = self.run(f"speed: {name} run", self.harness(
            "run", "--method", "ce", "--dataset", self.target.dataset, "--rho", self.target.rhos[0],
            "--preset", self.target.preset, *repeated("--seed", seeds), "--device", self.target.device,
            "--data-root", str(self.data_root), "--db", sqlite_url(self.layout.speed_store),
            "--cache-dir", str(cache), "--no-progress"))
        shutil.rmtree(cache, ignore_errors=True)
        if finished is None or not finished.ok:
            return None
        runs = sorted((r for r in completed_runs(self.layout.speed_store) if r.id not in before), key=lambda r: r.seed)
        training = sum(r.extra["stage1_seconds"] for r in runs)   # each run holds its share of the joint training
        in_runs = sum(r.wall_seconds for r in runs)
        return {
            "seeds": [r.seed for r in runs], "run_ids": [r.id for r in runs], "device": runs[0].device,
            "engine": sorted({r.extra["stage1_engine"] for r in runs}),
            "process_wall": q(finished.seconds, "s"),
            "training": q(training, "s"),
            "evaluation": q(in_runs - training, "s"),
            "startup_and_data_loading": q(finished.seconds - in_runs, "s"),
            "epochs": q(runs[0].config["recipe"]["stage1"]["epochs"], "epochs"),
            "top1": {str(r.seed): q(top1_on_test(r), "%") for r in runs}}

    # -- table --------------------------------------------------------------------------
    def phase_methods(self, phase: Phase) -> list[str]:
        if phase.methods:
            return list(phase.methods)
        from harness.registry import METHODS

        named = {m for ph in self.target.phases for m in ph.methods}
        rest = [m for m in METHODS.names() if m not in named]
        return sorted(rest, key=lambda m: m not in POSTHOC_FIRST)   # stable: registry order otherwise

    def phase_seeds(self, phase: Phase) -> tuple[int, ...]:
        return self.target.seeds[:1] if phase.one_seed else self.target.seeds

    def precision(self, asked: str | None = None) -> str:
        """What the target's runs compute in: `asked`, else its device's default."""
        import torch

        from harness.engine import precision_on

        return precision_on(torch.device(self.target.device), asked)

    def phase_command(self, phase: Phase) -> list[str]:
        """A phase's runs into the proof's store and cache: a sweep of its methods x ratios x
        seeds (what the store holds already is skipped)."""
        val = () if phase.val_per_class is None else ("--val-per-class", str(phase.val_per_class))
        val += () if phase.precision is None else ("--precision", phase.precision)
        return self.harness("sweep", "--datasets", self.target.dataset, *repeated("--methods", self.phase_methods(phase)),
                            *repeated("--rho", phase.rhos), *repeated("--seeds", self.phase_seeds(phase)), *val,
                            "--preset", self.target.preset, "--device", self.target.device,
                            "--data-root", str(self.data_root), "--db", sqlite_url(self.layout.store),
                            "--cache-dir", str(self.layout.cache), "--no-progress")

    def table(self) -> None:
        table = self.figures.setdefault("table", {"phases": {}})
        for phase in self.target.phases:
            record = table["phases"].setdefault(phase.name, {
                "methods": self.phase_methods(phase), "rhos": list(phase.rhos), "seeds": list(self.phase_seeds(phase)),
                "calls": [], "complete": False})
            if record["complete"]:
                self.log(f"table: {phase.name} is recorded complete in figures.json")
                continue
            started = utc_now()
            finished = self.run(f"table: {phase.name}", self.phase_command(phase), self.target.report_reserve_s)
            if finished is None:
                break
            record["calls"].append({
                "started": started.isoformat(), "ended": utc_now().isoformat(), "elapsed": q(finished.seconds, "s"),
                "stopped_at_budget": finished.returncode is None, "exit": q(finished.returncode, "exit status"),
                "failed_jobs": [line for line in finished.lines if "FAILED" in line]})
            record["complete"] = finished.ok   # a failed job is retried by the next call; later phases go on now
            self.save()
            if finished.returncode is None:
                break   # the budget is spent: the next call goes on from this phase
        if table["phases"].get(BALANCED.name, {}).get("complete") and "balanced" not in table:
            table["balanced"] = self.balanced()
            self.save()
        other = next((ph for ph in self.target.phases if ph.precision), None)
        if other and table["phases"].get(other.name, {}).get("complete") and "precision" not in table:
            table["precision"] = self.precision_effect(other)
            self.save()
        self.report(table)

    def balanced(self) -> dict:
        """CE on balanced CIFAR-10 (ρ = 1, no validation split: every training image is kept),
        against the 92.5-93 % a ResNet-32 reaches on the original images."""
        run = self.balanced_runs()[-1]
        top1 = top1_on_test(run)
        low, high = ORIGINAL_BALANCED_TOP1
        return {"run_id": run.id, "top1": q(top1, "%"), "wall": q(run.wall_seconds, "s"),
                "original_images_top1": {"low": q(low, "%"), "high": q(high, "%")},
                "jpeg_penalty": {"low": q(low - top1, "percentage points"),
                                 "high": q(high - top1, "percentage points")}}

    def precision_effect(self, phase: Phase) -> dict:
        """CE at the phase's ratio and seeds in the device's default precision and in the phase's:
        what the precision changes in top-1 (a mean over the seeds) and in a run's time."""
        seeds = set(self.phase_seeds(phase))
        runs = [r for r in completed_runs(self.layout.store, method="ce", dataset=self.target.dataset,
                                          rho=float(phase.rhos[0]), preset=self.target.preset) if r.seed in seeds]
        by_precision = {}
        for precision in (self.precision(), self.precision(phase.precision)):
            mine = [r for r in runs if r.extra.get("precision") == precision]
            by_precision[precision] = {
                "runs": q(len(mine), "runs"),
                "top1": q(sum(map(top1_on_test, mine)) / len(mine) if mine else None, "%"),
                "wall": q(sum(r.wall_seconds for r in mine) / len(mine) if mine else None, "s")}
        default, asked = (by_precision[p]["top1"]["value"] for p in by_precision)
        return {**by_precision, "rho": rho_key(phase.rhos[0]),
                "difference": q(None if None in (default, asked) else asked - default, "percentage points")}

    def balanced_runs(self) -> list:
        if not self.layout.store.is_file():
            return []
        return completed_runs(self.layout.store, method="ce", dataset=self.target.dataset, rho=float(BALANCED_RHO),
                              preset=self.target.preset)

    def report(self, table: dict) -> None:
        if not self.layout.store.is_file():
            return
        url = sqlite_url(self.layout.store)
        rendered = self.run("table: report", self.harness("report", "--db", url, "--out", str(self.layout.reports)))
        board = self.run("table: board", self.harness("report", "--db", url, "--format", "csv",
                                                      "--file", str(self.layout.board)))
        if rendered is None or board is None or not (rendered.ok and board.ok):
            return
        runs = completed_runs(self.layout.store, dataset=self.target.dataset, preset=self.target.preset)
        table["results"] = board_results(self.layout.board, self.target, runs, self.precision())
        table["timing"] = {ph.name: phase_timing(runs, table["phases"][ph.name]["calls"], ph.rhos,
                                                 self.phase_methods(ph), self.phase_seeds(ph), self.precision(ph.precision))
                           for ph in self.target.phases if ph.name in table["phases"]}
        table["reports"] = str(self.layout.reports.relative_to(self.layout.out) / "index.html")
        self.save()

    def reused_stage1(self) -> set[str]:
        """The stage-1 checkpoints a job still to run will read: those of completed runs whose
        chain (the same data, ratio and stage-1 recipe) has a job left in a phase not complete,
        e.g. CE's for post-hoc LA and NCM when the call ends between phases."""
        if not self.layout.store.is_file():
            return set()
        from harness.runner import RunRequest
        from harness.sweep import chain_key, plan

        done = self.figures.get("table", {}).get("phases", {})
        pending = set()
        for ph in self.target.phases:
            if not done.get(ph.name, {}).get("complete"):
                base = RunRequest(method="ce", dataset=self.target.dataset, rho=1.0, preset=self.target.preset,
                                  val_per_class=ph.val_per_class, precision=ph.precision,
                                  db=sqlite_url(self.layout.store))
                pending |= {p.chain for p in plan(base, self.phase_methods(ph), [self.target.dataset], list(ph.rhos),
                                                  self.phase_seeds(ph)) if p.request.seeds}
        return {run.extra["stage1_checkpoint"] for run in completed_runs(self.layout.store, dataset=self.target.dataset)
                if "stage1_checkpoint" in run.extra
                and chain_key(run.dataset, run.rho, run.config["recipe"]["stage1"], run.config.get("precision"))
                in pending}

    # -- what is left --------------------------------------------------------------------
    def pending(self) -> list[str]:
        speed, table = self.figures.get("speed", {}), self.figures.get("table", {})
        missing = [] if "correctness" in self.figures else ["correctness"]
        missing += [f"speed: {part}" for part in ("throughput", "data_loading", "single_run", "concurrent_runs")
                    if part not in speed]
        missing += [f"table: {ph.name}" for ph in self.target.phases
                    if not table.get("phases", {}).get(ph.name, {}).get("complete")]
        missing += [] if "results" in table else ["table: report"]
        return missing


def junit_outcomes(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    outcomes = {"failure": "failed", "error": "error", "skipped": "skipped"}
    tests = {}
    for case in ET.parse(path).iter("testcase"):
        problem = next((child for child in case if child.tag in outcomes), None)
        tests[case.get("name")] = {"outcome": "passed" if problem is None else outcomes[problem.tag],
                                   "time": q(float(case.get("time", 0)), "s"),
                                   **({} if problem is None else {"message": (problem.get("message") or "")[:500]})}
    return tests


def board_results(board: Path, target: Target, runs: list, default_precision: str) -> dict:
    """Per ratio and method: mean top-1 over the seeds, the paper's number and Δ where the
    report found a reference whose protocol matches ours, and the engine each stage ran on.
    A method's row in another precision than the device's default is "<method> (<precision>)"."""
    engines: dict[tuple, set] = {}
    for r in runs:
        for stage in ("stage1_engine", "stage2_engine"):
            if stage in r.extra:
                engines.setdefault((r.rho, r.method, r.extra.get("precision")), set()).add(
                    f"{stage[:6]}: {r.extra[stage]}")
    results: dict[str, dict] = {}
    with open(board, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["dataset"] != target.dataset or row["preset"] != target.preset:
                continue
            number = lambda key: float(row[key]) if row[key] else None   # noqa: E731
            delta = number("delta")
            name = row["method"] if row["precision"] == default_precision else f"{row['method']} ({row['precision']})"
            results.setdefault(rho_key(row["rho"]), {})[name] = {
                "top1": q(number("all_mean"), "%"), "top1_std": q(number("all_std"), "percentage points"),
                "seeds": q(int(row["n"]), "runs"), "paper": q(number("paper"), "%"),
                "delta": q(delta, "percentage points"), "within_1_point": None if delta is None else abs(delta) <= 1.0,
                "paper_differs": row["paper_differs"],
                "engines": sorted(engines.get((float(row["rho"]), row["method"], row["precision"]), ()))}
    return results


def phase_timing(runs: list, calls: list[dict], rhos, methods: list[str], seeds, precision: str) -> dict:
    """One phase of the table: its runs' own compute (Σ wall_seconds: training shares and
    evaluation), and the elapsed time of its calls until its last run finished, summed over the
    calls (the time between calls left out; data loading and start-up included)."""
    rhos = {float(rho) for rho in rhos}
    here = [r for r in runs if r.rho in rhos and r.method in methods and r.seed in seeds
            and r.extra.get("precision") == precision]
    expected = len(methods) * len(rhos) * len(seeds)
    done = {(r.rho, r.method, r.seed) for r in here}
    elapsed = None
    if len(done) == expected:
        last = max(r.finished_at.astimezone(timezone.utc).replace(tzinfo=None) if r.finished_at.tzinfo
                   else r.finished_at for r in here)
        elapsed = sum(max(0.0, min((last - datetime.fromisoformat(call["started"])).total_seconds(),
                                   call["elapsed"]["value"])) for call in calls)
    return {"runs": q(len(done), "runs"), "expected": q(expected, "runs"),
            "compute": q(sum(r.wall_seconds for r in here) / 60, "min"),
            "elapsed": q(None if elapsed is None else elapsed / 60, "min")}


def goal(measured, rule: str, target: float, unit: str, what: str) -> dict:
    met = None if measured is None else (measured <= target if rule == "<=" else measured >= target)
    return {"what": what, "target": q(target, unit), "rule": rule, "measured": q(measured, unit), "met": met}


def goals(figures: dict, target: Target) -> dict:
    speed, table = figures.get("speed", {}), figures.get("table", {})
    single = speed.get("single_run")
    first = rho_key(target.rhos[0])
    timed = target.phases[0]
    compared = {f"rho {rho_key(rho)} {method}": row for rho in target.rhos
                for method, row in table.get("results", {}).get(rho_key(rho), {}).items()
                if row["within_1_point"] is not None}
    return {
        "one_run": goal(single and single["training"]["value"] + single["evaluation"]["value"], "<=", 30, "s",
                        f"one {single['epochs']['value'] if single else '?'}-epoch CE run at rho {first}: training "
                        "and evaluation (its wall_seconds); start-up and data loading are in speed.single_run"),
        "engine_vs_reference_loop": goal(speed.get("throughput", {}).get("a/c", {}).get("value"), ">=", 10, "x",
                                         "images/s of the engine over the reference loop (a/c), same device, "
                                         "same process"),
        "table": goal(table.get("timing", {}).get(timed.name, {}).get("elapsed", {}).get("value"), "<=", 15, "min",
                      f"the {timed.name} table ({' '.join(timed.methods)}) x {len(target.seeds)} seeds at rho "
                      f"{' '.join(timed.rhos)}, elapsed"),
        "within_1_point": {
            "what": "every method and ratio whose paper reference matches our protocol: |Δ| <= 1 point (our images "
                    "are the JPEG q75 copy: table.balanced.jpeg_penalty says what that costs)",
            "target": q(1.0, "percentage points"), "compared": sorted(compared),
            "outside": {m: r["delta"] for m, r in compared.items() if not r["within_1_point"]},
            "met": all(r["within_1_point"] for r in compared.values()) if compared else None},
    }


# ---------------------------------------------------------------- carrying state between calls

def restore(layout: Layout, log: Log) -> None:
    """Unpack the checkpoints a previous call exported (resume-N.tar) into a fresh cache/."""
    parts = sorted(layout.out.glob("resume-*.tar"))
    if layout.cache.exists() or not parts:
        return
    log(f"restoring checkpoints from {', '.join(p.name for p in parts)}")
    for part in parts:
        with tarfile.open(part) as tar:
            tar.extractall(layout.cache, filter="data")


def resume_files(layout: Layout, seeds: int, reused: set[str]) -> list[Path]:
    """The checkpoints a later call can need. Epoch checkpoints (partial/): all, the previous
    one only where its newer one is missing. Stage-1 checkpoints: those named in `reused` (a
    completed run's, whose chain has a job left), and the newest chain's, one per seed (a
    one-worker sweep runs one chain at a time: a call can end before its first run is stored)."""
    partial = sorted((layout.cache / "partial").glob("*.pt"))
    newest = [p for p in partial if not p.name.endswith(".prev.pt")]
    previous = [p for p in partial if p.name.endswith(".prev.pt")
                and not p.with_name(p.name.removesuffix(".prev.pt") + ".pt").exists()]
    stage1 = sorted((layout.cache / "stage1").glob("*.pt"), key=lambda p: p.stat().st_mtime)
    return newest + previous + [p for i, p in enumerate(stage1) if p.name in reused or i >= len(stage1) - seeds]


def export(layout: Layout, dest: Path, target: Target, log: Log, reused: set[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for db in (layout.store, layout.speed_store):
        if db.is_file():
            with sqlite3.connect(db) as con:   # fold the write-ahead log in: the .db file alone is the store
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            written.append(Path(shutil.copyfile(db, dest / db.name)))
    for path in (layout.figures, layout.log):
        if path.is_file():
            written.append(Path(shutil.copyfile(path, dest / path.name)))
    if layout.reports.is_dir():
        with tarfile.open(dest / "reports.tar.gz", "w:gz") as tar:
            tar.add(layout.reports, arcname="reports")
        written.append(dest / "reports.tar.gz")
    parts: list[list[Path]] = []
    for path in resume_files(layout, len(target.seeds), reused):
        if not parts or sum(p.stat().st_size for p in parts[-1]) + path.stat().st_size > EXPORT_PART_BYTES:
            parts.append([])
        parts[-1].append(path)
    for i, files in enumerate(parts, 1):
        with tarfile.open(dest / f"resume-{i}.tar", "w") as tar:
            for path in files:
                tar.add(path, arcname=str(path.relative_to(layout.cache)))
        written.append(dest / f"resume-{i}.tar")
    too_big = [p.name for p in written if p.stat().st_size >= 16 * 2**20]
    if len(written) > 8 or too_big:
        log(f"export: WARNING: {len(written)} files, too big: {too_big or 'none'}; a GPU machine brings back "
            "at most 8, each under 16 MiB")
    log(f"export: {', '.join(p.name for p in written)} -> {dest}")


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the output folder, read back by the next call")
    ap.add_argument("--step", choices=STEPS, help="one step (default: all, in order, as far as the budget goes)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="this call's time; it ends within it")
    ap.add_argument("--export", type=Path, help="also write what a later call needs here (8 files, < 16 MiB each)")
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU on tiny synthetic data")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="installed where the harness is not")
    ap.add_argument("--data", type=Path, default=REPO / ".devdata" / "cifar10-jpeg.tar.gz")
    args = ap.parse_args(argv)
    target = SMOKE if args.smoke else GPU
    layout = Layout(args.out.resolve())
    if args.export and args.export.resolve() == layout.out:
        ap.error("--export must name another folder than --out")
    layout.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    log = Log(layout.log)
    steps = (args.step,) if args.step else STEPS
    log(f"== {utc_now():%Y-%m-%d %H:%M:%S} UTC: {', '.join(steps)} for {target.dataset} on {target.device}, "
        f"budget {args.budget_s:.0f} s")

    restore(layout, log)
    paths = [str(REPO)]   # the checkout's harness; the installed distribution adds its entry points
    if not harness_installed():
        paths.append(str(install_wheels(args.wheels, log)))
    tar = args.data
    if target.smoke:
        paths.append(str(write_smoke_plugin(layout.smoke / "site")))
        os.environ["HARNESS_BENCHMARKS"] = str(write_smoke_benchmarks(layout.smoke / "benchmarks.yaml"))
        tar = layout.smoke / "cifar10-smoke.tar.gz"
        if not tar.is_file():
            write_smoke_tar(tar)
    sys.path[:0] = paths
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + inherited)
    os.environ["HARNESS_CACHE"] = str(layout.cache)   # where the harness keeps decoded images
    os.environ["PYTHONUNBUFFERED"] = "1"
    check_entry_points()

    proof = Proof(target, layout, budget, log, tar)
    for step in steps:
        getattr(proof, step)()
    proof.figures["goals"] = goals(proof.figures, target)
    proof.save()
    log(json.dumps(proof.figures["goals"], indent=1, default=str))
    pending = proof.pending()
    log(f"pending: {', '.join(pending)} (call again)" if pending else "every step is recorded in figures.json")
    if args.export:
        export(layout, args.export, target, log, proof.reused_stage1())
    return 1 if proof.failed else 0


if __name__ == "__main__":
    sys.exit(main())
