"""The results store: SQLAlchemy models and the only code that writes them.

A run row is inserted as `running` before training and completed, with all its
metrics, in one transaction at the end; a crash leaves a `running` or `failed`
row and never half a result. Numbers are stored as numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, delete, event,
                        insert, select, update)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from harness import HarnessError
from harness.locks import MYSQL, server_lock
from harness.migrate import DB_OPTION, NoStore, ensure_schema, sqlite_file

DEFAULT_URL = "sqlite:///results.db"
DRIVER_EXTRAS = {"psycopg": "postgres", "pymysql": "mysql"}   # the extra that installs each driver


class Base(DeclarativeBase):
    pass


# MySQL and MariaDB keep FLOAT in single precision, DATETIME in whole seconds and TEXT up to
# 64 KiB: a top-1 of 82.46 would read back as 82.4599990845, runs started within one second
# could not be ordered, and a long error would fail the write that marks its run failed.
# SQLite and PostgreSQL keep doubles, microseconds and any length under the plain types.
Real = Float().with_variant(mysql.DOUBLE(asdecimal=False), *MYSQL)
Timestamp = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *MYSQL)
LongText = Text().with_variant(mysql.MEDIUMTEXT(), *MYSQL)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    method: Mapped[str] = mapped_column(String(64), index=True)
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    rho: Mapped[float] = mapped_column(Real)
    backbone: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    generator: Mapped[str] = mapped_column(String(16))
    preset: Mapped[str] = mapped_column(String(32), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | completed | failed
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    wall_seconds: Mapped[float | None] = mapped_column(Real, nullable=True)
    device: Mapped[str] = mapped_column(String(128))
    git_commit: Mapped[str] = mapped_column(String(64))
    versions: Mapped[dict] = mapped_column(JSON)
    data_checksum: Mapped[str] = mapped_column(String(64))
    stage1_cached: Mapped[int] = mapped_column(Integer, default=0)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(LongText, nullable=True)
    failed_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)  # where a NaN/inf loss stopped it
    # the tuning study this run is a trial of (`harness tune`); trials are never ranked
    study: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    metrics: Mapped[list["Metric"]] = relationship(back_populates="run", cascade="all, delete-orphan")
    class_metrics: Mapped[list["ClassMetric"]] = relationship(back_populates="run", cascade="all, delete-orphan")
    curves: Mapped[list["CurvePoint"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    split: Mapped[str] = mapped_column(String(8))    # test | val
    group: Mapped[str] = mapped_column(String(8))    # all | many | medium | few
    top1: Mapped[float | None] = mapped_column(Real, nullable=True)   # percent; NULL = empty group
    error: Mapped[float | None] = mapped_column(Real, nullable=True)
    # expected calibration error, percent (harness.data.calibration_error); NULL: not measured
    ece: Mapped[float | None] = mapped_column(Real, nullable=True)
    n_classes: Mapped[int] = mapped_column(Integer)
    run: Mapped[Run] = relationship(back_populates="metrics")


class ClassMetric(Base):
    __tablename__ = "class_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(128))
    train_count: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Real)      # test, percent
    weight_norm: Mapped[float] = mapped_column(Real)   # ||w_c|| of the final classifier
    run: Mapped[Run] = relationship(back_populates="class_metrics")


class CurvePoint(Base):
    """Series a report can plot: the τ sweep, per-epoch training loss, the test reliability diagram."""
    __tablename__ = "curves"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    x: Mapped[float] = mapped_column(Real)
    split: Mapped[str] = mapped_column(String(8))
    group: Mapped[str] = mapped_column(String(8))
    value: Mapped[float | None] = mapped_column(Real, nullable=True)
    run: Mapped[Run] = relationship(back_populates="curves")


def db_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("HARNESS_DB") or DEFAULT_URL


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # The driver's own transaction handling leaves DDL outside transactions; SQLAlchemy's
    # `begin` event below issues BEGIN itself, so a new store's tables and stamp appear at once.
    dbapi_conn.isolation_level = None
    # WAL so that parallel runs can write; a busy timeout instead of "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn) -> None:
    # IMMEDIATE takes the write lock up front, waiting out the busy timeout: a transaction
    # that read first and wrote later could fail at once in WAL mode when another process
    # wrote in between, and processes opening a new store together create it one at a time.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def completed_of(session: Session, config_hashes: list[str], data_name: str | None) -> list[tuple[str, str]]:
    """(config hash, run id) of the completed runs of these configs on this data: a run on one
    image folder is no run on another (harness.streaming.folder_name); a benchmark's runs name none."""
    data = Run.extra["data_name"].as_string()
    return session.execute(select(Run.config_hash, Run.id).where(
        Run.status == "completed", Run.config_hash.in_(config_hashes),
        data.is_(None) if data_name is None else data == data_name)).all()


class Store:
    def __init__(self, url: str | None = None, create: bool = True, option: str = DB_OPTION):
        """`create=False` for commands that only read (list, show, report): a store that does
        not exist yet is an error naming `option` (where the URL came from: --db, merge's
        SOURCE), not an empty one made on a typo."""
        self.url = db_url(url)
        try:
            kwargs = {"connect_args": {"timeout": 30}} if self.url.startswith("sqlite") else {}
            self.engine = create_engine(self.url, **kwargs)
            path = self.sqlite_file
            if not create and path and not os.path.exists(path):
                raise NoStore(f"no results store at {path}", option)
            if self.url.startswith("sqlite"):
                event.listen(self.engine, "connect", _sqlite_pragmas)
                event.listen(self.engine, "begin", _sqlite_begin)
            ensure_schema(self.engine, self.url, Base.metadata, create, option)
        except ModuleNotFoundError as exc:   # the URL's database driver, most likely
            fix = f"pip install 'ltr-harness[{DRIVER_EXTRAS[exc.name]}]'" if exc.name in DRIVER_EXTRAS else \
                "install the database driver the URL names"
            raise HarnessError(f"cannot open results store {self.url}: no module named {exc.name}; {fix}") from exc
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise HarnessError(f"cannot open results store {self.url}: {reason}; "
                               f"check {option} (any SQLAlchemy URL)") from exc

    def close(self) -> None:
        # Closes the pooled connections now, not whenever the garbage collector breaks the
        # engine's cycles: SQLite folds its WAL back into results.db only when the last one closes.
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def exclusive(self, name: str):
        """Hold the lock `name` against every process on this store (every machine, on a
        server) without blocking anybody's writes, this store's or Optuna's: a server lock
        (harness.locks), or a lock file beside a SQLite database (`results.db-lock`, one for
        every name: coarser, never wrong)."""
        if self.engine.dialect.name == "sqlite":
            if self.sqlite_file is None:   # in memory: no other process can see this store
                yield
                return
            from filelock import FileLock

            # a lock on a file of its own: a lock inside the database would block its writers
            with FileLock(f"{self.sqlite_file}-lock"):
                yield
            return
        with self.engine.connect() as conn, server_lock(conn, name) as held:
            if not held:
                raise HarnessError(f"{self.url}: {self.engine.dialect.name} has no lock the harness can take; "
                                   "use a SQLite, PostgreSQL or MySQL/MariaDB store")
            yield

    def start_run(self, run: Run) -> None:
        with self.session() as s, s.begin():
            s.add(run)

    def complete_run(self, run_id: str, *, metrics: list[dict], class_metrics: list[dict],
                     curves: list[dict], extra: dict, wall_seconds: float, stage1_cached: bool) -> None:
        """Everything a finished run produced, in one transaction."""
        with self.session() as s, s.begin():
            run = s.get(Run, run_id)
            run.metrics = [Metric(**m) for m in metrics]
            run.class_metrics = [ClassMetric(**c) for c in class_metrics]
            run.curves = [CurvePoint(**c) for c in curves]
            run.extra = json.loads(json.dumps(extra))
            run.wall_seconds = wall_seconds
            run.stage1_cached = int(stage1_cached)
            run.status = "completed"
            run.error = run.failed_epoch = None   # a row closed as dead that was alive after all
            run.finished_at = now()

    def fail_run(self, run_id: str, error: str, wall_seconds: float, failed_epoch: int | None = None) -> None:
        with self.session() as s, s.begin():
            run = s.get(Run, run_id)
            run.status = "failed"
            run.error = error
            run.failed_epoch = failed_epoch
            run.finished_at = now()
            run.wall_seconds = wall_seconds

    def close_interrupted(self, config_hash: str, completed_by: str, resumed: bool) -> int:
        """Mark as failed the `running` rows of this configuration that started before run
        `completed_by`, which finished it: their process died (kill -9, out of memory) before
        it could say so. Rows started later may be live runs of the same configuration."""
        error = (f"interrupted; its training was resumed by run {completed_by}" if resumed else
                 f"interrupted (its process ended without a word); run {completed_by} has since "
                 "completed this configuration")
        with self.session() as s, s.begin():
            started = s.scalar(select(Run.started_at).where(Run.id == completed_by))
            ids = s.scalars(select(Run.id).where(Run.config_hash == config_hash, Run.status == "running",
                                                 Run.id != completed_by, Run.started_at < started)).all()
            return len(fail_if_running(s, {run_id: error for run_id in ids}))

    def fail_dead_runs(self) -> list[str]:
        """Mark as failed the `running` rows whose process, on this machine, is known to have
        ended (`provenance.process_gone`: killed, out of memory, rebooted) and return them: a
        configuration nobody runs again would otherwise stay `running` for ever. Rows of other
        machines' processes are left to those machines."""
        from harness.provenance import process_gone

        with self.session() as s, s.begin():
            rows = s.execute(select(Run.id, Run.extra).where(Run.status == "running")).all()
            errors = {run_id: f"interrupted: its process (pid {extra['process']['pid']} on "
                              f"{extra['process']['host']}) ended without a word"
                      for run_id, extra in rows if process_gone((extra or {}).get("process"))}
            return fail_if_running(s, errors)

    def fail_dead_trials(self, study: str, trial_numbers: set[int]) -> list[str]:
        """Mark as failed the `running` rows of these trials of `study`, which Optuna found dead
        (their heartbeat stopped): the `harness tune` process training them was killed."""
        with self.session() as s, s.begin():
            rows = s.execute(select(Run.id, Run.extra).where(Run.study == study, Run.status == "running")).all()
            errors = {run_id: f"interrupted: trial {extra['trial']['number']}'s heartbeat stopped "
                              "(its `harness tune` process ended without a word)"
                      for run_id, extra in rows if extra.get("trial", {}).get("number") in trial_numbers}
            return fail_if_running(s, errors)

    @property
    def sqlite_file(self) -> str | None:
        """The file of a SQLite store; None in memory or on a server."""
        return sqlite_file(self.engine.url)

    def same_database(self, other: "Store") -> bool:
        a, b = self.engine.url, other.engine.url
        if a.get_backend_name() == b.get_backend_name() == "sqlite":   # two in-memory stores are two stores
            return self.sqlite_file is not None and other.sqlite_file is not None and \
                os.path.realpath(self.sqlite_file) == os.path.realpath(other.sqlite_file)
        return (a.get_backend_name(), a.host, a.port, a.database) == (b.get_backend_name(), b.host, b.port, b.database)

    def merge_from(self, source: "Store", chunk: int = 200) -> dict[str, int]:
        """Copy into this store every finished (completed or failed) run of `source` that it
        lacks, with its metrics, per-class rows and curves, in one transaction: all of them or,
        on any error, none. A run id present in both is the same run and is left as it is here.
        Running rows stay behind: they are live, or dead and to be rerun, and a finished row
        never changes again, so what is copied is whole. Tuning trials come along (a tuned board
        plots them); Optuna's own study tables do not, and need not: a study resumed here takes
        its complete trials back from their rows (tune.reclaim_orphans). Returns the counts:
        copied, already here, running left behind."""
        if self.same_database(source):
            raise HarnessError(f"{source.url} is the store being merged into; name another with --db")
        with source.session() as s:
            states = dict(s.execute(select(Run.id, Run.status)).all())
        tables = [Run.__table__, Metric.__table__, ClassMetric.__table__, CurvePoint.__table__]
        with self.engine.begin() as dest:
            here = set(dest.scalars(select(Run.id))) & states.keys()
            todo = sorted(i for i, state in states.items() if state != "running" and i not in here)
            for start in range(0, len(todo), chunk):
                ids = todo[start:start + chunk]
                # One source transaction per chunk, not per merge: a SQLite transaction holds the
                # store's write lock (BEGIN IMMEDIATE), and runs may still be writing to the source.
                with source.engine.connect() as src:
                    for table in tables:
                        key = table.c.id if table is Run.__table__ else table.c.run_id
                        rows = [portable(table, r) for r in src.execute(select(table).where(key.in_(ids))).mappings()]
                        if rows:
                            dest.execute(insert(table), rows)
        left = sum(1 for i, state in states.items() if state == "running" and i not in here)
        return {"copied": len(todo), "already here": len(here), "running left behind": left}

    def get_run(self, run_id: str) -> Run:
        """The run with this id, or the one whose id starts with it, with everything it holds."""
        with self.session() as s:
            run = self._find(s, run_id)
            _ = (run.metrics, run.class_metrics, run.curves)  # load while the session is open
            return run

    def _find(self, s: Session, run_id: str) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            matches = s.scalars(select(Run).where(Run.id.startswith(run_id, autoescape=True)).limit(3)).all()
            if not matches:
                raise HarnessError(f"no run '{run_id}' in {self.url}; `harness list runs` shows them")
            if len(matches) > 1:
                names = ", ".join(run.id for run in matches[:2]) + (", ..." if len(matches) > 2 else "")
                raise HarnessError(f"'{run_id}' begins several run ids ({names}); give more of the one you mean")
            run = matches[0]
        return run

    def find_runs(self, run_ids: list[str]) -> list[Run]:
        """The runs these ids or unique prefixes name, each once, without what they hold."""
        with self.session() as s:
            return self._find_all(s, run_ids)

    def _find_all(self, s: Session, run_ids: list[str]) -> list[Run]:
        return list({run.id: run for run in (self._find(s, run_id) for run_id in run_ids)}.values())

    def delete_runs(self, run_ids: list[str], running: bool = False) -> list[Run]:
        """Delete these runs (ids or unique prefixes) with their metrics, per-class rows and
        curves, in one transaction: all of them or, when one is unknown or refused, none. A
        `running` row is refused unless `running`: its process, if alive, would complete a row
        that is gone. Returns the runs deleted."""
        with self.session() as s, s.begin():
            runs = self._find_all(s, run_ids)
            live = [run.id for run in runs if run.status == "running"]
            if live and not running:
                raise HarnessError(f"run {', '.join(live)} is running; stop its process first, or pass --running "
                                   "to delete it anyway (a live process would then fail at its end)")
            ids = [run.id for run in runs]
            for table in (CurvePoint, ClassMetric, Metric):
                s.execute(delete(table).where(table.run_id.in_(ids)))
            s.execute(delete(Run).where(Run.id.in_(ids)).execution_options(synchronize_session=False))
            return runs

    def list_runs(self, **equal) -> list[Run]:
        """Runs in the order they started, with their metrics; `equal` keeps those whose columns
        hold these values (method="wb", status="running"; None: any)."""
        query = select(Run).options(selectinload(Run.metrics)).order_by(Run.started_at)
        for column, value in equal.items():
            if value is not None:
                query = query.where(getattr(Run, column) == value)
        with self.session() as s:
            return list(s.scalars(query).all())


def fail_if_running(session: Session, errors: dict[str, str]) -> list[str]:
    """Mark these runs failed with their errors, each only if it is still `running`, and return
    those marked. One UPDATE per row, whose condition the database checks again on the row it
    locks: a run another process completed since it was read stays completed, where loading the
    row and writing it back would overwrite the completion (PostgreSQL and MySQL let the other
    process commit in between; SQLite does not)."""
    failed = []
    for run_id, error in errors.items():
        result = session.execute(update(Run).where(Run.id == run_id, Run.status == "running")
                                 .values(status="failed", error=error, finished_at=now())
                                 .execution_options(synchronize_session=False))
        if result.rowcount:
            failed.append(run_id)
    return failed


def portable(table, row) -> dict:
    """A row read from one store as another takes it: times in UTC with their zone (SQLite and
    MySQL give them without one, PostgreSQL in its session's zone), and without the id that
    numbers the rows of a child table (the destination numbers its own)."""
    out = dict(row)
    for column in table.columns:
        value = out[column.name]
        if isinstance(column.type, DateTime) and value is not None:
            out[column.name] = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if table is not Run.__table__:
        del out["id"]
    return out


def now() -> datetime:
    return datetime.now(timezone.utc)
