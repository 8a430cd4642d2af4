"""Hostile and bad input, as a table: each gives one line naming the fix, exit 2, and
leaves the store as it was (no file created, no row written)."""
import pickle
import sys

import pytest
import torch
from torchvision.io import write_png

from harness.cli import main


def image_tree(root, classes=10, size=32, junk=False):
    """train/<class>/0.png + test/<class>/0.png, CIFAR-10 shaped unless told otherwise."""
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True)
            write_png(torch.full((3, size, size), 10 * c, dtype=torch.uint8), str(d / "0.png"))
            if junk and split == "train" and c == 3:
                (d / "notes.txt").write_text("not an image")
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
    "rho below 1": (lambda t: ["--rho", "0.5"], "rho must be >= 1"),
    "negative seed": (lambda t: ["--seed", "-3"], "seed must be >= 0"),
    "zero epochs": (lambda t: ["--epochs", "0"], "--epochs must be >= 1"),
    # the store is opened only once the data are known good, so these two go through `list runs`
    "unreachable database": (lambda t: ["list", "runs", "--db", f"sqlite:///{t}/no/such/dir/r.db"],
                             "cannot open results store"),
    "results.db that is not a database": (lambda t: ["list", "runs", "--db",
                                                     f"sqlite:///{write(t / 'results.db', 'junk' * 500)}"],
                                          "file is not a database"),
}


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_exit_2_and_an_unchanged_store(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_BENCHMARKS", raising=False)
    monkeypatch.delenv("HARNESS_DB", raising=False)
    setup, message = CASES[case]
    extra = setup(tmp_path)
    store_before = (tmp_path / "results.db").read_bytes() if (tmp_path / "results.db").exists() else None
    args = ["run", "--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["harness", *(extra if extra[0] == "list" else args + extra)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    store_after = (tmp_path / "results.db").read_bytes() if (tmp_path / "results.db").exists() else None
    assert store_after == store_before  # not created, not touched
