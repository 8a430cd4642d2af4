"""The command line as a user meets it: subprocesses, real exit codes, real stores."""
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from harness.store import Run, Store
from tests.synthetic import BENCHMARKS_YAML

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def harness(*args, env=None, cwd=None, input=None):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300, input=input)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["HARNESS_DB"] = f"sqlite:///{tmp_path / 'results.db'}"
    e["HARNESS_CACHE"] = str(tmp_path / "cache")
    e.pop("HARNESS_BENCHMARKS", None)
    return e


def run_count(tmp_path):
    db = tmp_path / "results.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


@pytest.mark.parametrize("args,message", [
    (["--method", "nope", "--dataset", "cifar10-lt", "--rho", "100"], "unknown method 'nope'; known methods: balanced_softmax, cb_loss, ce, ce_drw, crt"),
    (["--method", "ce", "--dataset", "imagenet-xx", "--rho", "100"], "unknown dataset 'imagenet-xx'; known datasets:"),
    (["--method", "ce", "--dataset", "cifar10-lt", "--rho", "0.5"], "--rho takes a finite number >= 1"),
    (["--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--preset", "fast"], "unknown preset 'fast'"),
    (["--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--data-root", "/no/such/dir"],
     "data root /no/such/dir is not a directory"),
    (["--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--seed", "-1"], "seed must be >= 0"),
    (["--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, env, args, message):
    out = harness("run", *args, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert run_count(tmp_path) == 0
    assert not (tmp_path / "results.db").exists()


def test_missing_cifar_data_names_the_fixes(tmp_path, env):
    (tmp_path / "empty").mkdir()
    out = harness("run", "--method", "ce", "--dataset", "cifar10-lt", "--rho", "100", "--data-root",
                  str(tmp_path / "empty"), env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "--download" in out.stderr and "train/<class>/" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["sqlite:////no/such/dir/results.db", "postgresql+psycopg://nobody@127.0.0.1:1/none",
                                 "mysql+pymysql://nobody@127.0.0.1:1/none"])
def test_unreachable_db_is_a_clear_error(tmp_path, env, url):
    env, _ = plugin_env(tmp_path, env)
    out = harness("run", "--method", "ce", "--dataset", "synth-lt", "--rho", "100", "--db", url, env=env, cwd=tmp_path)
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()
    assert len(line) == 1 and "cannot open results store" in line[0] and "--db" in line[0]


def test_not_a_database_is_a_clear_error(tmp_path, env):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    out = harness("list", "runs", "--db", f"sqlite:///{junk}", env=env)
    assert out.returncode == 2 and "cannot open results store" in out.stderr
    assert junk.read_bytes() == b"this is not sqlite" * 100


@pytest.mark.parametrize("command", [["list", "runs"], ["show", "abc123"], ["report", "--format", "table"], ["report"]])
def test_reading_a_store_that_does_not_exist_names_the_fix_and_makes_none(tmp_path, env, command):
    """A typo in --db used to give an empty leaderboard and leave an empty results store behind."""
    typo = tmp_path / "resluts.db"
    out = harness(*command, "--db", f"sqlite:///{typo}", env=env, cwd=tmp_path)
    line = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(line) == 1, out.stderr
    assert f"no results store at {typo}; check --db / HARNESS_DB" in line[0]
    assert not typo.exists() and not list(tmp_path.glob("resluts.db*"))
    assert not (tmp_path / "reports").exists()   # nor the report's --out folder


def write_synth_plugin(site, method_body=None, broken=False):
    """A separate tiny package, found through importlib.metadata on PYTHONPATH, that
    provides the synthetic dataset and, optionally, a method."""
    pkg = site / "ltr_plugin_demo"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text("from tests.synthetic import SYNTH_LT\n")
    eps = "[harness.datasets]\nsynth-lt = ltr_plugin_demo.data:SYNTH_LT\n"
    if method_body is not None:
        (pkg / "method.py").write_text(textwrap.dedent(method_body))
        eps += "\n[harness.methods]\nplug = ltr_plugin_demo.method:METHOD\n"
    if broken:
        (pkg / "broken.py").write_text("raise ImportError('needs a library that is not installed')\n")
        eps += ("" if method_body is not None else "\n[harness.methods]\n") + "broken = ltr_plugin_demo.broken:METHOD\n"
    dist = site / "ltr_plugin_demo-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ltr-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(eps)


def plugin_env(tmp_path, base_env=None, **plugin) -> tuple[dict, str]:
    """The synthetic plugin package on PYTHONPATH and the synthetic benchmarks.yaml:
    (environment for a `harness` subprocess, path of that benchmarks.yaml)."""
    site = tmp_path / "site"
    write_synth_plugin(site, **plugin)
    bench = tmp_path / "b.yaml"
    bench.write_text(BENCHMARKS_YAML)
    env = {**(base_env or os.environ), "PYTHONPATH": os.pathsep.join([str(site), REPO]),
           "HARNESS_BENCHMARKS": str(bench)}
    return env, str(bench)


PLUGIN_METHOD = """
    import torch.nn.functional as F
    from harness.method import Method

    class LabelSmoothing(Method):
        name = "plug"
        title = "Label smoothing (plugin)"
        paper = "test plugin"

        def stage1_loss(self, ctx):
            return "ls0.1", lambda logits, feats, y, epoch: F.cross_entropy(logits, y, label_smoothing=0.1)

    METHOD = LabelSmoothing()
"""


def test_third_party_plugin_is_listed_and_runs(tmp_path, env):
    env, _ = plugin_env(tmp_path, env, method_body=PLUGIN_METHOD, broken=True)
    listed = harness("list", "methods", env=env)
    assert listed.returncode == 0 and "plug" in listed.stdout and "Label smoothing (plugin)" not in listed.stderr
    assert "broken" not in listed.stdout or "failed to load" in listed.stdout
    datasets = harness("list", "datasets", env=env)
    assert "synth-lt" in datasets.stdout
    out = harness("run", "--method", "plug", "--dataset", "synth-lt", "--rho", "100", "--epochs", "1",
                  "--device", "cpu", "--no-progress", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "plug" in out.stdout and run_count(tmp_path) == 1
    # a plugin without a label is named by its title, recorded with its run: the report imports no plugin
    plug = next(line for line in listed.stdout.splitlines() if line.startswith("| plug "))
    assert [cell.strip() for cell in plug.split("|")[1:-1]] == ["plug", "Label smoothing (plugin)",
                                                                 "Label smoothing (plugin)", "test plugin"]
    with sqlite3.connect(tmp_path / "results.db") as con:
        extra = json.loads(con.execute("select extra from runs").fetchone()[0])
    assert (extra["method_title"], extra["method_label"]) == ("Label smoothing (plugin)",) * 2
    report = harness("report", "--format", "csv", env=env, cwd=tmp_path)
    [row] = csv.DictReader(io.StringIO(report.stdout))
    assert (row["method"], row["label"]) == ("plug", "Label smoothing (plugin)")
    broken = harness("run", "--method", "broken", "--dataset", "synth-lt", "--rho", "100", env=env, cwd=tmp_path)
    assert broken.returncode == 2
    assert "method plugin 'broken' (ltr_plugin_demo.broken:METHOD) failed to load: ImportError: needs a library" \
        in broken.stderr
    assert run_count(tmp_path) == 1


def test_run_list_show_roundtrip(tmp_path, env):
    env, _ = plugin_env(tmp_path, env)
    out = harness("run", "--method", "ce", "--dataset", "synth-lt", "--rho", "100", "--preset", "quick",
                  "--device", "cpu", "--no-progress", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.splitlines()[2].split("|")[1].strip()
    runs = harness("list", "runs", env=env)
    assert run_id in runs.stdout and "completed" in runs.stdout
    shown = harness("show", run_id[:6], env=env)
    assert shown.returncode == 0 and "T" not in shown.stderr
    assert "| test    | few     |" in shown.stdout and "c5" in shown.stdout
    missing = harness("show", "doesnotexist", env=env)
    assert missing.returncode == 2 and "no run 'doesnotexist'" in missing.stderr
    # --json, for scripts: everything the run holds, per-class rows and curves included
    as_json = json.loads(harness("show", run_id, "--json", env=env).stdout)
    stored = Store(env["HARNESS_DB"]).get_run(run_id)
    assert as_json["id"] == run_id and as_json["config"] == stored.config
    assert [(c["name"], c["train_count"], c["test_accuracy"]) for c in as_json["classes"]] == \
        [(c.class_name, c.train_count, c.accuracy) for c in sorted(stored.class_metrics, key=lambda c: c.class_index)]
    losses = [c["value"] for c in as_json["curves"] if c["kind"] == "train_loss" and c["split"] == "stage1"]
    assert len(losses) == stored.config["recipe"]["stage1"]["epochs"] and all(v > 0 for v in losses)


def test_set_trains_with_the_value_and_the_board_names_the_change(tmp_path, env):
    env, _ = plugin_env(tmp_path, env)
    common = ["run", "--method", "ce", "--dataset", "synth-lt", "--rho", "100", "--preset", "quick", "--device", "cpu",
              "--no-progress"]
    for bad, message in [("stage1.weight_decay", "--set takes KEY=VALUE"),
                         ("stage1.weight_decay=big", "the recipe holds 0.0005 there"),
                         ("stage1.wd=1e-3", "synth-lt / ce; keys: augmentation, stage1.batch_size, stage1.epochs, "
                                            "stage1.lr, stage1.momentum, stage1.schedule.kind")]:
        out = harness(*common, "--set", bad, env=env, cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    ablation = [*common, "--set", "stage1.weight_decay=1e-3", "stage1.lr=0.02"]
    dry = harness(*ablation, "--dry-run", env=env, cwd=tmp_path)   # what it would train, nothing written
    assert dry.returncode == 0, dry.stderr
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                              for line in dry.stdout.splitlines() if line.startswith("| stage1."))}
    assert rows["stage1.lr"] == ["0.02", "0.05", "--set"], dry.stdout
    assert rows["stage1.epochs"] == ["2", "3", "preset quick"] and rows["stage1.momentum"] == ["0.9", "", ""]
    assert "1 run would train; no results store at" in dry.stdout and not (tmp_path / "results.db").exists()
    typo = harness(*ablation, "--dry-run", "--data-root", str(tmp_path / "no-such-data"), env=env, cwd=tmp_path)
    assert typo.returncode == 2 and "data root" in typo.stderr and "is not a directory" in typo.stderr
    out = harness(*ablation, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    [run] = Store(env["HARNESS_DB"]).list_runs()
    dry = harness(*ablation, "--dry-run", env=env, cwd=tmp_path)
    assert f"| 0      | {run.config_hash} | {run.id}" in dry.stdout and "1 of their seeds" in dry.stdout, dry.stdout
    assert (run.config["recipe"]["stage1"]["weight_decay"], run.config["recipe"]["stage1"]["lr"]) == (0.001, 0.02)
    assert run.extra["recipe_changes"] == "stage1.lr 0.02 (was 0.05), stage1.weight_decay 0.001 (was 0.0005)"
    plain = harness(*common, env=env, cwd=tmp_path)   # the file's recipe: another config, another row
    assert plain.returncode == 0 and len(Store(env["HARNESS_DB"]).list_runs()) == 2
    board = harness("report", "--format", "csv", env=env, cwd=tmp_path)
    setups = {row["recipe"] for row in csv.DictReader(io.StringIO(board.stdout))}
    assert setups == {"", "stage1.lr 0.02 (was 0.05), stage1.weight_decay 0.001 (was 0.0005)"}, board.stdout


def test_list_recipes_of_one_method_shows_its_keys(tmp_path, env):
    out = harness("list", "recipes", "--dataset", "cifar100-lt", "--method", "wb", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table, keys = out.stdout.split("\n\n")
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == ["wb"]
    assert "| stage1.weight_decay     | 0.005 " in keys and "| maxnorm_thresh          | 0.1 " in keys
    missing = harness("list", "recipes", "--dataset", "cifar100-lt", "--method", "nope", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "cifar100-lt has no recipe for 'nope'" in missing.stderr
    assert "its recipes: ce, crt, lws" in missing.stderr


def test_db_merge_command(tmp_path, env):
    from tests.test_store import finished_store

    gpu = tmp_path / "gpu.db"
    finished_store(f"sqlite:///{gpu}").close()
    missing = harness("db", "merge", f"sqlite:///{tmp_path / 'nope.db'}", env=env)
    assert missing.returncode == 2   # the store to fix is SOURCE, not --db
    assert missing.stderr == f"error: no results store at {tmp_path / 'nope.db'}; check SOURCE\n"
    assert not (tmp_path / "results.db").exists()
    a_path = harness("db", "merge", str(gpu), env=env)
    assert a_path.returncode == 2 and f"sqlite:///{gpu}" in a_path.stderr and len(a_path.stderr.splitlines()) == 1
    out = harness("db", "merge", f"sqlite:///{gpu}", env=env)
    assert out.returncode == 0 and "2 runs copied" in out.stdout and "1 running left behind" in out.stdout, out.stderr
    listed = harness("list", "runs", env=env)
    assert "done" in listed.stdout and "82.46" in listed.stdout and "live" not in listed.stdout
    again = harness("db", "merge", f"sqlite:///{gpu}", env=env)
    assert "0 runs copied" in again.stdout and "2 already here" in again.stdout


def test_db_delete_asks_first_and_deletes_what_list_runs_names(tmp_path, env):
    from tests.test_store import finished_store

    finished_store(env["HARNESS_DB"]).close()   # done (completed), broke (failed), live (running)
    declined = harness("db", "delete", "done", "broke", env=env, input="n\n")
    assert declined.returncode != 0 and "| done " in declined.stdout and "Delete these 2 runs" in declined.stdout
    assert harness("list", "runs", "--names", env=env).stdout.split() == ["done", "broke", "live"]
    failed = harness("list", "runs", "--names", "--status", "failed", env=env).stdout.split()
    out = harness("db", "delete", "--yes", *failed, env=env)
    assert out.returncode == 0 and "1 runs deleted" in out.stdout, out.stderr
    refused = harness("db", "delete", "--yes", "done", "live", env=env)
    assert refused.returncode == 2 and "live is running" in refused.stderr
    assert harness("list", "runs", "--names", env=env).stdout.split() == ["done", "live"]
    with Store(env["HARNESS_DB"]).session() as s, s.begin():   # as `harness run --save-model` leaves it
        run = s.get(Run, "done")
        run.extra = {**run.extra, "model_file": "/models/done.pt"}
    out = harness("db", "delete", "--yes", "done", env=env)
    assert out.stdout.splitlines()[-1] == "their saved models stay where --save-model put them: /models/done.pt"


def test_list_runs_filters_and_names(tmp_path, env):
    from tests.test_store import finished_store

    finished_store(env["HARNESS_DB"]).close()   # done (completed), broke (failed), live (running); all ce
    assert harness("list", "runs", "--names", env=env).stdout.split() == ["done", "broke", "live"]
    assert harness("list", "runs", "--names", "--status", "failed", env=env).stdout.split() == ["broke"]
    assert harness("list", "runs", "--names", "--method", "wb", env=env).stdout.split() == []
    table = harness("list", "runs", "--dataset", "synth-lt", "--status", "completed", env=env).stdout
    assert "82.46" in table and "broke" not in table
    refused = harness("list", "methods", "--status", "failed", env=env)
    assert refused.returncode == 2 and "--status chooses among runs: `harness list runs --status" in refused.stderr
    refused = harness("list", "datasets", "--method", "ce", env=env)   # recipes take it, datasets do not
    assert refused.returncode == 2 and "--method chooses among runs and recipes" in refused.stderr


def test_report_renders_the_boards_asked_for_and_names_the_store_s_when_none_match(tmp_path, env):
    from tests.test_store import finished_store

    finished_store(env["HARNESS_DB"]).close()   # one board: synth-lt, ρ=100, quick
    out = harness("report", "--format", "csv", "--dataset", "synth-lt", "--rho", "100", "--preset", "quick", env=env)
    assert out.returncode == 0 and "synth-lt,,100.0,quick,ce" in out.stdout, out.stderr
    site = harness("report", "--out", str(tmp_path / "site"), "--preset", "quick", "paper", env=env)
    assert site.returncode == 0 and site.stdout.startswith("1 board, ") and (tmp_path / "site" / "index.html").exists()
    for args in (["--rho", "10"], ["--dataset", "synth-lt,cifar10-lt", "--preset", "paper"]):
        none = harness("report", "--format", "table", *args, env=env)
        assert none.returncode == 2 and none.stderr.count("\n") == 1 and none.stdout == ""
        assert f"no board matches {' '.join(args).replace(',', ' --dataset ')}; pass one of the store's: " \
               "synth-lt ρ=100 quick" in none.stderr
    natural = harness("report", "--format", "table", "--rho", "natural", env=env)
    assert natural.returncode == 2 and "e.g. --rho 256" in natural.stderr
    # an output option the format does not read is refused, not ignored while the output goes elsewhere
    to_folder = harness("report", "--format", "csv", "--out", str(tmp_path / "csv"), env=env)
    assert to_folder.returncode == 2 and to_folder.stdout == "" and not (tmp_path / "csv").exists()
    assert "--format csv prints one file: pass --file FILE, not --out" in to_folder.stderr
    to_file = harness("report", "--file", str(tmp_path / "board.html"), env=env, cwd=tmp_path)
    assert to_file.returncode == 2 and "--format site writes a folder: pass --out DIR, not --file" in to_file.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path / "board.html").exists()
