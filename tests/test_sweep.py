"""`harness sweep`: grid expansion, skipping what is done, one stage 1 per chain, workers."""
from pathlib import Path

from harness.runner import RunRequest
from harness.store import Store
from harness.sweep import chains, execute_sweep, plan
from tests.test_cli import harness, plugin_env


def base(url):
    return RunRequest(method="", dataset="", rho=1.0, preset="quick", device="cpu", db=url, progress=False)


def test_sweep_runs_the_grid_once_and_skips_it_the_second_time(synth):
    planned = plan(base(synth), ["ce", "crt", "fbl"], ["synth-lt"], None, [0, 1])
    assert [(p.request.method, p.request.rho, p.request.seeds) for p in planned] == [
        ("ce", 100.0, [0, 1]), ("crt", 100.0, [0, 1]), ("fbl", 100.0, [0, 1])]
    # one stage-1 recipe here (the synthetic benchmark gives fbl ce's): one chain, in grid order
    assert [[p.request.method for p in c] for c in chains(planned)] == [["ce", "crt", "fbl"]]
    lines = []
    assert execute_sweep(planned, jobs=1, report=lines.append) == (6, 0)
    runs = Store(synth).list_runs()
    assert len(runs) == 6 and all(r.status == "completed" for r in runs)
    crt = [r for r in runs if r.method == "crt"]
    assert all(r.stage1_cached for r in crt)  # reused CE's stage 1
    assert lines[-1].startswith("[6/6]")
    again = plan(base(synth), ["ce", "crt", "fbl"], ["synth-lt"], None, [0, 1, 2])
    assert [(p.request.seeds, p.skipped_seeds) for p in again] == [([2], [0, 1])] * 3


def test_sweep_cli_dry_run_then_parallel_workers(tmp_path):
    env, bench = plugin_env(tmp_path)
    env["HARNESS_CACHE"] = str(tmp_path / "c")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["sweep", "--benchmarks", bench, "--datasets", "synth-lt", "--methods", "ce", "--methods", "lws",
            "--methods", "wb", "--seeds", "0", "--preset", "quick", "--device", "cpu", "--db", url]
    dry = harness(*args, "--dry-run", env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "3 runs to do, 0 already in the store; nothing trained, nothing written" in dry.stdout
    assert not (tmp_path / "r.db").exists()   # a dry run makes no store
    out = harness(*args, "--jobs", "2", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sweep done: 3 runs completed, 0 jobs failed" in out.stdout
    runs = {r.method: r for r in Store(url).list_runs()}
    assert set(runs) == {"ce", "lws", "wb"} and runs["lws"].stage1_cached and not runs["wb"].stage1_cached
    again = harness(*args, env=env, cwd=tmp_path)
    assert "0 runs to do, 3 already in the store" in again.stdout
    dry = harness(*args, "--seeds", "1", "--dry-run", env=env, cwd=tmp_path)   # reads the store that is there
    assert "3 runs to do, 3 already in the store; nothing trained" in dry.stdout


def test_sweep_bad_input_is_one_line_and_runs_nothing(tmp_path):
    env, bench = plugin_env(tmp_path)
    env["HARNESS_DB"] = f"sqlite:///{tmp_path / 'r.db'}"
    for args, message in ((["--methods", "nope"], "unknown method 'nope'"),
                          (["--datasets", "imagenet-xx"], "dataset 'imagenet-xx' has no entry"),
                          (["--jobs", "0"], "--jobs must be >= 1"),
                          (["--seeds", "0", "1", "extra.yaml"], "'extra.yaml' is not a valid integer"),
                          (["--rho", "100", "nan"], "--rho takes a finite number >= 1"),
                          (["--benchmarks", "/no/such.yaml"], "/no/such.yaml does not exist"),
                          (["--val-per-class", "-1"], "--val-per-class must be >= 0, got -1"),
                          (["--backbone", "resnet9000"], "unknown backbone 'resnet9000'")):
        out = harness("sweep", "--benchmarks", bench, *args, env=env, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, \
            out.stderr
        assert not (tmp_path / "r.db").exists(), args   # refused before the store is opened
    # a ratio of a dataset whose tail is its split lists: refused by the plan, before any data is
    # read (a dry run listed the runs, and each failed on its data)
    out = harness("sweep", "--benchmarks", str(Path(__file__).parents[1] / "benchmarks.yaml"), "--datasets",
                  "imagenet-lt", "--rho", "100", "--dry-run", env=env, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == \
        "error: ImageNet-LT has a fixed long tail (its split lists); pass --rho natural", out.stderr
    assert not (tmp_path / "r.db").exists()


def test_sweep_on_a_local_ray_instance(tmp_path):
    env, bench = plugin_env(tmp_path)
    env["HARNESS_CACHE"] = str(tmp_path / "c")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    out = harness("sweep", "--benchmarks", bench, "--datasets", "synth-lt", "--methods", "ce", "crt",
                  "fbl", "--seeds", "0", "1", "--preset", "quick", "--device", "cpu", "--db", url,
                  "--executor", "ray", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep done: 6 runs completed, 0 jobs failed" in out.stdout
    runs = Store(url).list_runs()
    assert len(runs) == 6 and all(r.status == "completed" for r in runs)
    assert all(r.stage1_cached for r in runs if r.method == "crt")


def test_every_seed_and_ratio_given_is_planned(synth):
    """`--seeds 0 1 2` and `--rho 100 10` take every value (the second seed used to be taken
    for a positional argument and dropped)."""
    from click.testing import CliRunner

    from harness.cli import cli

    out = CliRunner().invoke(cli, ["sweep", "--datasets", "synth-lt", "--methods", "ce", "crt",
                                   "--seeds", "0", "1", "2",
                                   "--rho", "100", "10", "--preset", "quick", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "12 runs to do" in out.output
    rows = [line for line in out.output.splitlines() if line.startswith("| ce") or line.startswith("| crt")]
    assert len(rows) == 4 and all("| 0 1 2 " in row for row in rows)
    commas = CliRunner().invoke(cli, ["sweep", "--datasets", "synth-lt", "--methods", "ce,crt", "crt",
                                      "--seeds", "0", "1", "2", "--rho", "100,10", "--preset", "quick", "--dry-run"])
    assert commas.exit_code == 0 and commas.output == out.output   # the same plan, crt once


def test_sweep_takes_run_s_overrides_and_skips_only_runs_made_with_them(synth):
    """--val-per-class, --generator and --backbone reach every planned run, as in `harness run`;
    a run made with an override is done for a sweep with the same override, not for the default."""
    from click.testing import CliRunner

    from harness.cli import cli

    args = ["--dataset", "synth-lt", "--rho", "100", "--preset", "quick", "--device", "cpu", "--no-progress"]
    ran = CliRunner().invoke(cli, ["run", "--method", "ce", "--val-per-class", "0", "--generator", "first", *args])
    assert ran.exit_code == 0, ran.output
    [run] = Store(synth).list_runs()
    assert (run.config["val_per_class"], run.generator) == (0, "first")

    def sweep(*overrides):
        out = CliRunner().invoke(cli, ["sweep", "--methods", "ce", "--dry-run", *args[:-1], *overrides])
        assert out.exit_code == 0, out.output
        return out.output

    assert "0 runs to do, 1 already in the store" in sweep("--val-per-class", "0", "--generator", "first")
    assert "1 runs to do, 0 already in the store" in sweep("--generator", "first")   # the benchmark's split
    assert "1 runs to do, 0 already in the store" in sweep("--val-per-class", "0")    # the benchmark's generator
