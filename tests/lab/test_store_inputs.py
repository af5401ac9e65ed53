"""Store URLs that cannot work are one line and exit 2; passwords with '/', spaces or an unencoded
'@' never show; a new SQLite store (it holds the forget set's texts) is readable by its owner only."""
from __future__ import annotations

import stat

import pytest

from studies.store.db import Store
from studies.store.sqlite_file import describe_url, scrub
from tests.studies_helpers import assert_one_line_error, cli, cli_in_process

SECRET = "Tr0ub4dor-s3cret"


@pytest.mark.parametrize("url, needles", [
    (f"postgresql://u:{SECRET}@host:notaport/x", ["not a database URL", "u:***@host:notaport"]),
    ("sqlite://", ["in-memory SQLite store"]),
    ("sqlite:///:memory:", ["in-memory SQLite store"]),
    ("sqlite:///{tmp}/lab.db?mode=ro", ["take no options", "?mode=ro"]),
])
def test_a_store_url_that_cannot_work_is_one_line(url, needles, tmp_path, capsys):
    p = cli_in_process(capsys, "study", "ls", "--storage", url.format(tmp=tmp_path))
    line = assert_one_line_error(p, *needles)
    assert SECRET not in p.stdout + p.stderr, line
    assert not list(tmp_path.iterdir())  # nothing made


@pytest.mark.parametrize("password", [f"se/cr et-{SECRET}", f"p@ss-{SECRET}", f"{SECRET}@@x"])
def test_a_password_with_a_slash_a_space_or_an_at_never_shows(password, tmp_path):
    url = f"postgresql+psycopg2://lab:{password}@127.0.0.1:1/unlearn"  # port 1: refused at once
    shown = describe_url(url)
    assert SECRET not in shown and shown.startswith("postgresql+psycopg2://lab:***@") and shown.endswith("/unlearn")
    assert SECRET not in scrub(f"could not translate host name \"{password.split('@', 1)[-1]}@127.0.0.1\"", url)
    r = cli("study", "ls", "--storage", url, home=tmp_path / "home")
    assert_one_line_error(r, "cannot open store", "lab:***@")
    assert SECRET not in r.stdout + r.stderr

    import setproctitle

    from tui.cli.main import hide_storage_password

    before = setproctitle.getproctitle()
    try:
        hide_storage_password(["study", "ls", "--storage", url])
        title = setproctitle.getproctitle()
        assert SECRET not in title and "lab:***@127.0.0.1:1/unlearn" in title, title
    finally:
        setproctitle.setproctitle(before)


def test_a_new_sqlite_store_and_its_wal_are_its_owners_only(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    store.log("made", "a row, so the WAL exists")
    made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert made["lab.db"] == 0o600 and made.get("lab.db-wal", 0o600) == 0o600 and made.get("lab.db-shm", 0o600) == 0o600
    assert "lab.db-wal" in made


def test_retry_sees_a_lock_wait_inside_optunas_error(tmp_path):
    """Optuna wraps SQLAlchemy's errors in StorageInternalError, whose text names no lock: Store.retry
    reads the causes, so a lock wait in record_cell or the TPE ask is tried again, not a failed run."""
    import sqlite3

    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    calls: list[int] = []

    def wrapped(message: str):
        try:
            raise OperationalError("INSERT INTO trials ...", {}, sqlite3.OperationalError(message))
        except OperationalError as e:
            raise StorageInternalError("An exception is raised during the commit.") from e

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            wrapped("database is locked")
        return "told"

    assert store.retry(flaky) == "told" and len(calls) == 3
    calls.clear()
    with pytest.raises(StorageInternalError):  # anything else fails at once
        store.retry(lambda: calls.append(1) or wrapped("no such table: trials"))
    assert len(calls) == 1


def test_a_store_left_without_its_version_row_is_made_whole(tmp_path):
    """The tables of a fresh store and its version row are one transaction now; a store an older
    unlearn-lab left half made (tables, no version row, no data) opens instead of being refused."""
    import sqlite3

    from studies.store.sqlite_file import SCHEMA_VERSION

    path = tmp_path / "lab.db"
    Store(f"sqlite:///{path}")
    with sqlite3.connect(path) as c:
        c.execute("DELETE FROM ul_meta")
    Store(f"sqlite:///{path}", create=False)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM ul_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_two_processes_upgrading_one_old_store_at_once_both_open_it(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "old.db"
    shutil.copy(Path(__file__).parents[1] / "fixtures" / "store_v2.sqlite", path)
    code = f"from studies.store.db import Store; Store('sqlite:///{path}', create=False)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, errs = p.communicate(timeout=120)
        assert p.returncode == 0, errs
    from studies.store.forgetsets import forget_set_texts

    store = Store(f"sqlite:///{path}", create=False)
    assert forget_set_texts(store, store.forget_set("legacy")).counts()["forget"] == 1
