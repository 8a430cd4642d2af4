"""bench/gpu_proof.py on the CPU: the smoke of every step, the device round trip of its output,
and the budget's stop of a subprocess group."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.store import Run, Store

REPO = Path(__file__).resolve().parent.parent
PROOF = REPO / "bench" / "gpu_proof.py"


def proof(*args, timeout=240):
    return subprocess.run([sys.executable, str(PROOF), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def bare_numbers(node, path="") -> list[str]:
    """Where figures.json holds a number that is not the value of a {"value", "unit"} figure
    (seeds are names, not measurements)."""
    if isinstance(node, dict):
        if set(node) == {"value", "unit"} and isinstance(node["unit"], str):
            return []
        return [p for key, value in node.items() if key != "seeds" for p in bare_numbers(value, f"{path}/{key}")]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in bare_numbers(value, f"{path}/{i}")]
    return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke call of every step, exported as for a GPU machine: (out folder, export folder, result)."""
    base = tmp_path_factory.mktemp("proof")
    out, exported = base / "out", base / "export"
    return out, exported, proof("--smoke", "--out", out, "--export", exported)


def test_the_smoke_runs_every_step_and_records_every_figure_with_its_unit(smoke):
    out, _, result = smoke
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    figures = json.loads((out / "figures.json").read_text())
    assert bare_numbers(figures) == []

    correctness = figures["correctness"]   # no CUDA here: every test is listed, skipped with its reason
    assert correctness["status"] == "skipped" and len(correctness["tests"]) >= 10
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in correctness["tests"].values())

    speed = figures["speed"]
    assert set(speed["throughput"]["variants"]) == {"a_engine", "b_bare", "c_reference"}
    assert speed["throughput"]["a/c"]["value"] > 0 and speed["throughput"]["workers"]["value"] >= 1
    assert speed["data_loading"]["train_images"]["value"] == 199   # n_max 50 at rho 10
    for timed, seeds in (("single_run", [0]), ("concurrent_runs", [0])):
        run = speed[timed]
        assert run["seeds"] == seeds and run["epochs"]["value"] == 1
        assert all(run[part]["value"] > 0 for part in ("training", "evaluation", "startup_and_data_loading"))
        assert run["training"]["value"] < run["process_wall"]["value"]

    table = figures["table"]   # the phases ran in their order, each to its end
    assert list(table["phases"]) == ["six-10", "balanced", "ce-bf16-10", "baselines-10"]
    assert all(ph["complete"] and not ph["calls"][0]["stopped_at_budget"] for ph in table["phases"].values())
    started = [ph["calls"][0]["started"] for ph in table["phases"].values()]
    assert started == sorted(started)
    assert set(table["results"]["10"]) == {"ce", "crt", "la_posthoc", "ce (bf16)"}
    assert table["results"]["10"]["crt"]["engines"] == ["stage1: eager", "stage2: eager"]
    timing = table["timing"]
    assert timing["six-10"]["runs"]["value"] == timing["six-10"]["expected"]["value"] == 2
    assert timing["balanced"]["runs"]["value"] == timing["baselines-10"]["runs"]["value"] == 1
    assert timing["ce-bf16-10"]["runs"]["value"] == 1   # its own run, not the default's CE of six-10
    effect = table["precision"]   # CE at rho 10 in the CPU's fp32 and in bf16
    assert effect["fp32"]["runs"]["value"] == effect["bf16"]["runs"]["value"] == 1
    assert effect["difference"]["value"] == pytest.approx(effect["bf16"]["top1"]["value"] - effect["fp32"]["top1"]["value"])
    assert table["results"]["10"]["ce (bf16)"]["seeds"]["value"] == 1
    assert 0 < timing["six-10"]["elapsed"]["value"] * 60 <= table["phases"]["six-10"]["calls"][0]["elapsed"]["value"]
    assert table["balanced"]["top1"]["unit"] == "%"
    assert (out / "reports" / "index.html").is_file()
    assert set(figures["goals"]) == {"one_run", "engine_vs_reference_loop", "table", "within_1_point"}
    assert figures["goals"]["one_run"]["measured"]["value"] > 0
    assert figures["goals"]["table"]["measured"] == timing["six-10"]["elapsed"]   # the goal times the first phase


def test_the_export_fits_the_device_tool_and_a_later_call_resumes_from_it(smoke, tmp_path):
    out, exported, result = smoke
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = sorted(p.name for p in exported.iterdir())
    assert {"figures.json", "results.db", "speed.db", "proof.log", "reports.tar.gz", "resume-1.tar"} <= set(files)
    assert len(files) <= 8 and all((exported / f).stat().st_size < 16 * 2**20 for f in files)

    # the next call on another machine gets only the exported files; its table figures were lost
    later = tmp_path / "later"
    shutil.copytree(exported, later)
    figures = json.loads((later / "figures.json").read_text())
    del figures["table"]
    (later / "figures.json").write_text(json.dumps(figures))
    again = proof("--smoke", "--out", later, "--step", "table")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "restoring checkpoints from resume-1.tar" in again.stdout and any((later / "cache" / "stage1").glob("*.pt"))
    assert "0 runs to do, 2 already in the store" in again.stdout   # the store came along: nothing trains again
    assert again.stdout.count("0 runs to do, 1 already in the store") == 3   # balanced, CE in bf16, post-hoc LA
    assert len(Store(f"sqlite:///{later / 'results.db'}").list_runs()) == 5
    assert set(json.loads((later / "figures.json").read_text())["table"]["results"]["10"]) == {
        "ce", "crt", "la_posthoc", "ce (bf16)"}


def test_a_call_that_ends_between_phases_exports_the_stage1_a_later_phase_reuses(smoke, tmp_path, monkeypatch):
    """Post-hoc LA (the last phase) reads CE's stage 1 (the first phase's): a call that ends
    before it must carry that checkpoint, though newer chains (the balanced run, CE in bf16) came since."""
    out, _, result = smoke
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    monkeypatch.syspath_prepend(str(PROOF.parent))
    gpu_proof = importlib.import_module("gpu_proof")
    monkeypatch.setenv("HARNESS_BENCHMARKS", str(out / "smoke" / "benchmarks.yaml"))
    monkeypatch.syspath_prepend(str(out / "smoke" / "site"))
    importlib.invalidate_caches()

    later = tmp_path / "later"
    shutil.copytree(out, later, ignore=shutil.ignore_patterns("data"))
    store = Store(f"sqlite:///{later / 'results.db'}")
    with store.session() as s:   # as if the call had ended before the last phase
        for run in s.query(Run).filter_by(method="la_posthoc"):
            s.delete(run)
        s.commit()
    figures = json.loads((later / "figures.json").read_text())
    figures["table"]["phases"]["baselines-10"]["complete"] = False
    (later / "figures.json").write_text(json.dumps(figures))
    (later / "cache" / "partial").mkdir(exist_ok=True)

    layout = gpu_proof.Layout(later)
    proof_ = gpu_proof.Proof(gpu_proof.SMOKE, layout, gpu_proof.Budget(60), lambda line: None, later / "none.tar.gz")
    ce = {r.extra["stage1_checkpoint"] for r in gpu_proof.completed_runs(layout.store, method="ce", rho=10.0)
          if "precision" not in r.config}   # the default's, not the bf16 phase's (a stage 1 of its own)
    assert len(ce) == 1 and proof_.reused_stage1() == ce
    for path in (later / "cache" / "stage1").glob("*.pt"):   # CE's stage 1 is the oldest: later phases came since
        os.utime(path, (1, 1) if path.name in ce else None)
    exported = {p.name for p in gpu_proof.resume_files(layout, 1, proof_.reused_stage1())}
    assert ce <= exported and len(exported) == 2   # CE's, and the newest chain's
    assert ce.isdisjoint(p.name for p in gpu_proof.resume_files(layout, 1, set()))   # the rule before: lost


def test_the_budget_interrupts_a_command_even_where_the_proof_ignores_sigint(monkeypatch):
    """Started in the background (nohup ... &), the proof ignores SIGINT and so would its
    children: the harness would not hear the budget's interrupt and be killed unawares."""
    monkeypatch.syspath_prepend(str(PROOF.parent))
    gpu_proof = importlib.import_module("gpu_proof")
    interrupted = ("import time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
                   "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        finished = gpu_proof.run_bounded([sys.executable, "-c", interrupted], 2.0, lambda line: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished.lines == ["started", "interrupted"]


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_the_budget_stops_the_whole_process_group(monkeypatch):
    monkeypatch.syspath_prepend(str(PROOF.parent))
    gpu_proof = importlib.import_module("gpu_proof")
    lines = []
    sleeper = ("import subprocess, sys, time; "
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               "print(child.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    finished = gpu_proof.run_bounded([sys.executable, "-c", sleeper], 2.0, lines.append)
    assert finished.returncode is None and not finished.ok   # stopped at the budget
    assert time.monotonic() - start < 2.0 + gpu_proof.GRACE_S
    grandchild = int(finished.lines[0])
    assert lines[0] == "  | " + finished.lines[0]   # the output is streamed to the log as it comes
    deadline = time.monotonic() + 5
    while not process_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(grandchild)
