"""Crash safety: epoch checkpoints, resume to the same numbers, corrupt checkpoints, kill -9."""
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from harness.checkpoints import load_epoch_checkpoint
from harness.engine import DeviceData, Trainer, fit_many
from harness.store import Run, Store
from tests.test_cli import plugin_env
from tests.test_engine import small_setup, spec_for


class Interrupt(Exception):
    pass


def stop_after(epoch_to_stop):
    def progress(epoch, epochs, loss):
        if epoch == epoch_to_stop:
            raise Interrupt
    return progress


def hook_spec(**kw):
    """A spec with a stateful after-step hook, as WB's MaxNorm has."""
    counter = torch.zeros((), dtype=torch.long)

    def count():
        counter.add_(1)
    count.state_tensors = lambda: [counter]
    return spec_for(epochs=5, after_step=count, **kw), counter


def train_states(ckpt=None, stop=None, sampler="instance"):
    data, model = small_setup(0)
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    spec, counter = hook_spec(sampler=sampler)
    trainer = Trainer(model, dd, spec, seed=3)
    try:
        [log] = fit_many([trainer], stop_after(stop) if stop is not None else None, [ckpt])
    except Interrupt:
        return None
    return model.state_dict(), log, int(counter)


def assert_same(a, b):
    (sa, la, ca), (sb, lb, cb) = a, b
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert la.epoch_loss == lb.epoch_loss and la.steps == lb.steps and ca == cb


@pytest.mark.parametrize("sampler", ["instance", "class_aware"])
def test_interrupted_training_resumes_to_identical_weights(tmp_path, sampler):
    reference = train_states(sampler=sampler)
    ckpt = tmp_path / "run.pt"
    assert train_states(ckpt, stop=2, sampler=sampler) is None  # dies after epoch 2's checkpoint
    assert load_epoch_checkpoint(ckpt)["epoch"] == 3
    resumed = train_states(ckpt, sampler=sampler)
    assert resumed[1].resumed_from == 3
    assert_same(reference, resumed)


def test_corrupt_checkpoint_falls_back_to_the_previous_then_to_scratch(tmp_path):
    reference = train_states()
    ckpt = tmp_path / "run.pt"
    train_states(ckpt, stop=2)
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as a torn copy would be
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        resumed = train_states(ckpt)
    assert resumed[1].resumed_from == 2  # the previous epoch's checkpoint
    assert_same(reference, resumed)

    train_states(ckpt, stop=1)
    for path in (ckpt, tmp_path / "run.prev.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning) as caught:
        scratch = train_states(ckpt)
    said = [str(w.message) for w in caught]
    assert sum("unreadable checkpoint" in m for m in said) == 2 and any("training from scratch" in m for m in said)
    assert scratch[1].resumed_from is None
    assert_same(reference, scratch)


def test_ctrl_c_marks_the_run_failed_in_one_line_and_the_rerun_resumes(tmp_path):
    env, _ = plugin_env(tmp_path)
    env.update(HARNESS_DB=f"sqlite:///{tmp_path / 'r.db'}", HARNESS_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, "-m", "harness.cli", "run", "--method", "ce", "--dataset", "synth-lt", "--rho", "100",
            "--epochs", "150", "--device", "cpu", "--no-progress"]
    # SIGINT back to its default in the child: a shell's background job (CI) ignores it, and so would Python
    victim = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None and not any((tmp_path / "cache").glob("partial/*.pt")):
        time.sleep(0.005)
    victim.send_signal(signal.SIGINT)
    _, stderr = victim.communicate(timeout=120)
    assert victim.returncode == 130, stderr
    [row] = Store(env["HARNESS_DB"]).list_runs()
    assert row.status == "failed"
    assert row.error == "interrupted (Ctrl-C); the same command resumes from the last epoch's checkpoint"
    assert f"interrupted: run {row.id} marked failed; the same command resumes" in stderr
    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "resuming stage 1 at epoch" in rerun.stderr, rerun.stderr


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_numbers(tmp_path):
    base_env, _ = plugin_env(tmp_path)
    args = [sys.executable, "-m", "harness.cli", "run", "--method", "ce", "--dataset", "synth-lt", "--rho", "100",
            "--epochs", "150", "--device", "cpu", "--no-progress"]

    def env_for(name):
        return {**base_env, "HARNESS_DB": f"sqlite:///{tmp_path / name}.db", "HARNESS_CACHE": str(tmp_path / name)}

    # the run that dies: killed as soon as its first epoch checkpoint is on disk
    victim = subprocess.Popen(args, env=env_for("crash"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    partial = tmp_path / "crash" / "partial"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None and not any(partial.glob("*.pt")):
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    crash_store = Store(f"sqlite:///{tmp_path / 'crash'}.db")
    [dead] = crash_store.list_runs()
    assert dead.status == "running" and not dead.metrics  # no half result
    assert dead.extra["process"]["pid"] == victim.pid
    listed = subprocess.run([sys.executable, "-m", "harness.cli", "list", "runs"], env=env_for("crash"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert "running (process gone)" in listed.stdout, listed.stdout + listed.stderr
    shown = subprocess.run([sys.executable, "-m", "harness.cli", "show", dead.id], env=env_for("crash"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert re.search(r"^status +running \(process gone\)$", shown.stdout, re.M), shown.stdout + shown.stderr

    rerun = subprocess.run(args, env=env_for("crash"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    [said] = [line for line in rerun.stderr.splitlines() if line.startswith("resuming")]
    assert re.fullmatch(r"resuming stage 1 at epoch (\d+) of 150 \((\d+) done; checkpoint .*\.pt\)", said), said
    clean = subprocess.run(args, env=env_for("clean"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr

    runs = {r.id: r for r in crash_store.list_runs()}
    resumed = next(r for r in runs.values() if r.id != dead.id)
    assert resumed.status == "completed" and 1 <= resumed.extra["stage1_resumed_from_epoch"] < 150
    # the rerun found the row's process gone before it started: it closed the row first
    assert f"run {dead.id} was still `running`, but its process is gone" in rerun.stderr
    assert runs[dead.id].status == "failed" and f"pid {victim.pid} on" in runs[dead.id].error
    [reference] = Store(f"sqlite:///{tmp_path / 'clean'}.db").list_runs()
    full_resumed, full_reference = crash_store.get_run(resumed.id), Store(
        f"sqlite:///{tmp_path / 'clean'}.db").get_run(reference.id)
    metrics = lambda run: sorted((m.split, m.group, m.top1) for m in run.metrics)  # noqa: E731
    assert metrics(full_resumed) == metrics(full_reference)
    norms = lambda run: [c.weight_norm for c in sorted(run.class_metrics, key=lambda c: c.class_index)]  # noqa: E731
    assert norms(full_resumed) == pytest.approx(norms(full_reference), abs=1e-6)
    assert not any((tmp_path / "crash" / "partial").glob("*.pt"))  # cleaned up once stage 1 is done


def test_a_resumed_class_aware_stage_draws_the_samples_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """The sampler's class and per-class cycles are part of the checkpoint: the epochs after a
    resume draw exactly the indices the uninterrupted training drew."""
    from harness.samplers import ClassAwareSampler

    drawn = []
    real_draw = ClassAwareSampler.draw

    def recording_draw(self, n, batch):
        out = real_draw(self, n, batch)
        drawn.append(out.copy())
        return out

    monkeypatch.setattr(ClassAwareSampler, "draw", recording_draw)
    reference = train_states(sampler="class_aware")
    uninterrupted, drawn[:] = list(drawn), []
    ckpt = tmp_path / "stage2.pt"
    assert train_states(ckpt, stop=1, sampler="class_aware") is None  # dies after epoch 1's checkpoint
    drawn.clear()
    resumed = train_states(ckpt, sampler="class_aware")
    assert resumed[1].resumed_from == 2 and len(drawn) == 3
    for after, before in zip(drawn, uninterrupted[2:]):
        assert np.array_equal(after, before)
    assert_same(reference, resumed)


def test_a_resumed_stage_2_says_so_before_its_progress(synth, monkeypatch, capsys):
    import harness.runner as runner_mod
    from harness.runner import RunRequest, execute

    real_printer = runner_mod.progress_printer

    def dies_in_stage_2(label, enabled):
        if "stage 2" not in label:
            return real_printer(label, enabled)

        def update(epoch, epochs, loss):
            if epoch == 0:
                raise Interrupt
        return update, lambda: None

    request = RunRequest(method="crt", dataset="synth-lt", rho=100, preset="paper", device="cpu", progress=False)
    monkeypatch.setattr(runner_mod, "progress_printer", dies_in_stage_2)
    with pytest.raises(Interrupt):
        execute(request)
    monkeypatch.setattr(runner_mod, "progress_printer", real_printer)
    capsys.readouterr()
    [res] = execute(request)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and said[0].startswith("resuming stage 2 at epoch 2 of 2 (1 done; checkpoint "), said
    assert res.extra["stage2_resumed_from_epoch"] == 1


def test_a_run_that_died_before_its_first_checkpoint_is_closed_by_the_rerun_that_completes_it(synth):
    """Killed before any checkpoint, a run leaves a `running` row and nothing to resume: the
    rerun trains afresh, and on completing closes the dead row, naming itself."""
    from dataclasses import replace

    from harness.runner import RunRequest, execute

    req = RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", device="cpu", progress=False)
    [first] = execute(req)
    with Store(synth) as store, store.session() as s, s.begin():   # its twin, as a kill -9 at start leaves it
        done = s.get(Run, first.run_id)
        s.add(Run(**{**{c.name: getattr(done, c.name) for c in Run.__table__.columns}, "id": "dead",
                     "status": "running"}))
    [rerun] = execute(replace(req))
    with Store(synth) as store:
        runs = {r.id: r for r in store.list_runs()}
    assert runs["dead"].status == "failed" and f"run {rerun.run_id} has since completed" in runs["dead"].error
    assert "resumed" not in runs["dead"].error and runs[first.run_id].status == "completed"

