"""The store: the project's own tables (sqlmodel) in the same database as Optuna's RDB tables.

Why one database: `optuna.load_study` and `optuna-dashboard` read every study as it is, while
our tables keep what Optuna has no place for (forget-set texts, runs, heartbeats, events).
Every write is one transaction; on SQLite writers take the lock up front (BEGIN IMMEDIATE) so
concurrent workers wait in the busy timeout instead of failing with "database is locked".
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import time
from typing import Any, Callable, Iterator, Optional

from sqlalchemy import JSON, Column, Text, UniqueConstraint, event
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from engine.errors import UnlearnError
from studies.store.clock import utcnow  # noqa: F401 - re-exported
from studies.store.migrations import MIGRATIONS  # noqa: F401 - the tests reach it here
from studies.store.sqlite_file import (  # noqa: F401 - SCHEMA_VERSION, StoreMissing, describe_url, sqlite_path re-exported
    NOT_A_DATABASE,
    SCHEMA_VERSION,
    SQLITE_BUSY_MS,
    StoreMissing,
    check_sqlite_file,
    check_url_shape,
    describe_url,
    is_sqlite,
    scrub,
    sqlite_path,
)
from studies.store.states import RunState, StudyState

CONNECT_TIMEOUT_S = 10


class Meta(SQLModel, table=True):
    __tablename__ = "ul_meta"
    key: str = Field(primary_key=True)
    value: str


class ForgetSet(SQLModel, table=True):
    __tablename__ = "ul_forgetset"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    hash: str = Field(index=True)
    sources: dict = Field(default_factory=dict, sa_column=Column(JSON))  # role -> [source spec]
    text_field: str = "text"
    column: Optional[str] = None  # of .csv/.parquet sources, when not text_field
    seq_len: int = 512
    tokenizer: Optional[str] = None
    counts: dict = Field(default_factory=dict, sa_column=Column(JSON))  # role -> documents
    chunks: Optional[dict] = Field(default=None, sa_column=Column(JSON))  # role -> chunks (with --tokenizer)
    created_at: dt.datetime = Field(default_factory=utcnow)
    # v3: how the set was made beyond its sources: {"qa": {"prompt_field", "answer_field"}} for a
    # question–answer set, {"preset": ..., "split": ..., "extras": {name: rows}} for a benchmark's
    meta: Optional[dict] = Field(default=None, sa_column=Column(JSON))


class Document(SQLModel, table=True):
    """The texts themselves, so a forget set stays immutable when its files change and a worker
    on another node needs no shared file system."""

    __tablename__ = "ul_document"
    id: Optional[int] = Field(default=None, primary_key=True)
    forgetset_id: int = Field(foreign_key="ul_forgetset.id", index=True)
    role: str  # a ROLES name, or "extra:NAME" for a benchmark's evaluation rows (JSON in text, not chunked)
    position: int
    text: str = Field(sa_column=Column(Text))  # a question–answer document's answer
    prompt: Optional[str] = Field(default=None, sa_column=Column(Text))  # v3: its prompt (None: plain text)


class Study(SQLModel, table=True):
    __tablename__ = "ul_study"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    model: str
    forgetset_id: int = Field(foreign_key="ul_forgetset.id")
    spec: dict = Field(default_factory=dict, sa_column=Column(JSON))
    state: str = StudyState.CREATED  # a studies.store.states.StudyState value
    scheduler_pid: Optional[int] = None
    scheduler_host: Optional[str] = None
    scheduler_heartbeat: Optional[dt.datetime] = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)
    # v6: the best-cell attack job's last beat (studies/running/attack.py), on the database's clock
    attack_heartbeat: Optional[dt.datetime] = None


class Run(SQLModel, table=True):
    """One method at one learning rate under one seed: covers every steps milestone of the study
    (prefix sharing). A study with --seeds has one run per (method, lr, seed)."""

    __tablename__ = "ul_run"
    __table_args__ = (UniqueConstraint("study_id", "method", "lr", "seed"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="ul_study.id", index=True)
    method: str
    lr: float
    seed: int = 0  # v5: the run's seed (the study's --seed, or one of its --seeds)
    state: str = Field(default=RunState.PENDING, index=True)  # a studies.store.states.RunState value
    device: Optional[str] = None
    host: Optional[str] = None
    pid: Optional[int] = None  # the run's own subprocess
    slurm_job: Optional[str] = None  # v7: the SLURM array task that claimed it, ARRAYJOB_INDEX (else None)
    heartbeat: Optional[dt.datetime] = None
    step: int = 0
    attempts: int = 0
    last_error: Optional[str] = Field(default=None, sa_column=Column(Text))
    result: Optional[dict] = Field(default=None, sa_column=Column(JSON))  # cost, baseline, losses
    asked_trial: Optional[int] = None  # Optuna trial number a sampler asked for this run (TPE)
    asked_steps: Optional[int] = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    started_at: Optional[dt.datetime] = None
    finished_at: Optional[dt.datetime] = None


class CellRow(SQLModel, table=True):
    """One cell: a run's metrics at one milestone, recorded in one Optuna trial (`trial_number`).
    The table keeps its old name, `ul_milestone` (existing stores read it)."""

    __tablename__ = "ul_milestone"
    __table_args__ = (UniqueConstraint("run_id", "step"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="ul_run.id", index=True)
    step: int
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON))
    score: Optional[float] = None
    success: bool = False
    diverged: bool = False
    trial_number: Optional[int] = None
    created_at: dt.datetime = Field(default_factory=utcnow)


class Event(SQLModel, table=True):
    __tablename__ = "ul_event"
    id: Optional[int] = Field(default=None, primary_key=True)
    study_id: Optional[int] = Field(default=None, index=True)
    run_id: Optional[int] = None
    at: dt.datetime = Field(default_factory=utcnow)
    kind: str
    message: str = Field(sa_column=Column(Text))
    # v4: the process that wrote it, where that matters (the best-cell attack job's "attacks started":
    # a pool on the same host checks whether that process still runs)
    pid: Optional[int] = None
    host: Optional[str] = None


def _make_engine(url: str, immediate: bool, foreign_keys: bool = True):
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own is broken for this)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # pre-ping: a connection PostgreSQL dropped (a restart, hours idle during a long run) is replaced
    # before use; recycle: none is kept past half an hour, under most servers' idle limits
    kwargs = {"pool_pre_ping": True, "pool_recycle": 1800, **BOUNDED_POOL}
    if url.startswith("postgres"):  # an unreachable server answers in seconds, not the OS's minutes
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": application_name()}
    return create_engine(url, **kwargs)


# A server's connections are few (PostgreSQL's default max_connections is 100) and a study on a
# cluster is hundreds of processes (a pool per SLURM task, a process per run): each process keeps
# one connection and opens at most two more while a write nests in a read; Optuna's engine keeps
# none (studies/store/db.py, Store.optuna). docs/cluster.md has the figure bench/pg_connections.py
# measures.
BOUNDED_POOL = {"pool_size": 1, "max_overflow": 2}


def application_name() -> str:
    """How our connections show in pg_stat_activity: the process that holds each (a DBA's question)."""
    return f"unlearn-lab pid {os.getpid()}"


class Store:
    """Sessions on our tables plus an Optuna RDBStorage on the same URL.

    `create=False` (every command but `forgetset create`) refuses to make a new SQLite file."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        self.safe_url = describe_url(url)  # the only form of the URL any message may show
        from sqlalchemy.engine import make_url

        try:
            make_url(url)
        except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number, say
            raise UnlearnError(f"not a database URL: {self.safe_url} ({scrub(first_line(exc), url)})") from None
        try:
            check_url_shape(url)
            if is_sqlite(url):
                check_sqlite_file(url, create)
            self.engine = _make_engine(url, immediate=False)
            self.write_engine = _make_engine(url, immediate=True) if is_sqlite(url) else self.engine
            self._ensure_schema_retried()
        except UnlearnError as exc:
            raise type(exc)(str(exc).replace(url, self.safe_url)) from None
        except DBAPIError as exc:  # unreachable server, bad credentials, not a database, locked, ...
            if is_sqlite(url) and NOT_A_DATABASE in str(exc.orig):
                raise UnlearnError(f"store {sqlite_path(url)} is not an SQLite database") from None
            raise UnlearnError(f"cannot open store {self.safe_url}: {scrub(first_line(exc.orig), url)}") from None
        except (ModuleNotFoundError, NoSuchModuleError) as exc:
            raise UnlearnError(f"cannot open store {self.safe_url}: missing database driver "
                               f"({getattr(exc, 'name', None) or first_line(exc)})") from None
        except ArgumentError as exc:
            raise UnlearnError(f"not a database URL: {self.safe_url} ({scrub(first_line(exc), url)})") from None
        self._optuna = None

    # ------------------------------------------------------------------ schema
    def _ensure_schema_retried(self, attempts: int = 20) -> None:
        """_ensure_schema, tried again while another process makes or upgrades the store this very
        moment: SQLite answers "database is locked" at once, without waiting, to a connection that
        would otherwise deadlock (switching a fresh file to WAL, a stale read snapshot)."""
        for i in range(attempts):
            try:
                return self._ensure_schema()
            except OperationalError as exc:
                if i == attempts - 1 or not _is_transient(exc):
                    raise
                time.sleep(min(1.0, 0.05 * 2**i) * (0.5 + random.random()))

    def _ensure_schema(self) -> None:
        """Make a fresh store, or bring an older one to SCHEMA_VERSION. The common case (a current
        store) is two reads. Creating and upgrading happen under the write lock (SQLite's IMMEDIATE
        transaction, an advisory lock on PostgreSQL), one step per transaction, with the store's state
        read again inside each: a fresh store's tables and its version row are one transaction, and
        two processes opening an old store at once upgrade it once."""
        from sqlalchemy import inspect

        if "ul_meta" in set(inspect(self.engine).get_table_names()):
            with self.read() as s:
                row = s.get(Meta, "schema_version")
            if row is not None and int(row.value) == SCHEMA_VERSION:
                SQLModel.metadata.create_all(self.write_engine)  # tables new in this version
                return
        while not self._schema_step():
            pass
        SQLModel.metadata.create_all(self.write_engine)

    def _schema_step(self) -> bool:
        """One transaction towards the current schema; True once the store is there."""
        from sqlalchemy import inspect, text

        with self._migration() as s:
            conn = s.connection()
            if conn.dialect.name == "postgresql":  # what SQLite's IMMEDIATE transaction gives, for a store with no table yet
                s.exec(text("SELECT pg_advisory_xact_lock(8323311)"))
            tables = set(inspect(conn).get_table_names())
            ours = tables & {"ul_study", "ul_run", "ul_forgetset"}
            row = s.get(Meta, "schema_version") if "ul_meta" in tables else None
            if row is None:
                # No version: a fresh database, or a store an older unlearn-lab began and never finished
                # (tables made, version row not yet written): made whole, unless it holds data already.
                if ours and any(s.exec(text(f"SELECT 1 FROM {t} LIMIT 1")).first() for t in ("ul_forgetset", "ul_study")
                                if t in tables):
                    raise UnlearnError(f"store {self.safe_url} has unlearn-lab tables but no schema version; refusing to touch it")
                SQLModel.metadata.create_all(conn)
                s.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return True
            version = int(row.value)
            if version > SCHEMA_VERSION:
                raise UnlearnError(f"store {self.safe_url} has schema v{version}, newer than this unlearn-lab (v{SCHEMA_VERSION}); upgrade unlearn-lab")
            if version == SCHEMA_VERSION:
                return True
            if version not in MIGRATIONS:
                raise UnlearnError(f"store {self.safe_url} has schema v{version} and no migration to v{version + 1}; export it with an older unlearn-lab")
            MIGRATIONS[version](s)
            s.merge(Meta(key="schema_version", value=str(version + 1)))
            return version + 1 == SCHEMA_VERSION

    @contextlib.contextmanager
    def _migration(self) -> Iterator[Session]:
        """One migration's transaction. On SQLite its connection has foreign keys off, which SQLite
        allows only outside a transaction and its procedure for changing a table requires; they are
        checked before the commit, so a migration never leaves a cell without its run."""
        if not is_sqlite(self.url):
            with self.write() as s:
                yield s
            return
        engine = _make_engine(self.url, immediate=True, foreign_keys=False)
        try:
            with Session(engine, expire_on_commit=False) as s:
                try:
                    yield s
                    from sqlalchemy import text

                    if s.exec(text("PRAGMA foreign_key_check")).all():
                        raise UnlearnError(f"store {self.safe_url}: the upgrade would leave rows pointing at "
                                           "nothing; nothing was changed")
                    s.commit()
                except BaseException:
                    s.rollback()
                    raise
        finally:
            engine.dispose()

    # ------------------------------------------------------------------ sessions
    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed whole on exit, rolled back whole on error."""
        with Session(self.write_engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def retry(self, fn: Callable[[], Any], attempts: int = 30) -> Any:
        """Run fn, retrying on lock/serialization errors (Optuna's own sessions are not IMMEDIATE) and
        on a server that went away for a moment (about 40 s in all: a PostgreSQL restart)."""
        from optuna.exceptions import StorageInternalError

        for i in range(attempts):
            try:
                return fn()
            except (OperationalError, StorageInternalError, DBAPIError) as exc:
                if i == attempts - 1 or not _is_transient(exc, connection_lost=True):
                    raise
                time.sleep(min(2.0, 0.05 * 2**i) * (0.5 + random.random()))

    # ------------------------------------------------------------------ time
    def now(self, session: Session | None = None) -> dt.datetime:
        """The store's clock, in UTC: PostgreSQL's (`now()`), so heartbeats written on one node and
        aged on another agree whatever the nodes' own clocks say (skew, an NTP step, a suspend).
        SQLite has no server: its clock is this host's, as the file lives on one host."""
        if is_sqlite(self.url):
            return utcnow()
        from sqlalchemy import text

        if session is not None:
            return _utc(session.exec(text("SELECT now()")).one()[0])
        with self.read() as s:
            return _utc(s.exec(text("SELECT now()")).one()[0])

    # ------------------------------------------------------------------ optuna
    @property
    def optuna(self):
        """Optuna's RDBStorage on the same database (creates its tables on first use)."""
        if self._optuna is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            if is_sqlite(self.url):
                kwargs = {"connect_args": {"timeout": SQLITE_BUSY_MS / 1000}}
            else:  # a connection per call, none kept: a cell's few writes do not warrant a second idle connection
                from sqlalchemy.pool import NullPool

                kwargs = {"poolclass": NullPool}
                if self.url.startswith("postgres"):
                    kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": application_name()}
            self._optuna = self.retry(lambda: optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs))
        return self._optuna

    # ------------------------------------------------------------------ helpers
    def log(self, kind: str, message: str, study_id: int | None = None, run_id: int | None = None) -> None:
        with self.write() as s:
            s.add(Event(study_id=study_id, run_id=run_id, kind=kind, message=message))

    def study(self, name: str) -> Study:
        return self._by_name(Study, name, "study")

    def forget_set(self, name: str) -> ForgetSet:
        return self._by_name(ForgetSet, name, "forget set")

    def _by_name(self, table, name: str, what: str):
        with self.read() as s:
            row = s.exec(select(table).where(table.name == name)).first()
        if row is None:
            raise UnlearnError(f"no {what} named {name!r} in {self.safe_url}")
        return row


TRANSIENT = ("locked", "busy", "deadlock", "could not serialize", "serialization")
# A server going away for a moment (a PostgreSQL restart, a failover) while work is under way: worth
# trying again then, not when a store is first opened (a wrong host or port should fail at once).
CONNECTION_LOST = ("server closed the connection", "terminating connection", "connection refused",
                   "the database system is starting up", "the database system is shutting down",
                   "connection already closed", "could not connect", "ssl syscall error", "eof detected")


def _is_transient(exc: BaseException, connection_lost: bool = False) -> bool:
    """A lock wait or a serialization failure (with `connection_lost`, a server gone for a moment too),
    worth trying again. Optuna wraps SQLAlchemy's errors in its StorageInternalError, whose own text
    may say nothing of the cause: every exception in the chain (`__cause__`, `__context__`, a DBAPI
    error's `orig`) is read."""
    words = TRANSIENT + (CONNECTION_LOST if connection_lost else ())
    seen: set[int] = set()
    todo: list = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if any(k in str(e).lower() for k in words):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return False


def first_line(exc: BaseException) -> str:
    """An error's first line (its type's name when it has no text): what one-line messages show."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _utc(when: dt.datetime) -> dt.datetime:
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def hostname() -> str:
    """The name this node goes by in the store (UNLEARN_NODE, else its host name): pools check a
    process's pid only on their own node, so nodes that share a host name (containers) set it."""
    from studies.settings import lab_settings

    return lab_settings().node
