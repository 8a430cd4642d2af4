import os

import pytest
import torch

from harness.registry import DATASETS
from tests.synthetic import BENCHMARKS_YAML, SYNTH_LT

torch.set_num_threads(2)


@pytest.fixture
def synth(tmp_path, monkeypatch):
    """Register the synthetic dataset and point the harness at a temporary store,
    cache and benchmarks file. Yields the store URL."""
    bench = tmp_path / "benchmarks.yaml"
    bench.write_text(BENCHMARKS_YAML)
    monkeypatch.setenv("HARNESS_BENCHMARKS", str(bench))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("HARNESS_DB", url)
    DATASETS.register("synth-lt", SYNTH_LT)
    yield url
    DATASETS.unregister("synth-lt")


# the servers the store tests also run on, each where its variable names one
SERVERS = {"postgresql": "HARNESS_TEST_PG_URL", "mysql": "HARNESS_TEST_MYSQL_URL"}


@pytest.fixture(params=["sqlite", *SERVERS])
def store_url(request, tmp_path):
    """An empty results store on each backend. A server backend needs its variable:
    .ci/run starts PostgreSQL and MariaDB on loopback and sets HARNESS_TEST_PG_URL
    (postgresql+psycopg://user@host:port/db) and HARNESS_TEST_MYSQL_URL
    (mysql+pymysql://user:password@host:port/db); each test gets a database of its own,
    dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import uuid

    from sqlalchemy import create_engine, make_url, text

    base = os.environ.get(SERVERS[request.param])
    if not base:
        pytest.skip(f"{request.param} store tests need {SERVERS[request.param]} (.ci/run starts a server and sets it)")
    name = f"harness_test_{uuid.uuid4().hex[:12]}"
    # PostgreSQL drops a database that a leftover connection still holds only when forced
    drop = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if request.param == "postgresql" else "")
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as con:
            con.execute(text(drop))
        admin.dispose()
