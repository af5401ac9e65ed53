"""The lab's tests: fixtures they share (the model and forget-set fixtures, and the two sweeps'
store, are in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture
def store(tmp_path, forget_set_files):
    """A fresh SQLite store (lab.db in the test's folder) with the forget set `fs`: the four
    files of tests/conftest.py, at the tiny model's sequence length."""
    from studies.store.db import Store
    from tests.studies_helpers import make_forget_set

    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    make_forget_set(store, "fs", forget_set_files)
    return store


@pytest.fixture
def pg_database():
    """The URL of a PostgreSQL database of the test's own on the CI's server (dropped after), and an
    admin connection to that server (autocommit); skipped where UNLEARN_TEST_PG_URL is not set."""
    import os
    import uuid

    import psycopg2

    base = os.environ.get("UNLEARN_TEST_PG_URL")
    if not base:
        pytest.skip("UNLEARN_TEST_PG_URL is not set (.ci/postgres sets it where PostgreSQL can run)")
    def connect():
        con = psycopg2.connect(base.replace("postgresql+psycopg2://", "postgresql://"))
        con.autocommit = True
        return con

    name = f"ul_t_{uuid.uuid4().hex[:10]}"
    admin = connect()
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name, admin
    finally:
        admin.close()
        admin = connect()  # a fresh one: the test may have restarted the server
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
