"""The list of studies read through the stdlib sqlite3 (`studies.reading.listing.list_studies_sqlite`),
which `unlearn study ls` uses to skip importing the ORM: it gives exactly the rows the ORM path
gives, and it steps aside (None) for every store it cannot read as it is, so the full store
answers those with its own one-line reason or migration."""
from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from studies.lifecycle.study import create_study
from studies.reading.listing import list_studies_sqlite
from studies.reading.status import list_studies
from studies.store.clock import utcnow
from studies.store.db import Store
from studies.store.forgetsets import create_forget_set
from studies.store.sqlite_file import SCHEMA_VERSION
from tui.cli.common import Lab

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path) -> Store:
    for role in ("forget", "retain", "retain_eval", "unseen"):
        (tmp_path / f"{role}.txt").write_text(f"the {role} document, long enough to be one " * 3)
    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    create_forget_set(store, "fs", *([str(tmp_path / f"{r}.txt")] for r in ("forget", "retain", "unseen")),
                      retain_eval=[str(tmp_path / "retain_eval.txt")])
    create_study(store, "S", "EleutherAI/pythia-14m", "fs", methods=["ga", "ga_gd"], lrs=[1e-4], steps=[2, 4])
    return store


def _set_schema(store: Store, value) -> None:
    con = sqlite3.connect(store.url.split("///", 1)[1])
    con.execute("UPDATE ul_meta SET value = ? WHERE key = 'schema_version'", (str(value),))
    con.commit()
    con.close()


def test_same_rows_as_the_orm(store):
    now = utcnow()
    rows = list_studies_sqlite(store.url, now)
    assert rows == list_studies(store, now)
    assert [r["name"] for r in rows] == ["S"] and rows[0]["cells"] == {"done": 0, "diverged": 0, "total": 4}
    assert dt.datetime.fromisoformat(rows[0]["created_at"]).tzinfo is not None


def test_steps_aside_for_what_it_cannot_read_as_it_is(store, tmp_path):
    assert list_studies_sqlite(f"sqlite:///{tmp_path / 'none.db'}") is None  # no file: the store says so
    (tmp_path / "notes.db").write_text("name,score\n" * 50)
    assert list_studies_sqlite(f"sqlite:///{tmp_path / 'notes.db'}") is None  # not a database
    assert list_studies_sqlite(store.url + "?timeout=5") is None  # options: SQLAlchemy's to interpret
    assert list_studies_sqlite("postgresql://lab:pw@127.0.0.1:1/unlearn") is None
    assert list_studies_sqlite("sqlite://") is None  # memory
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert list_studies_sqlite(f"sqlite:///{empty}") is None  # no tables: nothing to read, nothing made
    assert empty.stat().st_size == 0
    for version in (SCHEMA_VERSION - 1, SCHEMA_VERSION + 1):  # the store migrates or refuses
        _set_schema(store, version)
        assert list_studies_sqlite(store.url) is None
    _set_schema(store, SCHEMA_VERSION)
    assert list_studies_sqlite(store.url) is not None


def test_reads_while_a_writer_holds_the_store(store):
    """A worker mid-transaction (SQLite WAL) does not block the list, and the list sees the last commit."""
    with store.write() as s:
        from studies.store.db import Study

        s.get(Study, 1).state = "running"
        s.flush()  # written to the database, not yet committed
        rows = list_studies_sqlite(store.url)
        assert rows is not None and rows[0]["state"] == "created"
    assert list_studies_sqlite(store.url)[0]["state"] == "running"


def test_study_ls_on_sqlite_imports_no_orm(store, tmp_path):
    """What makes `unlearn study ls` fast: neither SQLAlchemy nor sqlmodel in its process."""
    probe = ("import json, sys\nfrom tui.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'sqlmodel'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_")}
    proc = subprocess.run([sys.executable, "-c", probe, "study", "ls", "--json", "--storage", store.url], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    listed, modules = proc.stdout.strip().rsplit("\n", 1)
    assert [r["name"] for r in json.loads(listed)] == ["S"]
    assert json.loads(modules) == []


def test_the_storage_url_flag_then_environment_then_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UNLEARN_STORAGE_URL", raising=False)
    (tmp_path / ".env").write_text("UNLEARN_STORAGE_URL=sqlite:///from-dotenv.db\n")
    assert Lab().storage_url == "sqlite:///from-dotenv.db"
    monkeypatch.setenv("UNLEARN_STORAGE_URL", "sqlite:///from-env.db")
    assert Lab().storage_url == "sqlite:///from-env.db" == Lab().settings.storage_url
    lab = Lab()
    lab.storage_flag = "sqlite:///from-flag.db"
    assert lab.storage_url == "sqlite:///from-flag.db"
