"""Schema migrations: a results.db made by the previous schema upgrades without losing rows."""
import json
import sqlite3
from pathlib import Path

import pytest

from harness import HarnessError
from harness.migrate import head_revision, upgrade
from harness.store import Store

PREVIOUS_SCHEMA = (Path(__file__).parent / "fixtures" / "schema_v0_sqlite.sql").read_text()  # from commit 6633f5e


def previous_store(path):
    """A results.db as the pre-migration harness wrote it, with one completed run."""
    con = sqlite3.connect(path)
    con.executescript(PREVIOUS_SCHEMA)
    con.execute("insert into runs values ('r1','ce','cifar10-lt',100.0,'resnet32',0,'ldam','quick',?,'h1',"
                "'completed','2026-11-01 10:00:00','2026-11-01 10:05:00',300.0,'cpu','abc',?,'sum',0,?,NULL)",
                (json.dumps({"method": "ce"}), json.dumps({"torch": "2.14.1"}), json.dumps({"tau": 1.0})))
    con.executemany("insert into metrics (run_id, split, \"group\", top1, error, n_classes) values (?,?,?,?,?,?)",
                    [("r1", "test", g, t, None if t is None else 100 - t, n)
                     for g, t, n in (("all", 70.5, 10), ("many", 90.0, 3), ("medium", 60.0, 7), ("few", None, 0))])
    con.execute("insert into class_metrics (run_id, class_index, class_name, train_count, accuracy, weight_norm) "
                "values ('r1', 0, 'airplane', 5000, 95.0, 1.5)")
    con.execute("insert into curves (run_id, kind, x, split, \"group\", value) values ('r1','tau_sweep',0.5,'val','all',66.0)")
    con.commit()
    con.close()


def test_previous_schema_is_refused_then_upgraded_with_every_row(tmp_path):
    path = tmp_path / "results.db"
    previous_store(path)
    url = f"sqlite:///{path}"
    with pytest.raises(HarnessError, match=r"has schema 0001, this harness needs .*harness db upgrade"):
        Store(url)
    assert upgrade(url) == ("0001", head_revision())
    run = Store(url).get_run("r1")
    assert run.status == "completed" and run.extra == {"tau": 1.0} and run.failed_epoch is None
    assert sorted((m.group, m.top1) for m in run.metrics) == [("all", 70.5), ("few", None), ("many", 90.0),
                                                               ("medium", 60.0)]
    assert {m.ece for m in run.metrics} == {None}   # not measured then
    assert [(c.class_name, c.accuracy) for c in run.class_metrics] == [("airplane", 95.0)]
    assert [(c.kind, c.value) for c in run.curves] == [("tau_sweep", 66.0)]
    assert upgrade(url) == (head_revision(), head_revision())  # idempotent


def test_new_store_is_created_at_the_newest_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    Store(url)
    with sqlite3.connect(tmp_path / "new.db") as con:
        assert con.execute("select version_num from harness_alembic_version").fetchall() == [(head_revision(),)]
        assert "failed_epoch" in [r[1] for r in con.execute("pragma table_info(runs)")]
        assert "ece" in [r[1] for r in con.execute("pragma table_info(metrics)")]


def test_db_upgrade_command(tmp_path):
    from tests.test_cli import harness

    previous_store(tmp_path / "results.db")
    url = f"sqlite:///{tmp_path / 'results.db'}"
    refused = harness("list", "runs", "--db", url)
    assert refused.returncode == 2 and "run `harness db upgrade --db" in refused.stderr
    out = harness("db", "upgrade", "--db", url)
    assert out.returncode == 0 and f"schema 0001 -> {head_revision()}" in out.stdout, out.stderr
    listed = harness("list", "runs", "--db", url)
    assert listed.returncode == 0 and "r1" in listed.stdout and "70.50" in listed.stdout
    # a mistyped path is refused, not made into an empty store "upgraded" from nothing
    typo = tmp_path / "result.db"
    missing = harness("db", "upgrade", "--db", f"sqlite:///{typo}")
    assert missing.returncode == 2 and f"no results store at {typo}; check --db" in missing.stderr
    assert not typo.exists()
    typo.touch()   # a file, but no store in it
    empty = harness("db", "upgrade", "--db", f"sqlite:///{typo}")
    assert empty.returncode == 2 and "holds no results store" in empty.stderr and typo.stat().st_size == 0


def test_a_store_stamped_in_alembics_default_table_moves_to_the_harness_table(tmp_path):
    """Before Optuna shared the database, the harness stamped `alembic_version`: such a store is
    refused, and `db upgrade` moves the stamp so that Optuna can have that table."""
    path = tmp_path / "results.db"
    url = f"sqlite:///{path}"
    Store(url)
    with sqlite3.connect(path) as con:  # what an older harness left: its stamp in Alembic's default table
        con.execute("alter table harness_alembic_version rename to alembic_version")
        con.execute("update alembic_version set version_num = '0002'")
        con.execute("drop index ix_runs_study")
        con.execute("alter table runs drop column study")
        con.execute("alter table metrics drop column ece")
    with pytest.raises(HarnessError, match="has schema 0002"):
        Store(url)
    assert upgrade(url) == ("0002", head_revision())
    with sqlite3.connect(path) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        assert "alembic_version" not in tables
        assert con.execute("select version_num from harness_alembic_version").fetchall() == [(head_revision(),)]
    assert Store(url).list_runs() == []
