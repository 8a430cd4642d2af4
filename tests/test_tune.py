"""`harness tune`: validation-only search, the best trial chosen, studies that survive a kill
and are shared by processes, trials never ranked, bad input refused before anything is written."""
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

import harness.tune as tune_mod
from harness import HarnessError
from harness.runner import RunRequest
from harness.store import Run, Store
from harness.tune import Dimension, TuneRequest, open_study, tune
from tests.test_cli import plugin_env

SPACE = ["stage1.weight_decay=loguniform(1e-4,5e-2)", "maxnorm_thresh=uniform(0,0.5)"]


def request(url, trials=3, seeds=(0,), **kw):
    run = RunRequest(method="wb", dataset="synth-lt", rho=100, preset="quick", device="cpu", db=url, progress=False,
                     seeds=list(seeds))
    return TuneRequest(run=run, params=kw.pop("params", SPACE), trials=trials, **kw)


class OffLimits(dict):
    def __getitem__(self, key):
        raise AssertionError(f"the search read a test number ({key})")


def trial_runs(url, study):
    with Store(url).session() as s:
        return list(s.scalars(select(Run).where(Run.study == study, Run.status == "completed")).all())


def val_top1(url, run_id):
    return next(m.top1 for m in Store(url).get_run(run_id).metrics if m.split == "val" and m.group == "all")


def test_the_search_never_reads_a_test_number_and_picks_the_best_validation_trial(synth, monkeypatch):
    real_execute = tune_mod.execute

    def execute_hiding_test(req):
        results = real_execute(req)
        if req.study is not None:  # a trial: its test numbers are stored, but the search must not see them
            for r in results:
                r.metrics = {"val": r.metrics["val"], "test": OffLimits()}
        return results

    monkeypatch.setattr(tune_mod, "execute", execute_hiding_test)
    result = tune(request(synth, trials=3, seeds=(0, 1)), report=lambda line: None)
    trials = trial_runs(synth, result["study"])
    assert len(trials) == 3 and all(r.preset == "quick" for r in trials)
    best = max(trials, key=lambda r: val_top1(synth, r.id))
    assert result["best_val_top1"] == pytest.approx(val_top1(synth, best.id))
    assert result["chosen"] == best.extra["trial"]["params"]
    tuned = [Store(synth).get_run(run_id) for run_id in result["runs"]]
    assert [r.seed for r in tuned] == [0, 1] and all(r.preset == "quick-tuned" and r.study is None for r in tuned)
    for r in tuned:
        assert r.config["recipe"]["stage1"]["weight_decay"] == result["chosen"]["stage1.weight_decay"]
        assert r.config["recipe"]["maxnorm_thresh"] == result["chosen"]["maxnorm_thresh"]
        assert r.extra["tuning"]["n_trials"] == 3 and r.extra["tuning"]["space"] == {  # WB's declared space
            "stage1.weight_decay": "loguniform(0.0001, 0.05)", "stage2.weight_decay": "loguniform(0.001, 1)",
            "maxnorm_thresh": "uniform(0, 0.5)"}


def test_a_longer_study_keeps_the_trials_it_had(synth):
    first = tune(request(synth, trials=2, final=False), report=lambda line: None)
    before = {r.extra["trial"]["number"]: r.extra["trial"]["params"] for r in trial_runs(synth, first["study"])}
    again = tune(request(synth, trials=3, final=False), report=lambda line: None)
    after = {r.extra["trial"]["number"]: r.extra["trial"]["params"] for r in trial_runs(synth, again["study"])}
    assert again["study"] == first["study"] and len(after) == 3 and {k: after[k] for k in before} == before
    # the second search samples anew: with the first's seed it proposed trial 0's values again
    assert len({tuple(sorted(p.items())) for p in after.values()}) == 3


def tune_args(url, trials, *extra):
    return [sys.executable, "-m", "harness.cli", "tune", "--method", "wb", "--dataset", "synth-lt", "--rho", "100",
            "--preset", "quick", "--device", "cpu", "--no-progress", "--db", url, "--trials", str(trials),
            "--param", *SPACE, *extra]


def test_a_study_killed_mid_trial_goes_on_with_the_trials_it_had(tmp_path):
    env, _ = plugin_env(tmp_path)
    env["HARNESS_CACHE"] = str(tmp_path / "cache")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    args = tune_args(url, 4, "--no-final", "--study", "killed")
    victim = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if (tmp_path / "r.db").exists() and len(Store(url).list_runs()) >= 2:  # one trial done, the next started
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the search finished before it could be killed"
    # the trials it had: every completed trial run, Optuna's record of it or not (a kill between
    # the two is added back when the study goes on)
    done_before = {r.id for r in Store(url).list_runs() if r.status == "completed"}
    assert done_before
    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"study killed: {len(done_before)} of 4 trials done" in rerun.stdout
    complete = tune_mod.complete_trials(open_study(url, "killed", 0))
    runs = {r.extra["trial"]["number"]: r.id for r in trial_runs(url, "killed")}
    counted = {t.user_attrs.get("run_id") or runs[t.number] for t in complete}
    assert len(complete) == 4 and done_before <= counted   # the trials it had, plus new ones


def test_two_processes_share_one_study_without_losing_a_trial(tmp_path, store_url):
    env, _ = plugin_env(tmp_path)
    env["HARNESS_CACHE"] = str(tmp_path / "cache")
    Store(store_url)
    workers = [subprocess.Popen(tune_args(store_url, 4, "--no-final", "--study", "shared"), env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    complete = {t.number: t.params for t in tune_mod.complete_trials(open_study(store_url, "shared", 0))}
    runs = {r.extra["trial"]["number"]: r.extra["trial"]["params"] for r in trial_runs(store_url, "shared")}
    assert len(complete) >= 4 and runs == complete  # every trial has its run, every run its trial
    # the two searches draw apart: with one seed each proposed the other's values, every trial twice
    assert len({tuple(sorted(p.items())) for p in complete.values()}) == len(complete)


@pytest.mark.parametrize("change,message", [
    (dict(params=["stage9.lr=uniform(0,1)"]), "stage9.lr not in the recipe of wb on synth-lt; keys:"),
    (dict(params=["stage1.weight_decay=loguniform(1e-4)"]), "needs two numbers lo < hi"),
    (dict(params=["stage1.weight_decay=between(1,2)"]), "is malformed"),
    (dict(params=["stage1.weight_decay=uniform(2,1)"]), "needs two numbers lo < hi"),
    (dict(params=["variant=categorical()"]), "lists no values"),
    (dict(trials=0), "--trials must be >= 1"),
])
def test_bad_searches_are_refused_before_anything_is_written(synth, tmp_path, change, message):
    with pytest.raises(HarnessError, match=message):
        tune(request(synth, **change), report=lambda line: None)
    assert not (tmp_path / "results.db").exists()


def test_a_method_without_a_space_asks_for_one(synth, tmp_path):
    req = request(synth, params=[])
    req.run.method = "ce"
    with pytest.raises(HarnessError, match="ce declares no search space; pass --param KEY=SPACE"):
        tune(req, report=lambda line: None)
    assert not (tmp_path / "results.db").exists()


def test_a_store_that_cannot_hold_a_study_is_refused(synth, tmp_path):
    url = f"sqlite:///{tmp_path / 'missing' / 'r.db'}"
    with pytest.raises(HarnessError, match="cannot open results store"):
        tune(request(url), report=lambda line: None)


def test_space_syntax():
    d = Dimension.parse("stage2.weight_decay = loguniform(1e-3, 1)")
    assert (d.key, d.kind, d.values) == ("stage2.weight_decay", "loguniform", (0.001, 1))
    assert d.text == "loguniform(0.001, 1)"
    assert Dimension.parse("variant=categorical(softmax, focal)").values == ("softmax", "focal")
    assert Dimension.parse("x=int(1,4)").values == (1, 4)


def test_an_override_of_the_benchmark_makes_another_study_and_the_default_keeps_its_name(synth):
    import hashlib
    import json

    req = request(synth)
    space = tune_mod.search_space(req)
    digest = hashlib.sha256(json.dumps([[d.key, d.text] for d in space]).encode()).hexdigest()[:8]
    assert tune_mod.study_name(req, space) == f"wb-synth-lt-rho100-quick-seed0-{digest}"   # stored studies resume
    names = {tune_mod.study_name(request(synth), space)}
    for override in ({"generator": "first"}, {"backbone": "resnet32"}, {"val_per_class": 3}, {"val_per_class": 0},
                     {"precision": "bf16"}, {"settings": {"beta": 0.999}}, {"settings": {"beta": 0.99}}):
        other = request(synth)
        other.run.__dict__.update(override)
        names.add(tune_mod.study_name(other, space))
    assert len(names) == 8
    fp32 = request(synth)
    fp32.run.__dict__.update(precision="fp32")   # the CPU's default by name: the default's study
    assert fp32.run.device == "cpu" and tune_mod.study_name(fp32, space) == tune_mod.study_name(req, space)


def test_a_value_fixed_with_set_leaves_the_declared_space_and_cannot_also_be_searched(synth):
    """WB declares stage-1 wd, stage-2 wd and the MaxNorm threshold: --set holds one of them, the
    search tunes the others on a recipe that has the fixed value."""
    req = request(synth, params=[])
    req.run.settings = {"stage1.weight_decay": 0.001}
    assert [d.key for d in tune_mod.search_space(req)] == ["stage2.weight_decay", "maxnorm_thresh"]
    req.run.settings = {"maxnorm_thresh": 0.2}
    with pytest.raises(HarnessError, match="maxnorm_thresh is both searched .--param. and fixed .--set."):
        tune_mod.search_space(TuneRequest(run=req.run, params=["maxnorm_thresh=uniform(0,0.5)"]))


def test_a_search_without_a_validation_split_is_refused_before_a_trial_trains(synth, tmp_path, monkeypatch):
    req = request(synth, trials=1)
    req.run.val_per_class = 0
    with pytest.raises(HarnessError, match="--val-per-class 0 leaves none; pass --val-per-class N"):
        tune(req, report=lambda line: None)
    assert not (tmp_path / "results.db").exists()
    # data without validation images that the request could not foretell: one line, no KeyError
    monkeypatch.setattr(tune_mod, "search_space", lambda r: [Dimension.parse(SPACE[0])])
    with pytest.raises(HarnessError, match=r"tuning needs a validation split \(--val-per-class\)"):
        tune(req, report=lambda line: None)


def orphaned_study(synth, monkeypatch):
    """A study of 2 trials whose process died between trial 1's run row and Optuna's record of
    it: (the study's name, trial 1's completed run)."""
    real_objective = tune_mod.objective

    def dying_after_trial_1(req, space, name):
        run_trial = real_objective(req, space, name)

        def objective(trial):
            value = run_trial(trial)
            if trial.number == 1:
                raise KeyboardInterrupt   # the row says completed; Optuna never hears of it
            return value
        return objective

    monkeypatch.setattr(tune_mod, "objective", dying_after_trial_1)
    with pytest.raises(KeyboardInterrupt):
        tune(request(synth, trials=2, final=False), report=lambda line: None)
    monkeypatch.setattr(tune_mod, "objective", real_objective)
    name = tune_mod.study_name(request(synth), tune_mod.search_space(request(synth)))
    [orphan] = [r for r in trial_runs(synth, name) if r.extra["trial"]["number"] == 1]
    return name, orphan


def added_back(url, name):
    return [t for t in tune_mod.complete_trials(open_study(url, name, 0)) if t.user_attrs.get("run_id")]


def test_a_trial_whose_process_died_after_its_run_counts_when_the_study_goes_on(synth, monkeypatch):
    """Killed between the run's row and Optuna's record: the run's training is not lost; the
    study, resumed, adds it as a complete trial with its validation top-1 and trains no other."""
    name, orphan = orphaned_study(synth, monkeypatch)
    lines = []
    result = tune(request(synth, trials=2, final=False), report=lines.append)
    assert f"study {name}: 2 of 2 trials done" in lines
    assert len(trial_runs(synth, name)) == 2 and result["n_trials"] == 2   # nothing trained again
    [added] = added_back(synth, name)
    assert added.user_attrs["run_id"] == orphan.id and added.params == orphan.extra["trial"]["params"]
    assert added.value == pytest.approx(val_top1(synth, orphan.id))
    again = []
    tune(request(synth, trials=2, final=False), report=again.append)   # added once, not on every start
    assert f"study {name}: 2 of 2 trials done" in again


def test_processes_going_on_with_one_study_together_add_its_orphan_back_once(synth, monkeypatch):
    """Two `harness tune` processes starting at once on a study with an orphan: each reads
    the study, then adds what is missing; the study's lock makes the second read after the
    first added (without it, the orphan was added twice, a trial counted double)."""
    import threading

    import optuna

    name, orphan = orphaned_study(synth, monkeypatch)
    real_create_trial = optuna.trial.create_trial

    def slow_create_trial(**kw):   # between reading the study and adding to it: where the race was
        time.sleep(1.0)
        return real_create_trial(**kw)

    monkeypatch.setattr(optuna.trial, "create_trial", slow_create_trial)
    space, errors = tune_mod.search_space(request(synth)), []

    def go_on():
        try:
            with Store(synth) as store:
                tune_mod.settle(synth, name, space, 0, store, report=lambda line: None)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=go_on) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [t.user_attrs["run_id"] for t in added_back(synth, name)] == [orphan.id]


def beating_trial(study, name: str, store, run_id: str):
    """A trial that has beaten once, with its run row `running`, as a `harness tune` process
    leaves them mid-training: killed, it beats no more."""
    from harness.store import now

    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    store.start_run(Run(id=run_id, method="wb", dataset="synth-lt", rho=100, backbone="b", seed=0,
                        generator="ldam", preset="quick", config={}, config_hash=run_id, status="running",
                        started_at=now(), device="cpu", git_commit="x", versions={}, data_checksum="c",
                        extra={"trial": {"number": trial.number, "params": {}}}, study=name))
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # study.ask
def test_a_trial_killed_mid_training_has_its_run_failed_once_its_heartbeat_is_stale(synth, monkeypatch):
    """kill -9 mid-trial: Optuna fails the trial once its heartbeat is older than the grace
    period; its run row, left `running` by the dead process, is failed with it. A trial
    still beating is somebody's live work, and its row is left alone."""
    monkeypatch.setattr(tune_mod, "GRACE_SECONDS", 1)
    space = tune_mod.search_space(request(synth))
    name = tune_mod.study_name(request(synth), space)
    study = open_study(synth, name, 0)
    store = Store(synth)
    trials = {label: beating_trial(study, name, store, label) for label in ("killed", "live")}
    time.sleep(2.2)   # SQLite's clock counts whole seconds: 2 of them are surely past a grace of 1
    study._storage.record_heartbeat(trials["live"]._trial_id)
    lines = []
    tune_mod.settle(synth, name, space, 0, store, report=lines.append)
    killed, live = store.get_run("killed"), store.get_run("live")
    assert killed.status == "failed" and "heartbeat stopped" in killed.error and live.status == "running"
    assert lines == ["run killed: its trial's process died mid-training; marked failed"]
    states = {t.number: t.state.name for t in open_study(synth, name, 0).trials}
    assert states == {trials["killed"].number: "FAIL", trials["live"].number: "RUNNING"}
    store.close()


def test_a_pruned_trial_stops_at_the_epoch_the_pruner_says_and_counts_as_finished(synth, monkeypatch, tmp_path):
    """--prune: every epoch's val top-1 goes to the pruner (steps counted over both stages); a
    trial it stops ends there, its run failed with the reason, and `--trials` counts it."""
    import optuna

    class PruneTrial1(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    made = []
    monkeypatch.setattr(tune_mod, "pruner", lambda prune, epochs: made.append((prune, epochs)) or PruneTrial1())
    lines = []
    result = tune(request(synth, trials=3, final=False, prune=True), report=lines.append)
    study = open_study(synth, result["study"], 0)
    trials = {t.number: t for t in study.trials}
    assert made == [(True, 3)]   # WB at preset quick: 2 stage-1 epochs + 1 stage-2 epoch
    assert {n: t.state.name for n, t in trials.items()} == {0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE"}
    assert list(trials[0].intermediate_values) == [0, 1, 2] and list(trials[1].intermediate_values) == [0]
    assert trials[0].intermediate_values[2] == pytest.approx(trials[0].value)   # the last epoch is the score
    assert result["n_trials"] == 2 and result["n_pruned"] == 1 and result["best_trial"] in (0, 2)
    with Store(synth).session() as s:
        pruned_row = s.scalars(select(Run).where(Run.study == result["study"], Run.status == "failed")).one()
    assert pruned_row.extra["trial"]["number"] == 1
    assert pruned_row.error.startswith("TrialPruned: val top-1 ")
    assert "after epoch 1 is below the median" in pruned_row.error
    assert f"trial 1: pruned after epoch 1 (val top-1 {trials[1].intermediate_values[0]:.2f}) " \
           f"at {trials[1].params}" in lines
    assert not list((tmp_path / "cache" / "partial").glob("*.pt"))   # nothing left to resume the pruned trial


def test_without_prune_no_trial_is_evaluated_between_epochs(synth, monkeypatch):
    requests, real_execute = [], tune_mod.execute
    monkeypatch.setattr(tune_mod, "execute", lambda req: requests.append(req) or real_execute(req))
    result = tune(request(synth, trials=1, final=False), report=lambda line: None)
    assert [r.on_epoch for r in requests] == [None] and "n_pruned" not in result
    assert not open_study(synth, result["study"], 0).trials[0].intermediate_values


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # study.ask
def test_a_trial_killed_just_before_a_search_began_has_its_row_closed_during_the_search(synth, monkeypatch):
    """Killed within the grace period before this search started, the trial is not dead yet at
    the start; once it is, the next trial's end closes its row."""
    monkeypatch.setattr(tune_mod, "GRACE_SECONDS", 1)
    req = request(synth, trials=1, final=False)
    space = tune_mod.search_space(req)
    name = tune_mod.study_name(req, space)
    with Store(synth) as store:
        beating_trial(open_study(synth, name, 0), name, store, "killed")
    real_execute = tune_mod.execute

    def slow_execute(run):   # the trial outlasts the killed one's grace period (SQLite counts whole seconds)
        time.sleep(2.2)
        return real_execute(run)

    monkeypatch.setattr(tune_mod, "execute", slow_execute)
    lines = []
    tune_mod.run_search(req, space, name, synth, report=lines.append)
    row = Store(synth).get_run("killed")
    assert row.status == "failed" and "heartbeat stopped" in row.error
    assert lines[-1] == "run killed: its trial's process died mid-training; marked failed"


def test_a_study_tuned_on_another_store_and_merged_goes_on_from_its_trials(synth, tmp_path):
    """`harness db merge` copies trial runs, not Optuna's tables: the study, resumed in the store
    merged into, takes the merged trials back from their rows and trains only the missing ones."""
    remote = f"sqlite:///{tmp_path / 'gpu-box.db'}"
    first = tune(request(remote, trials=2, final=False), report=lambda line: None)
    with Store(synth) as here, Store(remote) as there:
        assert here.merge_from(there)["copied"] == 2
    lines = []
    again = tune(request(synth, trials=3, final=False), report=lines.append)
    assert again["study"] == first["study"] and f"study {first['study']}: 2 of 3 trials done" in lines
    runs = trial_runs(synth, again["study"])
    assert len(runs) == 3 and again["n_trials"] == 3   # one trained here, the merged two not again
    merged_ids = {r.id for r in trial_runs(remote, first["study"])}
    assert {t.user_attrs.get("run_id") for t in added_back(synth, again["study"])} == merged_ids


def test_tuned_runs_keep_their_models_and_trials_do_not(synth, tmp_path):
    from dataclasses import replace as with_

    req = request(synth, trials=2)
    result = tune(with_(req, run=with_(req.run, save_model=str(tmp_path / "models"))), report=lambda line: None)
    assert sorted(p.stem for p in (tmp_path / "models").iterdir()) == sorted(result["runs"])
