"""The results store on every backend (SQLite always; PostgreSQL and MySQL/MariaDB where a
server is given)."""
import multiprocessing as mp
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from bench.store_concurrency import open_at, ready, writer
from harness import HarnessError
from harness.migrate import VERSION_TABLE, alembic_config, head_revision, upgrade
from harness.provenance import this_process
from harness.runner import RunRequest, execute
from harness.store import Base, Run, Store, now


def new_run(store, rid, config_hash="h", status="running", started_at=None, extra=None):
    store.start_run(Run(id=rid, method="ce", dataset="synth-lt", rho=100, backbone="b", seed=0, generator="ldam",
                        preset="quick", config={"nested": {"lr": 0.1}}, config_hash=config_hash, status=status,
                        started_at=started_at or now(), device="cpu", git_commit="x", versions={},
                        data_checksum="c", extra=extra or {}))


GOOD = {"split": "test", "group": "all", "top1": 50.0, "error": 50.0, "n_classes": 6}
EMPTY_GROUP = {"split": "test", "group": "few", "top1": None, "error": None, "n_classes": 0}


def test_complete_run_round_trips_numbers_nulls_and_json(store_url):
    """Numbers come back as written, to the last bit, and times to the microsecond (MySQL's
    FLOAT and DATETIME would give 82.4599990845 and whole seconds)."""
    store = Store(store_url)
    started = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
    new_run(store, "r1", started_at=started)
    store.complete_run("r1", metrics=[{**GOOD, "top1": 82.46, "error": 100 - 82.46, "ece": 7.31}, EMPTY_GROUP],
                       class_metrics=[{"class_index": 0, "class_name": "a", "train_count": 3, "accuracy": 12.5,
                                       "weight_norm": 0.75}],
                       curves=[{"kind": "tau_sweep", "x": 0.1, "split": "val", "group": "all", "value": 40.0}],
                       extra={"tau": 1.2, "maxnorm_active_steps": 3}, wall_seconds=2.5, stage1_cached=True)
    row = Store(store_url).get_run("r1")
    assert row.status == "completed" and row.extra == {"tau": 1.2, "maxnorm_active_steps": 3}
    assert row.config == {"nested": {"lr": 0.1}} and row.stage1_cached == 1
    assert sorted((m.group, m.top1, m.error, m.ece) for m in row.metrics) == [("all", 82.46, 100 - 82.46, 7.31),
                                                                               ("few", None, None, None)]
    as_utc = row.started_at if row.started_at.tzinfo else row.started_at.replace(tzinfo=timezone.utc)
    assert as_utc == started and row.finished_at > row.started_at
    assert isinstance(row.class_metrics[0].accuracy, float) and row.curves[0].value == 40.0


def test_completion_is_one_transaction(store_url):
    store = Store(store_url)
    new_run(store, "r1")
    bad_class_row = {"class_index": 0, "class_name": "a", "train_count": 1, "accuracy": None, "weight_norm": 1.0}
    with pytest.raises(Exception):  # NOT NULL accuracy fails after the metrics were added
        store.complete_run("r1", metrics=[GOOD], class_metrics=[bad_class_row], curves=[], extra={},
                           wall_seconds=1.0, stage1_cached=False)
    row = store.get_run("r1")
    assert row.status == "running" and row.metrics == []


def test_failed_run_keeps_reason_and_epoch_and_interrupted_rows_are_closed(store_url):
    store = Store(store_url)
    new_run(store, "diverged")
    store.fail_run("diverged", "TrainingDiverged: loss became nan in epoch 7", 3.0, failed_epoch=7)
    new_run(store, "long")   # a long error is kept whole (MySQL's TEXT would refuse it, and the row stay running)
    store.fail_run("long", "RuntimeError: " + "x" * 100_000, 1.0)
    new_run(store, "dead", config_hash="same")
    new_run(store, "resumer", config_hash="same")
    new_run(store, "later", config_hash="same")   # started after the resumer: may be alive
    assert store.close_interrupted("same", completed_by="resumer", resumed=True) == 1
    rows = {r.id: r for r in store.list_runs()}
    assert rows["diverged"].status == "failed" and rows["diverged"].failed_epoch == 7
    assert rows["long"].status == "failed" and len(rows["long"].error) == 100_014
    assert rows["dead"].status == "failed" and "resumed by run resumer" in rows["dead"].error
    assert rows["resumer"].status == rows["later"].status == "running"
    new_run(store, "rerun", config_hash="same")   # a fresh run of it, nothing resumed
    assert store.close_interrupted("same", completed_by="rerun", resumed=False) == 2
    rows = {r.id: r for r in store.list_runs()}
    assert rows["later"].status == "failed" and "run rerun has since completed" in rows["later"].error


def test_rows_whose_process_on_this_machine_is_gone_are_closed_and_no_others(store_url):
    """A `running` row whose process died (kill -9, out of memory, a reboot) and whose
    configuration nobody completes again is closed by the next harness process on its machine;
    a live process's row, another machine's and a row from before processes were recorded stay."""
    store = Store(store_url)
    me = this_process()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    new_run(store, "alive", extra={"process": me})
    new_run(store, "killed", extra={"process": {**me, "pid": ended.pid}})
    new_run(store, "pid-reused", extra={"process": {**me, "start": me["start"] - 1}})   # our pid, another start
    new_run(store, "rebooted", extra={"process": {**me, "boot": "an earlier boot"}})
    new_run(store, "elsewhere", extra={"process": {**me, "host": "another-machine", "pid": ended.pid}})
    new_run(store, "before-processes-were-recorded")
    new_run(store, "done", status="completed", extra={"process": {**me, "pid": ended.pid}})
    assert sorted(store.fail_dead_runs()) == ["killed", "pid-reused", "rebooted"]
    rows = {r.id: r for r in store.list_runs()}
    assert {i for i, r in rows.items() if r.status == "running"} == {"alive", "elsewhere",
                                                                     "before-processes-were-recorded"}
    assert f"pid {ended.pid} on {me['host']}) ended without a word" in rows["killed"].error
    assert rows["done"].status == "completed" and store.fail_dead_runs() == []
    # a row closed as dead that completes after all (another container under the same host
    # name) is a completed row, with no error left on it
    store.complete_run("pid-reused", metrics=[GOOD], class_metrics=[], curves=[], extra={}, wall_seconds=1.0,
                       stage1_cached=False)
    row = store.get_run("pid-reused")
    assert row.status == "completed" and row.error is None


def test_a_store_from_before_migrations_is_refused_then_upgraded(store_url):
    engine = create_engine(store_url)
    with engine.begin() as con:  # the baseline schema, with no version stamp: a pre-Alembic results.db
        command.upgrade(alembic_config(con), "0001")
        con.execute(text("DROP TABLE harness_alembic_version"))
        con.execute(text("INSERT INTO runs VALUES ('old', 'ce', 'd', 100, 'b', 0, 'ldam', 'paper', '{}', 'h', "
                         "'completed', '2026-01-01 00:00:00', NULL, 1.0, 'cpu', 'x', '{}', 'c', 0, '{}', NULL)"))
    engine.dispose()
    with pytest.raises(HarnessError, match="harness db upgrade"):
        Store(store_url)
    assert upgrade(store_url) == ("0001", head_revision())
    [row] = Store(store_url).list_runs()
    assert row.id == "old" and row.status == "completed" and row.failed_epoch is None


def test_an_upgraded_store_has_the_schema_of_a_new_one(store_url):
    """Every migration from the baseline on, this backend's column types included, ends at
    what the models create."""
    engine = create_engine(store_url)
    with engine.begin() as con:
        command.upgrade(alembic_config(con), "0001")
    engine.dispose()
    upgrade(store_url)
    engine = create_engine(store_url)
    with engine.connect() as con:
        context = MigrationContext.configure(con, opts={"compare_type": True})
        diff = [d for d in compare_metadata(context, Base.metadata)
                if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)]
    engine.dispose()
    assert diff == []


def test_parallel_writers_lose_nothing(store_url):
    Store(store_url)
    with mp.get_context("spawn").Pool(4) as pool:
        errors = sum(pool.starmap(writer, [(store_url, w, 15) for w in range(4)]), [])
    assert errors == []
    runs = Store(store_url).list_runs()
    assert len(runs) == 60 and all(r.status == "completed" and len(r.metrics) == 4 for r in runs)


def test_processes_that_open_a_new_store_together_create_it_once(store_url):
    """Nobody made the store first: every process finds it missing and creates it, one at a
    time (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), none failing on a table
    another just created."""
    with mp.get_context("spawn").Pool(6) as pool:
        assert len(set(pool.map(ready, range(6), chunksize=1))) == 6   # all six up, the store's code imported
        when = time.time() + 1.0
        errors = [e for e in pool.starmap(open_at, [(store_url, when)] * 6) if e]
    assert errors == []
    with Store(store_url) as store:
        new_run(store, "r")
        assert [r.id for r in store.list_runs()] == ["r"]


def test_a_real_run_is_stored(synth, store_url):
    [res] = execute(RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", device="cpu", db=store_url,
                               progress=False))
    row = Store(store_url).get_run(res.run_id)
    assert row.status == "completed" and len(row.class_metrics) == 6


def test_a_reader_never_creates_a_store(store_url):
    """`create=False` (list, show, report): a database without our tables is refused and left
    as it was; once a writer made the store, the reader opens it."""
    with pytest.raises(HarnessError, match="no results store"):
        Store(store_url, create=False)
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            from sqlalchemy import inspect
            assert inspect(conn).get_table_names() == []
    finally:
        engine.dispose()
    Store(store_url).close()
    with Store(store_url, create=False) as store:
        assert store.list_runs() == []


def test_exclusive_holds_off_a_second_holder_and_no_writer(store_url):
    """Processes settling a tuning study take turns (tune.settle); writers, the store's own and
    Optuna's, go on meanwhile, or a holder waiting on its own write would deadlock."""
    import threading

    holder, other = Store(store_url), Store(store_url)
    events, entered = [], threading.Event()

    def hold():
        with holder.exclusive("harness tune s"):
            entered.set()
            time.sleep(0.8)
            new_run(holder, "by-holder")
            events.append("released")

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    new_run(other, "by-other")   # not in the lock: not held off
    events.append("wrote")
    with other.exclusive("harness tune s"):
        events.append("acquired")
    thread.join()
    assert events == ["wrote", "released", "acquired"]
    assert {r.id for r in other.list_runs()} == {"by-holder", "by-other"}
    holder.close(), other.close()


def test_a_missing_driver_names_the_extra_that_installs_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pymysql", None)   # as if it were not installed
    with pytest.raises(HarnessError, match=r"no module named pymysql; pip install 'ltr-harness\[mysql\]'"):
        Store("mysql+pymysql://nobody@127.0.0.1:1/none")


def dump(store, ids):
    """Every column of the runs `ids` and of their child rows, as comparable values."""
    def plain(obj):
        row = {c.name: getattr(obj, c.key) for c in obj.__table__.columns if c.name not in ("id", "run_id")}
        return {k: v.replace(tzinfo=None) if isinstance(v, datetime) and v.tzinfo is None else
                v.astimezone(timezone.utc).replace(tzinfo=None) if isinstance(v, datetime) else v
                for k, v in row.items()}
    out = {}
    for rid in ids:
        run = store.get_run(rid)
        out[rid] = (plain(run) | {"id": rid}, sorted(map(repr, map(plain, run.metrics))),
                    sorted(map(repr, map(plain, run.class_metrics))), sorted(map(repr, map(plain, run.curves))))
    return out


def finished_store(url):
    store = Store(url)
    new_run(store, "done", started_at=datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc))
    store.complete_run("done", metrics=[{**GOOD, "top1": 82.46, "error": 100 - 82.46}, EMPTY_GROUP],
                       class_metrics=[{"class_index": i, "class_name": f"c{i}", "train_count": 10 - i,
                                       "accuracy": 100 / 3 * i, "weight_norm": 0.1 * i} for i in range(3)],
                       curves=[{"kind": "loss", "x": e, "split": "train", "group": "all", "value": 1 / (e + 1)}
                               for e in range(4)],
                       extra={"tau": 1.2}, wall_seconds=2.5, stage1_cached=False)
    new_run(store, "broke")
    store.fail_run("broke", "TrainingDiverged: loss became nan in epoch 3", 1.0, failed_epoch=3)
    new_run(store, "live")
    return store


def test_merge_copies_finished_runs_whole_once_and_leaves_running_ones(tmp_path, store_url):
    source = finished_store(f"sqlite:///{tmp_path / 'gpu.db'}")
    dest = Store(store_url)
    new_run(dest, "mine")
    assert dest.merge_from(source, chunk=1) == {"copied": 2, "already here": 0, "running left behind": 1}
    assert {r.id: r.status for r in dest.list_runs()} == {"mine": "running", "done": "completed", "broke": "failed"}
    assert dump(dest, ["done", "broke"]) == dump(source, ["done", "broke"])
    assert dest.merge_from(source) == {"copied": 0, "already here": 2, "running left behind": 1}
    assert len(dest.get_run("done").class_metrics) == 3


def test_delete_takes_a_run_whole_or_nothing_and_a_running_row_only_when_asked(store_url):
    store = finished_store(store_url)   # done (completed, with children), broke (failed), live (running)
    new_run(store, "done-too")
    with pytest.raises(HarnessError, match="no run 'nope'"):
        store.delete_runs(["broke", "nope"])
    with pytest.raises(HarnessError, match="run live is running; stop its process first, or pass --running"):
        store.delete_runs(["broke", "live"])
    assert {r.id for r in store.list_runs()} == {"done", "broke", "live", "done-too"}   # nothing went
    with pytest.raises(HarnessError, match="'do' begins several run ids"):   # a prefix of two runs names neither
        store.delete_runs(["do"])
    with pytest.raises(HarnessError, match="no run 'd_ne'"):   # a prefix is text, not a LIKE pattern
        store.delete_runs(["d_ne"])
    assert sorted(r.id for r in store.delete_runs(["done", "brok", "done"])) == ["broke", "done"]
    with create_engine(store_url).connect() as con:   # the children went with their run
        left = {t: con.execute(text(f"SELECT COUNT(*) FROM {t} WHERE run_id = 'done'")).scalar()
                for t in ("metrics", "class_metrics", "curves")}
    assert left == {"metrics": 0, "class_metrics": 0, "curves": 0}
    assert [r.id for r in store.delete_runs(["live"], running=True)] == ["live"]
    assert [r.id for r in store.list_runs()] == ["done-too"]


def test_merge_reads_every_backend(tmp_path, store_url):
    source = finished_store(store_url)
    dest = Store(f"sqlite:///{tmp_path / 'results.db'}")
    assert dest.merge_from(source)["copied"] == 2
    assert dump(dest, ["done", "broke"]) == dump(source, ["done", "broke"])
    source.close()


def test_merge_is_all_or_nothing(tmp_path, monkeypatch):
    import harness.store as store_mod

    source = finished_store(f"sqlite:///{tmp_path / 'gpu.db'}")
    dest = Store(f"sqlite:///{tmp_path / 'results.db'}")
    real = store_mod.portable

    def failing(table, row):   # in chunks of one run, "broke" is copied before "done"'s curves fail
        if table.name == "curves":
            raise OSError("disk went away")
        return real(table, row)

    monkeypatch.setattr(store_mod, "portable", failing)
    with pytest.raises(OSError):
        dest.merge_from(source, chunk=1)
    assert dest.list_runs() == []
    with pytest.raises(HarnessError, match="is the store being merged into"):
        dest.merge_from(Store(f"sqlite:///{tmp_path / '.' / 'results.db'}"))


def test_closing_interrupted_rows_never_overwrites_a_run_completed_meanwhile(store_url):
    """Two processes ran one configuration; the later finished first and closes the earlier's
    row as dead just as the earlier completes it. On a server both transactions overlap: the
    completion must survive (loading the row and writing it back lost it)."""
    from sqlalchemy import event

    if store_url.startswith("sqlite"):
        pytest.skip("SQLite lets one writer in at a time: nothing completes meanwhile")
    store, other = Store(store_url), Store(store_url)
    new_run(store, "slow", config_hash="same")
    new_run(store, "fast", config_hash="same")
    fired = []

    def complete_slow_now(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE") and not fired:
            fired.append(statement)
            other.complete_run("slow", metrics=[GOOD], class_metrics=[], curves=[], extra={}, wall_seconds=1.0,
                               stage1_cached=False)

    event.listen(store.engine, "before_cursor_execute", complete_slow_now)
    assert store.close_interrupted("same", completed_by="fast", resumed=False) == 0
    assert fired and other.get_run("slow").status == "completed"
    store.close(), other.close()


def test_a_store_opened_only_to_read_that_is_not_there_is_no_store_on_every_backend(store_url):
    """`run --dry-run` tells "no store yet" (NoStore) from a store it cannot use: an empty SQLite path
    or a server database without tables is NoStore, and reading makes nothing."""
    from harness.migrate import NoStore

    with pytest.raises(NoStore, match=r"(no results store at .*|holds no results store); check --db"):
        Store(store_url, create=False)
    with pytest.raises(NoStore):   # still none: reading made nothing
        Store(store_url, create=False)
    Store(store_url).close()
    Store(store_url, create=False).close()
