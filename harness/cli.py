"""The `harness` command line (click)."""
from __future__ import annotations

import json
import math
import sys

import click
from click.core import ParameterSource
from tabulate import tabulate

from harness import HarnessError
from harness.formatting import fmt


def parse_rho(text) -> float | str:
    if str(text) == "natural":
        return "natural"
    try:
        rho = float(text)
    except ValueError:
        rho = float("nan")
    if not math.isfinite(rho) or rho < 1:
        raise HarnessError(f"--rho takes a finite number >= 1 or 'natural', got '{text}'; pass e.g. --rho 100")
    return rho


def parse_settings(values) -> dict:
    """--set KEY=VALUE ..., each key once."""
    from harness.config import parse_setting

    settings = {}
    for key, value in map(parse_setting, values):
        if key in settings and settings[key] != value:
            raise HarnessError(f"--set {key} is given twice ({settings[key]!r}, {value!r}); pass it once")
        settings[key] = value
    return settings


def listed(values) -> list[str]:
    """An option's values, each of which may be a comma-separated list (--methods ce,crt), once each."""
    return list(dict.fromkeys(v for value in values for v in value.split(",") if v))


class GreedyCommand(click.Command):
    """A command whose `multiple=True` options take every value that follows them, up to the
    next option: `--seeds 0 1 2` is `--seeds 0 --seeds 1 --seeds 2`. (click alone would take
    one value and leave the rest as stray arguments.) Options are the tokens starting with
    `--` and `-h`; anything else, a negative number too, is a value."""

    def parse_args(self, ctx, args):
        multi = {name for p in self.params if isinstance(p, click.Option) and p.multiple for name in p.opts}
        expanded, current, fresh = [], None, False
        for token in args:
            if token.startswith("--") or token == "-h":
                current, fresh = (token if token in multi else None), True
            elif current is not None and not fresh:
                expanded.append(current)  # one more value of the same option
            else:
                fresh = False
            expanded.append(token)
        return super().parse_args(ctx, expanded)


def training_options(command):
    """The options `run`, `sweep` and `tune` share: where to train, on what data, into which store."""
    for option in reversed([
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--data-root", envvar="HARNESS_DATA_ROOT",
                     help="Dataset directory (torchvision layout, train/ + test/ folders, or split lists)."),
        click.option("--download", is_flag=True, help="Let torchvision download a missing dataset."),
        click.option("--db", envvar="HARNESS_DB", help="SQLAlchemy URL of the results store [sqlite:///results.db]."),
        click.option("--cache-dir", envvar="HARNESS_CACHE", help="Stage-1 checkpoint cache [.harness_cache]."),
        click.option("--save-model", metavar="DIR",
                     help="Keep each run's final model as DIR/<run id>.pt (tuning trials excepted)."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]):
        command = option(command)
    return command


def override_options(command):
    """The benchmark defaults `run`, `sweep` and `tune` can override; each is part of a run's
    config hash, so runs made with an override are never mistaken for the default's."""
    for option in reversed([
        click.option("--generator", type=click.Choice(["ldam", "first"]), help="Which images the LT subset keeps."),
        click.option("--backbone", help="Override the benchmark's backbone."),
        click.option("--val-per-class", type=int, help="Held-out validation images per class [the benchmark's]."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]),
                     help="Forward passes in fp32 (as every official code) or bf16 autocast "
                          "[bf16 on CUDA, fp32 on the CPU]."),
        click.option("--set", "settings", metavar="KEY=VALUE", multiple=True,
                     help="Change one recipe value: --set stage1.weight_decay=5e-4 beta=0.999 (a dotted key of the "
                          "recipe: `harness list recipes --dataset D --method M`). The board names the change "
                          "and gives no Δ."),
    ]):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ltr-harness: train, evaluate and rank long-tailed recognition methods."""


@cli.command(cls=GreedyCommand)
@click.option("--method", required=True, help="Method name (`harness list methods`).")
@click.option("--dataset", required=True, help="Dataset name (`harness list datasets`).")
@click.option("--rho", required=True, help="Imbalance ratio n_max / n_min (>= 1), or 'natural': the dataset's own counts.")
@click.option("--seed", "--seeds", "seeds", type=int, multiple=True, help="Seed(s) [0]: --seed 0 1 2.")
@click.option("--preset", default="paper", show_default=True, help="Recipe budget: paper or quick.")
@click.option("--epochs", type=int, help="Override stage-1 epochs (schedule scales; recorded as a custom preset).")
@training_options
@override_options
@click.option("--benchmarks", envvar="HARNESS_BENCHMARKS", help="benchmarks.yaml to use.")
@click.option("--dry-run", is_flag=True,
              help="Show the recipe the runs would train with (the ratio's values, the preset's budget and --set "
                   "applied), their config hash and the store's completed runs of it; train nothing.")
def run(method, dataset, rho, seeds, preset, epochs, device, data_root, download, db, generator, backbone,
        val_per_class, precision, settings, cache_dir, save_model, benchmarks, no_progress, dry_run) -> None:
    """Train and evaluate METHOD on DATASET; store the result and print it."""
    from harness.runner import RunRequest, execute

    seed_list = list(dict.fromkeys(seeds)) or [0]
    req = RunRequest(method=method, dataset=dataset, rho=parse_rho(rho), seeds=seed_list, preset=preset, epochs=epochs,
                     device=device, data_root=data_root, download=download, db=db, generator=generator,
                     backbone=backbone, val_per_class=val_per_class, precision=precision, cache_dir=cache_dir,
                     save_model=save_model, benchmarks=benchmarks, progress=not no_progress,
                     settings=parse_settings(settings))
    if dry_run:
        show_preview(req)
        return
    from harness.distributed import is_main

    results = execute(req)
    if not is_main():  # under torchrun rank 0 reports
        return
    rows = []
    for r in results:
        t = r.metrics["test"]
        rows.append([r.run_id, r.config.method, r.config.seed, fmt(t["all"]), fmt(100 - t["all"]),
                     fmt(t["many"]), fmt(t["medium"]), fmt(t["few"]), "yes" if r.stage1_cached else "no"])
    click.echo(tabulate(rows, headers=["run", "method", "seed", "top-1", "error", "many", "medium", "few",
                                       "stage 1 cached"], tablefmt="github", disable_numparse=True))


def show_preview(req) -> None:
    """`harness run --dry-run`: what the runs would be, from the checks `run` makes before it trains."""
    from harness.config import load_benchmarks, trained_values
    from harness.engine import precision_on, resolve_device
    from harness.runner import preview

    seen = preview(req)
    cfg = seen.configs[0]
    click.echo(f"{cfg.method} on {cfg.dataset}, rho {cfg.rho:g}, preset {cfg.preset}: backbone {cfg.backbone}, "
               f"generator {cfg.generator}, {cfg.val_per_class} validation images per class, "
               f"{precision_on(resolve_device(req.device), cfg.precision)} forward passes")
    if cfg.recipe_changes:
        click.echo(f"recipe changes (named on its board row, no Δ): {cfg.recipe_changes}")
    click.echo("\n" + tabulate(trained_values(load_benchmarks(req.benchmarks), cfg, req.settings),
                               headers=["key", "value", "written", "changed by"], tablefmt="github",
                               disable_numparse=True))
    if cfg.recipe.get("deviations"):
        click.echo("\nnot followed of the official code:\n" + "\n".join(f"- {d}" for d in cfg.recipe["deviations"]))
    done = lambda seed: ", ".join(seen.completed.get(seed, [])) or "—"  # noqa: E731
    click.echo("\n" + tabulate([[c.seed, c.config_hash(), done(c.seed)] for c in seen.configs],
                               headers=["seed", "config hash", "completed in the store"], tablefmt="github",
                               disable_numparse=True))
    again = sum(1 for c in seen.configs if seen.completed.get(c.seed))
    runs = len(seen.configs)
    click.echo(f"{runs} run{'s' * (runs > 1)} would train" + (f"; {again} of their seeds are in the store already (a "
               "seed run again adds a row, which a board counts once)" if again else "")
               + (f"; {seen.store_missing.split(';')[0]}: the run makes it" if seen.store_missing else "")
               + "; nothing trained, nothing written")


@cli.command(cls=GreedyCommand)
@click.option("--benchmarks", envvar="HARNESS_BENCHMARKS", help="benchmarks.yaml whose grid to run [the installed one].")
@click.option("--methods", "--method", "methods", multiple=True,
              help="Methods [every method of each benchmark]: --methods ce crt (or ce,crt).")
@click.option("--datasets", "--dataset", "datasets", multiple=True, help="Datasets [every benchmark]: --datasets cifar10-lt.")
@click.option("--rho", "rhos", multiple=True, help="Ratios or 'natural' [each benchmark's]: --rho 100 10.")
@click.option("--seeds", "--seed", "seeds", type=int, multiple=True, help="Seeds [0]: --seeds 0 1 2.")
@click.option("--preset", default="paper", show_default=True, help="Recipe budget: paper or quick.")
@click.option("--epochs", type=int, help="Override stage-1 epochs (recorded as a custom preset).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Local worker processes (chains in parallel).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local processes, or one Ray task per chain (one GPU each where GPUs exist).")
@click.option("--address", help="Ray cluster to join (e.g. ray://host:10001); default: a local Ray instance.")
@click.option("--dry-run", is_flag=True, help="List what would run, run nothing.")
@training_options
@override_options
def sweep(benchmarks, methods, datasets, rhos, seeds, preset, epochs, jobs, executor, address, dry_run, device,
          data_root, download, db, cache_dir, save_model, no_progress, generator, backbone, val_per_class,
          precision, settings) -> None:
    """Run the grid of benchmarks.yaml (methods x datasets x rho x seeds), skipping runs already completed."""
    from harness.runner import RunRequest
    from harness.sweep import execute_sweep, plan

    if jobs < 1:
        raise HarnessError("--jobs must be >= 1")
    seed_list = list(dict.fromkeys(seeds)) or [0]
    base = RunRequest(method="", dataset="", rho=1.0, preset=preset, epochs=epochs, device=device,
                      data_root=data_root, download=download, db=db, cache_dir=cache_dir, save_model=save_model,
                      benchmarks=benchmarks, generator=generator, backbone=backbone, val_per_class=val_per_class,
                      precision=precision, settings=parse_settings(settings),
                      progress=not no_progress and jobs == 1 and executor == "local")
    planned = plan(base, listed(methods), listed(datasets), list(dict.fromkeys(map(parse_rho, listed(rhos)))),
                   seed_list, create=not dry_run)
    rows = [[p.request.method, p.request.dataset, str(p.request.rho).removesuffix(".0"), " ".join(map(str, p.request.seeds)) or "—",
             " ".join(map(str, p.skipped_seeds)) or "—"] for p in planned]
    click.echo(tabulate(rows, headers=["method", "dataset", "rho", "to run", "done already"], tablefmt="github",
                        disable_numparse=True))
    todo = sum(len(p.request.seeds) for p in planned)
    click.echo(f"{todo} runs to do, {sum(len(p.skipped_seeds) for p in planned)} already in the store"
               + ("; nothing trained, nothing written" if dry_run else ""))
    if dry_run or not todo:
        return
    completed, failed = execute_sweep(planned, jobs, report=click.echo, executor=executor, address=address)
    click.echo(f"sweep done: {completed} runs completed, {failed} jobs failed")
    if failed:
        sys.exit(1)


@cli.command(cls=GreedyCommand)
@click.option("--method", required=True, help="Method name (`harness list methods`).")
@click.option("--dataset", required=True, help="Dataset name (`harness list datasets`).")
@click.option("--rho", required=True, help="Imbalance ratio (>= 1) or 'natural'.")
@click.option("--param", "params", multiple=True,
              help="KEY=SPACE over the method's declared space: stage1.weight_decay=loguniform(1e-4,5e-2); "
                   "uniform(lo,hi), int(lo,hi), categorical(a,b,...).")
@click.option("--trials", type=int, default=20, show_default=True,
              help="Finished trials (complete or pruned) the study should hold.")
@click.option("--preset", default="paper", show_default=True, help="Budget of the trials and of the tuned runs.")
@click.option("--seed", "--seeds", "seeds", type=int, multiple=True,
              help="Seeds of the tuned runs [0]; the first also seeds the trials and the sampler.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Trial processes working on the study here.")
@click.option("--study", help="Study name [method-dataset-rho-preset-seed-space].")
@click.option("--no-final", is_flag=True, help="Search only (another process trains the chosen values).")
@click.option("--prune", is_flag=True,
              help="Stop a trial whose val top-1 after an epoch is below the median of the earlier trials there "
                   "(from the 6th trial, after half its epochs).")
@click.option("--epochs", type=int, help="Override stage-1 epochs (trials and tuned runs).")
@training_options
@override_options
@click.option("--benchmarks", envvar="HARNESS_BENCHMARKS", help="benchmarks.yaml to use.")
def tune(method, dataset, rho, params, trials, preset, seeds, jobs, study, no_final, prune, epochs, device, data_root,
         download, db, cache_dir, save_model, no_progress, generator, backbone, val_per_class, precision, settings,
         benchmarks) -> None:
    """Tune METHOD's hyper-parameters on the validation split (Optuna TPE); train the chosen
    values with the seeds as preset `tuned`. The study lives in the results store's database."""
    from harness.runner import RunRequest
    from harness.tune import TuneRequest, tune as run_tune

    run = RunRequest(method=method, dataset=dataset, rho=parse_rho(rho), seeds=list(dict.fromkeys(seeds)) or [0],
                     preset=preset, epochs=epochs, device=device, data_root=data_root, download=download, db=db,
                     cache_dir=cache_dir, save_model=save_model, generator=generator, backbone=backbone,
                     val_per_class=val_per_class, precision=precision, benchmarks=benchmarks,
                     progress=not no_progress, settings=parse_settings(settings))
    result = run_tune(TuneRequest(run=run, params=list(params), trials=trials, study=study, jobs=jobs,
                                  final=not no_final, prune=prune), report=click.echo)
    for run_id, metrics in zip(result.get("runs", []), result.get("results", [])):
        click.echo(f"{run_id}: test top-1 {fmt(metrics['all'])}, many {fmt(metrics['many'])}, "
                   f"medium {fmt(metrics['medium'])}, few {fmt(metrics['few'])}")


@cli.group()
def db() -> None:
    """Results-store maintenance."""


@db.command()
@click.option("--db", "url", envvar="HARNESS_DB", help="SQLAlchemy URL of the results store [sqlite:///results.db].")
def upgrade(url) -> None:
    """Upgrade the store's schema to this harness's (Alembic); keeps every row."""
    from sqlalchemy.exc import SQLAlchemyError

    from harness.migrate import upgrade as upgrade_store
    from harness.store import db_url

    url = db_url(url)
    try:
        before, after = upgrade_store(url)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise HarnessError(f"cannot upgrade results store {url}: {reason}") from exc
    click.echo(f"{url}: schema {before or 'empty'} -> {after}" if before != after else f"{url}: already at {after}")


@db.command()
@click.argument("source")
@click.option("--db", "url", envvar="HARNESS_DB", help="SQLAlchemy URL of the store to merge into "
              "[sqlite:///results.db]; made if it does not exist.")
def merge(source, url) -> None:
    """Copy into --db every finished run of the store SOURCE (a SQLAlchemy URL) that it lacks,
    with its metrics, per-class results and curves, in one transaction; running rows stay
    behind. For results trained elsewhere (another machine, a GPU box's results.db) joining a
    shared store. Both stores must be at this harness's schema (`harness db upgrade`)."""
    from harness.store import Store

    if "://" not in source:
        raise HarnessError(f"SOURCE is a SQLAlchemy URL: for the file {source}, sqlite:///{source}")
    with Store(source, create=False, option="SOURCE") as src, Store(url) as dest:
        counts = dest.merge_from(src)
    click.echo(f"{dest.url}: {counts['copied']} runs copied from {src.url}; "
               f"{counts['already here']} already here, {counts['running left behind']} running left behind")


@db.command(name="delete")
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--db", "url", envvar="HARNESS_DB", help="SQLAlchemy URL of the results store [sqlite:///results.db].")
@click.option("--running", is_flag=True, help="Also delete running rows (a live process would fail at its end).")
@click.option("--yes", is_flag=True, help="Delete without asking.")
def delete_(run_ids, url, running, yes) -> None:
    """Delete runs (ids, or unique prefixes) with their metrics, per-class results and curves,
    in one transaction: all of them or none. For a run made by mistake, or superseded ones:
    `harness list runs --names --status failed | xargs harness db delete --yes`."""
    from harness.store import Store

    with Store(url, create=False) as store:
        if not yes:   # what would go, shown first; nothing is deleted before the answer
            runs = store.find_runs(list(run_ids))
            click.echo(tabulate([[r.id, r.method, r.dataset, f"{r.rho:g}", r.seed, r.preset, r.status] for r in runs],
                                headers=["run", "method", "dataset", "rho", "seed", "preset", "status"],
                                tablefmt="github", disable_numparse=True))
            click.confirm(f"Delete these {len(runs)} runs from {store.url}?", abort=True)
        deleted = store.delete_runs(list(run_ids), running=running)
    click.echo(f"{store.url}: {len(deleted)} runs deleted")
    models = [r.extra["model_file"] for r in deleted if "model_file" in (r.extra or {})]
    if models:   # files the user asked for, outside the store: theirs to remove
        click.echo(f"their saved models stay where --save-model put them: {' '.join(models)}")


@cli.command(name="list")
@click.argument("what", type=click.Choice(["methods", "datasets", "recipes", "runs"]))
@click.option("--db", envvar="HARNESS_DB", help="SQLAlchemy URL of the results store.")
@click.option("--names", is_flag=True, help="Names only (run ids for runs), one per line (for scripts).")
@click.option("--dataset", help="recipes, runs: only this dataset's.")
@click.option("--method", help="recipes, runs: only this method's (recipes: with --dataset, its keys and values as "
                             "written; `harness run ... --dry-run`: as a run trains with them).")
@click.option("--status", type=click.Choice(["running", "completed", "failed"]), help="runs: only these.")
@click.option("--benchmarks", envvar="HARNESS_BENCHMARKS", help="recipes: the benchmarks.yaml to read.")
def list_(what: str, db: str | None, names: bool, dataset: str | None, method: str | None, status: str | None,
          benchmarks: str | None) -> None:
    """List registered methods, datasets, each dataset's recipes (with what they do not
    follow of the official code), or stored runs (in the order they started)."""
    if status and what != "runs":
        raise HarnessError("--status chooses among runs: `harness list runs --status ...`")
    if method and what not in ("runs", "recipes"):
        raise HarnessError("--method chooses among runs and recipes: `harness list runs --method ...`")
    from harness.registry import DATASETS, METHODS

    if what == "recipes":
        from harness.config import benchmark, load_benchmarks, recipe_rows, recipe_values

        doc = load_benchmarks(benchmarks)
        if dataset:
            benchmark(doc, dataset)  # an unknown dataset fails with the known ones
        values = recipe_values(doc, dataset, method) if dataset and method else None
        click.echo(tabulate(recipe_rows(doc, dataset, method), headers=["dataset", "method", "backbone", "stage 1",
                                                                        "stage 2", "augmentation", "per rho",
                                                                        "not followed"],
                            tablefmt="github", disable_numparse=True))
        if values:   # what --set changes, as written (a ratio's values are under "per rho")
            click.echo("\n" + tabulate(values, headers=["key (--set KEY=VALUE)", "value"], tablefmt="github",
                                       disable_numparse=True))
    elif names and what != "runs":
        click.echo("\n".join((METHODS if what == "methods" else DATASETS).names()))
    elif what == "methods":
        from harness.method import describe

        rows = []
        for name in METHODS.names():
            try:
                m = METHODS.get(name)
            except HarnessError as exc:  # one broken plugin must not hide the others
                rows.append([name, "", "(failed to load)", str(exc)])
                continue
            about = describe(m)
            rows.append([name, about["label"], about["title"], about["paper"]])
        click.echo(tabulate(rows, headers=["method", "label", "title", "paper"], tablefmt="github",
                            disable_numparse=True))
    elif what == "datasets":
        rows = []
        for name in DATASETS.names():
            d = DATASETS.get(name)
            rows.append([name, d.title, d.num_classes or "any", d.n_max, f"{d.channels}x{d.size}x{d.size}", d.backbone,
                         d.source])
        click.echo(tabulate(rows, headers=["dataset", "title", "classes", "n_max", "image", "backbone", "source"],
                            tablefmt="github", disable_numparse=True))
    else:
        from harness.store import Store

        rows = []
        with Store(db, create=False) as store:
            runs = store.list_runs(method=method, dataset=dataset, status=status)
        if names:
            click.echo("\n".join(r.id for r in runs))
            return
        for r in runs:
            top1 = next((m.top1 for m in r.metrics if m.split == "test" and m.group == "all"), None) \
                if r.status == "completed" else None
            rows.append([r.id, r.method, r.dataset, f"{r.rho:g}", r.seed, r.preset, status_of(r), fmt(top1),
                         r.started_at.strftime("%Y-%m-%d %H:%M")])
        click.echo(tabulate(rows, headers=["run", "method", "dataset", "rho", "seed", "preset", "status", "top-1",
                                           "started"], tablefmt="github", disable_numparse=True))


def status_of(run) -> str:
    """A run's status as listed: a `running` row whose process on this machine is gone says so
    (read-only here; the next `harness run` on this machine marks it failed)."""
    from harness.provenance import process_gone

    dead = run.status == "running" and process_gone((run.extra or {}).get("process"))
    return "running (process gone)" if dead else run.status


@cli.command()
@click.argument("run_id")
@click.option("--db", envvar="HARNESS_DB", help="SQLAlchemy URL of the results store.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(run_id: str, db: str | None, as_json: bool) -> None:
    """Show one run: provenance, metrics and per-class results."""
    from harness.store import Store

    with Store(db, create=False) as store:
        r = store.get_run(run_id)
    head = {"id": r.id, "method": r.method, "dataset": r.dataset, "rho": r.rho, "backbone": r.backbone,
            "seed": r.seed, "generator": r.generator, "preset": r.preset, "status": r.status,
            "config_hash": r.config_hash, "device": r.device, "git_commit": r.git_commit,
            "wall_seconds": r.wall_seconds, "data_checksum": r.data_checksum, "stage1_cached": bool(r.stage1_cached),
            "started_at": r.started_at.isoformat(), "extra": r.extra, "versions": r.versions, "error": r.error}
    if as_json:
        head["config"] = r.config
        head["metrics"] = [{"split": m.split, "group": m.group, "top1": m.top1, "error": m.error, "ece": m.ece,
                            "n_classes": m.n_classes} for m in r.metrics]
        head["classes"] = [{"index": c.class_index, "name": c.class_name, "train_count": c.train_count,
                            "test_accuracy": c.accuracy, "weight_norm": c.weight_norm}
                           for c in sorted(r.class_metrics, key=lambda c: c.class_index)]
        head["curves"] = [{"kind": c.kind, "x": c.x, "split": c.split, "group": c.group, "value": c.value}
                          for c in sorted(r.curves, key=lambda c: c.id)]
        click.echo(json.dumps(head, indent=2, default=str))
        return
    head["status"] = status_of(r)   # for people; the JSON keeps the stored value
    click.echo(tabulate([[k, json.dumps(v) if isinstance(v, dict) else v] for k, v in head.items()],
                        tablefmt="plain", disable_numparse=True))
    click.echo()
    click.echo(tabulate([[m.split, m.group, fmt(m.top1), fmt(m.error), fmt(m.ece), m.n_classes] for m in r.metrics],
                        headers=["split", "group", "top-1", "error", "ECE", "classes"], tablefmt="github",
                        disable_numparse=True))
    click.echo()
    click.echo(tabulate([[c.class_index, c.class_name, c.train_count, fmt(c.accuracy), fmt(c.weight_norm, 3)]
                         for c in sorted(r.class_metrics, key=lambda c: c.class_index)],
                        headers=["class", "name", "train", "test acc", "||w||"], tablefmt="github", disable_numparse=True))


@cli.command(cls=GreedyCommand)
@click.option("--db", envvar="HARNESS_DB", help="SQLAlchemy URL of the results store.")
@click.option("--datasets", "--dataset", "datasets", multiple=True,
              help="Only these datasets' boards [all]: --dataset cifar10-lt fmnist-lt (or a,b).")
@click.option("--rho", "rhos", multiple=True, help="Only boards of these ratios, as the boards show them [all]: --rho 100 10.")
@click.option("--presets", "--preset", "presets", multiple=True, help="Only these presets' boards [all]: --preset paper.")
@click.option("--format", "fmt_", default="site", show_default=True,
              type=click.Choice(["site", "html", "markdown", "table", "csv", "latex", "pwc-json"]),
              help="site = HTML + Markdown under --out; table/csv/latex/pwc-json print to stdout or --file.")
@click.option("--out", default="reports", show_default=True, help="Folder for HTML and Markdown.")
@click.option("--file", "file_", help="Write csv/latex/pwc-json/table output here instead of stdout.")
@click.option("--benchmarks", envvar="HARNESS_BENCHMARKS", help="benchmarks.yaml with the paper references.")
def report(db, datasets, rhos, presets, fmt_, out, file_, benchmarks) -> None:
    """Render leaderboards from the results store (all of them, or those selected)."""
    from pathlib import Path

    from harness import report as rep
    from harness.store import Store

    ratios = [parse_rho(r) for r in listed(rhos)]
    if "natural" in ratios:
        raise HarnessError("a board is named by the ratio its runs had; pass it as the board shows it, e.g. --rho 256")
    only = rep.Selection(tuple(listed(datasets)), tuple(ratios), tuple(listed(presets)))
    site = fmt_ in ("site", "html", "markdown")
    # an option the format does not read would be ignored, and the output land elsewhere
    if site and file_:
        raise HarnessError(f"--format {fmt_} writes a folder: pass --out DIR, not --file "
                           "(--file is for table, csv, latex, pwc-json)")
    if not site and click.get_current_context().get_parameter_source("out") != ParameterSource.DEFAULT:
        raise HarnessError(f"--format {fmt_} prints one file: pass --file FILE, not --out "
                           "(--out is for site, html, markdown)")
    target = Path(out) if site else Path(file_) if file_ else None
    with Store(db, create=False) as store:   # a missing store is refused before --out is made
        if target is not None:
            check_writable(target, folder=site)
        boards = rep.build_boards(store, benchmarks, plots=fmt_ in ("site", "html"), only=only)
    if site:
        written, removed = rep.render_site(boards, Path(out), html=fmt_ in ("site", "html"),
                                           markdown=fmt_ in ("site", "markdown"))
        gone = f"; removed {len(removed)} pages of boards or methods no longer shown" if removed else ""
        front = "index.html" if fmt_ != "markdown" else "README.md"
        click.echo(f"{len(boards)} board{'s' * (len(boards) != 1)}, {len(written)} files under {out}/{gone} "
                   f"(open {out}/{front})")
        return
    text = {"table": rep.render_terminal, "csv": rep.render_csv, "latex": rep.render_latex,
            "pwc-json": rep.render_pwc_json}[fmt_](boards)
    if file_:
        Path(file_).write_text(text, encoding="utf-8")
        click.echo(f"wrote {file_}")
    else:
        click.echo(text)


def check_writable(path, folder: bool) -> None:
    """Refuse an output path that cannot be written before anything is rendered."""
    if folder:
        if path.exists() and not path.is_dir():
            raise HarnessError(f"--out {path} is a file; pass a folder for the reports")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"cannot create --out {path}: {exc.strerror}") from None
    elif path.is_dir() or not path.parent.is_dir():
        raise HarnessError(f"cannot write --file {path}: {'it is a folder' if path.is_dir() else 'no such folder'}")


def main() -> None:
    try:
        cli.main(prog_name="harness", standalone_mode=False)
        dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no process group
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except HarnessError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, naming where the full usage is
        command = exc.ctx.command_path if exc.ctx else "harness"
        click.echo(f"error: {exc.format_message().rstrip('.')}; see `{command} --help`", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
