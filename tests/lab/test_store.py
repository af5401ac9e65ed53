"""studies.store.db and studies.store.forgetsets on real SQLite files: the schema and its version, whole
transactions (an error or a killed process mid-write leaves nothing), forget sets that are
atomic, uniquely named and checked against their hash, and Optuna's tables beside ours."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import optuna
import pytest
from sqlalchemy import inspect
from sqlmodel import func, select

from engine.data import load_forget_set
from engine.errors import UnlearnError
from studies.lifecycle.study import create_study
from studies.store.db import MIGRATIONS, SCHEMA_VERSION, Document, Event, ForgetSet, Meta, Run, Store, Study
from studies.store.forgetsets import create_forget_set, forget_set_texts, list_forget_sets
from tests.studies_helpers import HUB_MODEL, make_forget_set

UL_TABLES = {"ul_meta", "ul_forgetset", "ul_document", "ul_study", "ul_run", "ul_milestone", "ul_event"}


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'lab.db'}"


def raw(url: str) -> sqlite3.Connection:
    """A plain sqlite3 connection beside the store: what another process would see."""
    return sqlite3.connect(url.split("///", 1)[1])


def set_version(url: str, value: str) -> None:
    with raw(url) as c:
        c.execute("UPDATE ul_meta SET value = ? WHERE key = 'schema_version'", (value,))


def count(store: Store, table) -> int:
    with store.read() as s:
        return s.exec(select(func.count()).select_from(table)).one()


# ------------------------------------------------------------------ schema and version

def test_new_store_creates_its_tables_with_the_schema_version(url, tmp_path):
    store = Store(url)
    assert UL_TABLES <= set(inspect(store.engine).get_table_names())
    with store.read() as s:
        assert s.get(Meta, "schema_version").value == str(SCHEMA_VERSION)
    with raw(url) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Store(url)  # opening it again changes nothing
    with raw(url) as c:
        assert c.execute("SELECT value FROM ul_meta WHERE key='schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]


def test_a_store_from_a_newer_unlearn_lab_is_refused(url):
    Store(url)
    set_version(url, str(SCHEMA_VERSION + 1))
    with pytest.raises(UnlearnError) as e:
        Store(url)
    msg = str(e.value)
    assert f"v{SCHEMA_VERSION + 1}" in msg and f"v{SCHEMA_VERSION}" in msg and "newer" in msg
    with raw(url) as c:  # refused, not touched
        assert c.execute("SELECT value FROM ul_meta").fetchall() == [(str(SCHEMA_VERSION + 1),)]


def test_an_older_store_without_a_migration_is_refused(url):
    old = next(v for v in range(SCHEMA_VERSION - 1, -2, -1) if v not in MIGRATIONS)
    Store(url)
    set_version(url, str(old))
    with pytest.raises(UnlearnError, match=rf"schema v{old}\b.*no migration to v{old + 1}"):
        Store(url)
    with raw(url) as c:
        assert c.execute("SELECT value FROM ul_meta").fetchall() == [(str(old),)]


def test_an_older_store_is_migrated_in_one_transaction(url, monkeypatch):
    """A registered migration runs once and bumps the version; one that fails leaves the store
    at its old version with nothing of the migration written."""
    old = SCHEMA_VERSION - 1
    Store(url)
    set_version(url, str(old))

    def broken(s):
        s.add(Event(kind="migration", message="half"))
        s.flush()
        raise RuntimeError("migration bug")

    monkeypatch.setitem(MIGRATIONS, old, broken)
    with pytest.raises(RuntimeError, match="migration bug"):
        Store(url)
    with raw(url) as c:
        assert c.execute("SELECT value FROM ul_meta").fetchall() == [(str(old),)]
        assert c.execute("SELECT count(*) FROM ul_event").fetchone() == (0,)

    monkeypatch.setitem(MIGRATIONS, old, lambda s: s.add(Event(kind="migration", message=f"v{old} -> v{old + 1}")))
    store = Store(url)
    with store.read() as s:
        assert s.get(Meta, "schema_version").value == str(SCHEMA_VERSION)
        assert [e.message for e in s.exec(select(Event)).all()] == [f"v{old} -> v{old + 1}"]


def test_our_tables_holding_data_without_a_schema_version_are_refused(url, forget_set_files):
    make_forget_set(Store(url), "records", forget_set_files)
    with raw(url) as c:
        c.execute("DROP TABLE ul_meta")
    with pytest.raises(UnlearnError, match="no schema version"):
        Store(url)
    with raw(url) as c:  # not "repaired" behind the user's back
        assert "ul_meta" not in {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # tables with nothing in them are a store begun and never finished: made whole
    with raw(url) as c:
        c.execute("DELETE FROM ul_document")
        c.execute("DELETE FROM ul_forgetset")
    Store(url)


def test_a_store_in_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UnlearnError, match="does not exist"):
        Store(f"sqlite:///{tmp_path / 'nope' / 'lab.db'}")


# ------------------------------------------------------------------ transactions

def test_a_failing_write_leaves_nothing(url):
    store = Store(url)
    with pytest.raises(ZeroDivisionError):
        with store.write() as s:
            s.add(Event(kind="note", message="first"))
            s.flush()  # the row is in the database, inside the transaction
            assert s.exec(select(func.count()).select_from(Event)).one() == 1
            raise ZeroDivisionError  # any error inside the block
    assert count(store, Event) == 0
    with raw(url) as c:
        assert c.execute("SELECT count(*) FROM ul_event").fetchone() == (0,)
    with store.write() as s:  # the lock was released: the next write goes through
        s.add(Event(kind="note", message="second"))
    assert count(store, Event) == 1


def test_a_process_killed_mid_write_leaves_nothing_and_no_lock(url):
    """A real crash: the writer SIGKILLs itself with rows flushed in an open transaction."""
    Store(url)
    code = textwrap.dedent(f"""
        import os, signal
        from studies.store.db import Event, Store
        store = Store({url!r})
        with store.write() as s:
            for i in range(50):
                s.add(Event(kind="note", message=f"half {{i}}"))
            s.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    store = Store(url)
    assert count(store, Event) == 0
    with store.write() as s:  # nobody holds the write lock
        s.add(Event(kind="note", message="after"))
    assert count(store, Event) == 1


# ------------------------------------------------------------------ forget sets

def test_forget_set_keeps_the_texts_and_their_hash(url, forget_set_files):
    store = Store(url)
    fs = make_forget_set(store, "records", forget_set_files)
    f = forget_set_files
    expected = load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], [f["general"]])
    assert fs.hash == expected.hash
    assert fs.counts == expected.counts()
    texts = forget_set_texts(store, store.forget_set("records"))
    assert texts.hash == fs.hash
    assert texts.forget == expected.forget and texts.general == expected.general
    assert count(store, Document) == sum(expected.counts().values())
    assert [x.name for x in list_forget_sets(store)] == ["records"]


def test_forget_set_create_is_atomic(url, forget_set_files, tmp_path):
    """A bad source (here the third one read) leaves no forget set and no documents behind."""
    store = Store(url)
    f = forget_set_files
    with pytest.raises(UnlearnError, match="unseen"):
        create_forget_set(store, "broken", [f["forget"]], [f["retain"]], [str(tmp_path / "missing.jsonl")], [f["general"]])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UnlearnError, match="general"):
        create_forget_set(store, "broken", [f["forget"]], [f["retain"]], [f["unseen"]], [str(empty)])
    with pytest.raises(UnlearnError, match="tokenizer"):
        create_forget_set(store, "broken", [f["forget"]], [f["retain"]], [f["unseen"]],
                          tokenizer=str(tmp_path / "no-such-tokenizer"))
    assert count(store, ForgetSet) == 0
    assert count(store, Document) == 0
    make_forget_set(store, "broken", f)  # the name is still free


def test_forget_set_names_are_unique_and_checked(url, forget_set_files):
    store = Store(url)
    make_forget_set(store, "records", forget_set_files)
    n_docs = count(store, Document)
    with pytest.raises(UnlearnError, match="already exists"):
        make_forget_set(store, "records", forget_set_files, general=False)
    for bad in ("", "has space", "../up", "-dash", "x" * 200):
        with pytest.raises(UnlearnError, match="name"):
            make_forget_set(store, bad, forget_set_files)
    assert count(store, ForgetSet) == 1 and count(store, Document) == n_docs
    with raw(url) as c:  # the database itself refuses a second row of that name
        with pytest.raises(sqlite3.IntegrityError):
            c.execute("INSERT INTO ul_forgetset (name, hash, sources, text_field, seq_len, counts, created_at) "
                      "SELECT name, hash, sources, text_field, seq_len, counts, created_at FROM ul_forgetset")


@pytest.mark.parametrize("damage", ["edit", "delete", "move"])
def test_tampered_texts_are_refused(url, forget_set_files, damage):
    store = Store(url)
    make_forget_set(store, "records", forget_set_files)
    with raw(url) as c:
        doc_id = c.execute("SELECT id FROM ul_document WHERE role='forget' ORDER BY position LIMIT 1").fetchone()[0]
        if damage == "edit":
            c.execute("UPDATE ul_document SET text = replace(text, 'a', 'o') WHERE id = ?", (doc_id,))
        elif damage == "delete":
            c.execute("DELETE FROM ul_document WHERE id = ?", (doc_id,))
        else:  # the same text, now claimed to be retain data
            c.execute("UPDATE ul_document SET role = 'retain', position = 10000 WHERE id = ?", (doc_id,))
    with pytest.raises(UnlearnError, match="do not match its hash"):
        forget_set_texts(store, store.forget_set("records"))


# ------------------------------------------------------------------ Optuna beside us

def test_optuna_reads_our_studies_and_the_tables_coexist(url, forget_set_files):
    store = Store(url)
    make_forget_set(store, "records", forget_set_files)
    create_study(store, "grid", HUB_MODEL, "records", methods=["ga", "ga_gd"], lrs=[1e-4, 1e-3], steps=[5, 10])

    ostudy = optuna.load_study(study_name="grid", storage=url)  # stock Optuna, nothing of ours
    assert ostudy.direction == optuna.study.StudyDirection.MINIMIZE
    assert ostudy.user_attrs["unlearn_lab"]["forget_set_hash"] == store.forget_set("records").hash
    assert ostudy.trials == []
    dists = {"method": optuna.distributions.CategoricalDistribution(["ga", "ga_gd"]),
             "lr": optuna.distributions.CategoricalDistribution([1e-4, 1e-3]),
             "steps": optuna.distributions.CategoricalDistribution([5, 10])}
    ostudy.add_trial(optuna.trial.create_trial(params={"method": "ga", "lr": 1e-4, "steps": 5}, distributions=dists, value=0.5))
    assert optuna.get_all_study_names(url) == ["grid"]

    tables = set(inspect(store.engine).get_table_names())
    assert UL_TABLES <= tables and {"studies", "trials", "trial_params", "alembic_version"} <= tables
    again = Store(url)  # our schema check is not upset by Optuna's tables
    assert again.study("grid").state == "created"
    with again.read() as s:
        assert len(s.exec(select(Run)).all()) == 4
    assert len(optuna.load_study(study_name="grid", storage=url).trials) == 1


def test_our_tables_join_a_database_optuna_made_first(url, forget_set_files):
    optuna.create_study(study_name="theirs", storage=url)
    store = Store(url)
    make_forget_set(store, "records", forget_set_files)
    create_study(store, "ours", HUB_MODEL, "records", methods=["ga"], lrs=[1e-3], steps=[2])
    assert sorted(optuna.get_all_study_names(url)) == ["ours", "theirs"]
    with pytest.raises(UnlearnError, match="Optuna study named 'theirs'"):
        create_study(store, "theirs", HUB_MODEL, "records", methods=["ga"], lrs=[1e-3], steps=[2])


def test_an_invalid_study_writes_nothing(url, forget_set_files):
    store = Store(url)
    make_forget_set(store, "records", forget_set_files, general=False)
    for kw, msg in [(dict(methods=["ga", "nope"], lrs=[1e-3], steps=[2]), "unknown method"),
                    (dict(methods=["ga_gd_general"], lrs=[1e-3], steps=[2]), "general set"),
                    (dict(methods=["ga"], lrs=[-1e-3], steps=[2]), "--lr"),
                    (dict(methods=["ga"], lrs=[1e-3], steps=[0]), "--steps"),
                    (dict(methods=["ga"], sampler="tpe", lr_range=(1e-3, 1e-4), trials=2, steps=[2]), "--lr-range")]:
        with pytest.raises(UnlearnError, match=msg):
            create_study(store, "s", HUB_MODEL, "records", **kw)
    assert count(store, Study) == 0 and count(store, Run) == 0
    assert optuna.get_all_study_names(url) == []


def test_a_v1_store_is_upgraded_in_place_and_keeps_its_forget_sets(url, tmp_path):
    """The real v1 → v2 migration: a v1 store (no ul_forgetset.column) opens, gains the column,
    reports v2, and its forget set still reads back through the hash check."""
    import sqlite3

    from studies.store.forgetsets import create_forget_set, forget_set_texts

    src = tmp_path / "src"
    src.mkdir()
    for role in ("forget", "retain", "retain_eval", "unseen"):
        (src / f"{role}.txt").write_text(f"the {role} document, long enough to be a document " * 3)
    store = Store(url)
    create_forget_set(store, "fs", [str(src / "forget.txt")], [str(src / "retain.txt")], [str(src / "unseen.txt")],
                      retain_eval=[str(src / "retain_eval.txt")])
    path = url.split("///", 1)[1]
    with sqlite3.connect(path) as c:  # make it exactly a v1 store
        c.execute('ALTER TABLE ul_forgetset DROP COLUMN "column"')
        c.execute("UPDATE ul_meta SET value = '1' WHERE key = 'schema_version'")
    upgraded = Store(url)
    with sqlite3.connect(path) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(ul_forgetset)")]
        assert "column" in cols
        assert c.execute("SELECT value FROM ul_meta").fetchone() == (str(SCHEMA_VERSION),)  # v1 -> v2 -> ... now
    fs = upgraded.forget_set("fs")
    assert fs.column is None
    assert forget_set_texts(upgraded, fs).counts() == {"forget": 1, "retain": 1, "retain_eval": 1, "unseen": 1,
                                                       "general": 0}


# ------------------------------------------------------------------ stores that cannot be opened

def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("content", [b"these are my notes, not a database\n" * 50, b"\x00" * 4096])
def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path, content):
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(UnlearnError, match="is not an SQLite database") as e:
        Store(f"sqlite:///{path}")
    assert "\n" not in str(e.value)
    assert path.read_bytes() == content and siblings(path) == ["notes.db"]  # no -wal, no -shm, nothing written


def test_a_read_only_store_is_refused_untouched(url, tmp_path):
    store = Store(url)
    store.log("note", "before")
    path = tmp_path / "lab.db"
    del store
    before = path.read_bytes()
    path.chmod(0o444)
    try:
        with pytest.raises(UnlearnError, match="read-only"):
            Store(url)
        assert path.read_bytes() == before
    finally:
        path.chmod(0o644)


def test_a_missing_store_is_not_created_by_a_reader(tmp_path):
    from studies.store.db import StoreMissing

    path = tmp_path / "nothing-here.db"
    with pytest.raises(StoreMissing, match="no store at"):
        Store(f"sqlite:///{path}", create=False)
    assert not path.exists() and siblings(path) == []
    Store(f"sqlite:///{path}")  # a writer that may create one does
    assert path.exists()


def test_an_unreachable_server_is_one_line_without_its_password():
    with pytest.raises(UnlearnError) as e:
        Store("postgresql+psycopg2://lab:hunter2-secret@127.0.0.1:1/unlearn")
    msg = str(e.value)
    assert "hunter2-secret" not in msg and "lab:***@127.0.0.1:1/unlearn" in msg and "\n" not in msg, msg


def test_urls_in_messages_hide_their_password():
    from studies.store.db import describe_url

    assert describe_url("postgresql+psycopg2://lab:p%40ss@db:5432/u") == "postgresql+psycopg2://lab:***@db:5432/u"
    assert describe_url("sqlite:////tmp/u.db") == "sqlite:////tmp/u.db"
    assert "pw" not in describe_url("not a url://x:pw@y")
