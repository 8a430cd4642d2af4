"""Hostile and bad input, as a table: each gives one line naming the fix, exit 2, and
leaves the store as it was (no file created, no row written)."""
import gc
import os
import pickle
import sqlite3
import sys

import pytest
from PIL import Image

from harness.cli import main


def image_tree(root, classes=10, size=32, junk=False):
    """train/<class>/0.png + test/<class>/0.png, CIFAR-10 shaped unless told otherwise."""
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True)
            Image.new("RGB", (size, size), (10 * c,) * 3).save(d / "0.png")
            if junk and split == "train" and c == 3:
                (d / "notes.txt").write_text("not an image, and not named as one: skipped")
                (d / "1.png").write_text("not an image, but named as one")
    return root


def truncated_cifar(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    blob = pickle.dumps({"data": b"x" * 1000, "labels": [0] * 10})
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (d / name).write_bytes(blob[: len(blob) // 2])
    return root


BAD_YAML = "version: 1\nbenchmarks:\n  cifar10-lt: {rhos: [100\n  other: 1\n"
UNKNOWN_KEY_YAML = "version: 1\nbenchmark_list: {}\nbenchmarks: {}\n"

CASES = {
    # name: (how to set it up -> extra CLI args, what the one line must say)
    "malformed benchmarks.yaml": (lambda t: ["--benchmarks", write(t / "b.yaml", BAD_YAML)],
                                  "is not valid YAML at line 4"),
    "unknown key in benchmarks.yaml": (lambda t: ["--benchmarks", write(t / "b.yaml", UNKNOWN_KEY_YAML)],
                                       "unknown top-level keys ['benchmark_list']"),
    "data root missing a class": (lambda t: ["--data-root", str(image_tree(t / "d", classes=9))],
                                  "found 9 classes, expected 10"),
    "data root with an extra class": (lambda t: ["--data-root", str(image_tree(t / "d", classes=11))],
                                      "found 11 classes, expected 10"),
    "images of the wrong size": (lambda t: ["--data-root", str(image_tree(t / "d", size=16))],
                                 "train images are (3, 16, 16), expected (3, 32, 32)"),
    "a file that is not an image": (lambda t: ["--data-root", str(image_tree(t / "d", junk=True))],
                                    "cannot decode image"),
    "truncated CIFAR pickle": (lambda t: ["--data-root", str(truncated_cifar(t / "d"))],
                               "cannot read CIFAR-10-LT under"),
    "rho below 1": (lambda t: ["--rho", "0.5"], "--rho takes a finite number >= 1"),
    "rho nan": (lambda t: ["--rho", "nan"], "--rho takes a finite number >= 1 or 'natural', got 'nan'"),
    "rho inf": (lambda t: ["--rho", "inf"], "--rho takes a finite number >= 1 or 'natural', got 'inf'"),
    "rho that leaves classes empty": (lambda t: ["--rho", "1e6"],
                                      "leaves the tail classes of cifar10-lt without a training image; "
                                      "the largest rho it allows is 5000"),
    "rho that is not a number": (lambda t: ["--rho", "ten"], "--rho takes a finite number >= 1"),
    "negative seed": (lambda t: ["--seed", "-3"], "seed must be >= 0"),
    "seed past 2**32": (lambda t: ["--seed", str(2**40)], "seed must be >= 0 and < 2**32"),
    "zero epochs": (lambda t: ["--epochs", "0"], "--epochs must be >= 1"),
    "negative validation split": (lambda t: ["--val-per-class", "-1"], "--val-per-class must be >= 0"),
    "stray argument": (lambda t: ["extra"], "Got unexpected extra argument (extra); see `harness run --help`"),
    "benchmarks.yaml of random bytes": (lambda t: ["--benchmarks", write_bytes(t / "b.yaml", os.urandom(4096))],
                                        "is not a text (UTF-8) file"),
    "benchmarks.yaml that does not exist": (lambda t: ["--benchmarks", str(t / "nope.yaml")],
                                            "nope.yaml does not exist"),
    "benchmarks.yaml with a preset of no epochs": (lambda t: ["--benchmarks", write(t / "b.yaml", ZERO_PRESET_YAML)],
                                                   "stage1_fraction must be a number in (0, 1]"),
    "benchmarks.yaml with an epoch-count preset": (
        lambda t: ["--benchmarks", write(t / "b.yaml", ZERO_PRESET_YAML.replace("stage1_fraction: 0", "stage2_epochs: 2"))],
        "stage2_epochs (one epoch count for every method) is replaced by stage2_fraction"),
    "recipe without a learning rate": (lambda t: ["--benchmarks", write(t / "b.yaml", NO_LR_YAML)],
                                       "stage1.lr must be a number, got None"),
    "train_only given as one string": (lambda t: ["--benchmarks", write(t / "b.yaml", recipe_yaml("train_only: fc."))],
                                       "stage1.train_only must be a list of module-name prefixes"),
    "stage key misspelt": (lambda t: ["--benchmarks", write(t / "b.yaml", recipe_yaml("nestrov: true"))],
                           "unknown key stage1.nestrov (did you mean nesterov?)"),
    "lr milestone past the last epoch": (
        lambda t: ["--benchmarks", write(t / "b.yaml", recipe_yaml("nesterov: false").replace(
            "{kind: constant}", "{kind: warmup-step, steps: [[20, 0.1]]}"))],
        "stage1.schedule.steps epoch 20 is not an epoch of stage1's 0 ... 1; move it inside, or give stage1 more epochs"),
    "lr milestones out of order": (
        lambda t: ["--benchmarks", write(t / "b.yaml", recipe_yaml("nesterov: false").replace(
            "{kind: constant}", "{kind: warmup-step, steps: [[1, 0.1], [0, 0.01]]}"))],
        "stage1.schedule.steps must be in epoch order, got [1, 0]"),
    "DRW start past the last epoch": (lambda t: ["--benchmarks", write(t / "b.yaml", recipe_yaml("drw_epoch: 2"))],
                                      "stage1.drw_epoch 2 is not an epoch of stage1's 0 ... 1"),
    "bn_mode misspelt": (lambda t: ["--benchmarks", write(t / "b.yaml", recipe_yaml("bn_mode: evaluate"))],
                         "stage1.bn_mode must be train or eval, got 'evaluate'"),
    "data root that is a file": (lambda t: ["--data-root", write(t / "data.txt", "not a folder")],
                                 "is not a directory"),
    "cache folder that is a file": (lambda t: ["--cache-dir", write(t / "cache.txt", "x"), "--data-root",
                                               str(image_tree(t / "d"))], "cannot be used"),
    # the store is opened only once the data are known good, so these two go through `list runs`
    "unreachable database": (lambda t: ["list", "runs", "--db", f"sqlite:///{t}/no/such/dir/r.db"],
                             "no results store at"),   # `run` on it: tests/test_cli.py, "cannot open"
    "results.db that is not a database": (lambda t: ["list", "runs", "--db",
                                                     f"sqlite:///{write(t / 'junk.db', 'junk' * 500)}"],
                                          "file is not a database"),
    "database driver not installed": (lambda t: ["list", "runs", "--db", "mysql+mysqldb://u@127.0.0.1:1/x"],
                                      "no module named MySQLdb; install the database driver the URL names"),
    "results.db that is a folder": (lambda t: ["list", "runs", "--db", f"sqlite:///{mkdir(t / 'folder.db')}"],
                                    "cannot open results store"),
    "report into a file that is a folder": (lambda t: ["report", "--format", "csv", "--file", mkdir(t / "out")],
                                            "cannot write --file"),
    "report into a missing folder": (lambda t: ["report", "--format", "csv", "--file", str(t / "no" / "x.csv")],
                                     "no such folder"),
    "report site over a file": (lambda t: ["report", "--out", write(t / "reports", "a file")], "is a file"),
}

ZERO_PRESET_YAML = """version: 1
benchmarks:
  cifar10-lt:
    presets: {paper: {stage1_fraction: 0}}
    methods: {}
"""
def recipe_yaml(stage1_extra: str) -> str:
    """A runnable CE recipe for cifar10-lt, plus one stage-1 key."""
    return f"""version: 1
benchmarks:
  cifar10-lt:
    backbone: resnet32
    methods:
      ce: {{stage1: {{epochs: 2, batch_size: 8, lr: 0.1, momentum: 0.9, weight_decay: 0.0,
                    schedule: {{kind: constant}}, {stage1_extra}}}}}
"""


NO_LR_YAML = """version: 1
benchmarks:
  cifar10-lt:
    backbone: resnet32
    methods:
      ce: {stage1: {epochs: 2, batch_size: 8, momentum: 0.9, weight_decay: 0.0, schedule: {kind: constant}}}
"""


def write(path, text):
    path.write_text(text)
    return str(path)


def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


def mkdir(path):
    path.mkdir()
    return str(path)


def existing_store(path):
    """A results.db with one completed run, closed (its WAL folded back in): the bytes to keep."""
    from harness.store import Run, Store, now

    store = Store(f"sqlite:///{path}")
    store.start_run(Run(id="r1", method="ce", dataset="cifar10-lt", rho=100.0, backbone="resnet32", seed=0,
                        generator="ldam", preset="paper", config={}, config_hash="h", status="running",
                        started_at=now(), device="cpu", git_commit="abc", versions={}, data_checksum="x", extra={}))
    store.complete_run("r1", metrics=[{"split": "test", "group": "all", "top1": 70.0, "error": 30.0,
                                       "n_classes": 10}], class_metrics=[], curves=[], extra={}, wall_seconds=1.0,
                       stage1_cached=False)
    store.close()
    return path.read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_exit_2_and_an_unchanged_store(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_BENCHMARKS", raising=False)
    monkeypatch.delenv("HARNESS_DB", raising=False)
    store_before = existing_store(tmp_path / "results.db")
    setup, message = CASES[case]
    extra = setup(tmp_path)
    args = ["run", "--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["harness", *(extra if extra[0] in ("list", "report") else args + extra)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert (tmp_path / "results.db").read_bytes() == store_before  # byte-identical
    assert not [p for p in tmp_path.glob("results.db-*") if p.stat().st_size]  # no pending WAL either


def test_a_finished_run_leaves_every_row_in_results_db_and_no_connection_open(synth, tmp_path):
    """execute closes its store: with the garbage collector held off, a connection left in the
    engine's pool would keep the rows in results.db-wal, and a later process closing it would
    rewrite results.db (a byte comparison of the store flaked on exactly that)."""
    from harness.runner import RunRequest, execute

    gc.disable()
    try:
        [result] = execute(RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", device="cpu",
                                      progress=False))
        wal = tmp_path / "results.db-wal"
        assert not (wal.exists() and wal.stat().st_size), "a connection of the run is still open"
        conn = sqlite3.connect(tmp_path / "results.db")
        try:
            assert conn.execute("SELECT status FROM runs WHERE id = ?", (result.run_id,)).fetchone() == ("completed",)
        finally:
            conn.close()
    finally:
        gc.enable()


def test_a_checkpoint_path_that_is_a_folder_is_refused_before_anything_is_written(synth, tmp_path, capsys,
                                                                                   monkeypatch):
    from harness.runner import RunRequest, execute

    execute(RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", device="cpu", progress=False))
    [checkpoint] = (tmp_path / "cache" / "stage1").glob("*.pt")
    checkpoint.unlink()
    checkpoint.mkdir()  # a folder where stage 1's checkpoint belongs
    store_path = tmp_path / "results.db"
    before = store_path.read_bytes()
    monkeypatch.setattr(sys, "argv", ["harness", "run", "--method", "crt", "--dataset", "synth-lt", "--rho", "100",
                                      "--preset", "quick", "--device", "cpu", "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and f"checkpoint path {checkpoint} is not a file" in err[0], err
    assert store_path.read_bytes() == before
