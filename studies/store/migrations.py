"""Upgrades from an older schema version, in order: MIGRATIONS[v] takes a store at v to v + 1.

Each runs inside the store's schema transaction (studies/store/db.py, `Store._schema_step`), under
the write lock, and is idempotent: it looks at what the database has before it changes it, so a
store half-upgraded by an older unlearn-lab, or two processes upgrading at once, end the same.
"""
from __future__ import annotations

from typing import Any, Callable

from sqlmodel import Session


def _v1_to_v2(session: Session) -> None:
    """v2: forget sets remember the CSV/Parquet column they were read with."""
    from sqlalchemy import inspect, text

    if "column" not in {c["name"] for c in inspect(session.connection()).get_columns("ul_forgetset")}:
        session.exec(text('ALTER TABLE ul_forgetset ADD COLUMN "column" VARCHAR'))


def _v2_to_v3(session: Session) -> None:
    """v3: question–answer documents keep their prompt; a forget set keeps how it was made (meta).
    Existing rows are plain text (prompt NULL) with no meta, which is what they were."""
    from sqlalchemy import inspect, text

    have = {t: {c["name"] for c in inspect(session.connection()).get_columns(t)} for t in ("ul_document", "ul_forgetset")}
    if "prompt" not in have["ul_document"]:
        session.exec(text("ALTER TABLE ul_document ADD COLUMN prompt TEXT"))
    if "meta" not in have["ul_forgetset"]:
        session.exec(text("ALTER TABLE ul_forgetset ADD COLUMN meta JSON"))


def _v3_to_v4(session: Session) -> None:
    """v4: an event may name the process that wrote it (pid, host). Before, an "attacks started"
    event named it only in its message ("... started by pid N on HOST"); it is read from there this
    once, so a job whose pool died before the upgrade is still seen gone and started again."""
    import re

    from sqlalchemy import inspect, text

    have = {c["name"] for c in inspect(session.connection()).get_columns("ul_event")}
    for column, kind in (("pid", "INTEGER"), ("host", "VARCHAR")):
        if column not in have:
            session.exec(text(f"ALTER TABLE ul_event ADD COLUMN {column} {kind}"))
    started = session.exec(text("SELECT id, message FROM ul_event WHERE kind = 'attacks started'")).all()
    for event_id, message in started:
        m = re.search(r"pid (\d+) on (\S+)", message or "")
        if m:
            session.exec(text("UPDATE ul_event SET pid = :pid, host = :host WHERE id = :id"),
                         params={"pid": int(m.group(1)), "host": m.group(2), "id": event_id})


def _v4_to_v5(session: Session) -> None:
    """v5: a run has a seed (a study may run each cell under several), and a study's runs are unique
    on (method, lr, seed). Existing runs get their study's seed. A server database swaps the
    constraint; SQLite makes the table again (`_rebuild_run_table_sqlite`)."""
    import json

    from sqlalchemy import inspect, text

    conn = session.connection()
    if conn.dialect.name == "sqlite":
        return _rebuild_run_table_sqlite(session)
    if "seed" not in {c["name"] for c in inspect(conn).get_columns("ul_run")}:
        session.exec(text("ALTER TABLE ul_run ADD COLUMN seed INTEGER NOT NULL DEFAULT 0"))
    for study_id, spec in session.exec(text("SELECT id, spec FROM ul_study")).all():
        spec = json.loads(spec) if isinstance(spec, str) else (spec or {})
        seed = int((spec.get("run") or spec).get("seed", 0) or 0)
        session.exec(text("UPDATE ul_run SET seed = :seed WHERE study_id = :id"), params={"seed": seed, "id": study_id})
    unique = {tuple(sorted(uc["column_names"])): uc["name"] for uc in inspect(conn).get_unique_constraints("ul_run")}
    if ("lr", "method", "study_id") in unique:
        session.exec(text(f'ALTER TABLE ul_run DROP CONSTRAINT "{unique[("lr", "method", "study_id")]}"'))
    if ("lr", "method", "seed", "study_id") not in unique:
        session.exec(text("ALTER TABLE ul_run ADD CONSTRAINT ul_run_study_method_lr_seed UNIQUE (study_id, method, lr, seed)"))


def _rebuild_run_table_sqlite(session: Session) -> None:
    """SQLite cannot change a table's unique constraint: ul_run is made again with today's definition
    and its rows copied (ids kept, so every cell still points at its run; each run's seed read from
    its study's spec). The migration's connection has foreign keys off, as SQLite's procedure for
    such a change requires (the store checks them before it commits)."""
    from sqlalchemy import text
    from sqlalchemy.schema import CreateIndex, CreateTable

    from studies.store.db import Run

    dialect = session.connection().dialect
    table = Run.__table__
    old = ", ".join(f'"{c.name}"' for c in table.columns if c.name != "seed")
    seed = ("COALESCE((SELECT COALESCE(json_extract(s.spec, '$.run.seed'), json_extract(s.spec, '$.seed'))"
            " FROM ul_study s WHERE s.id = ul_run.study_id), 0)")
    session.exec(text(str(CreateTable(table).compile(dialect=dialect)).replace("TABLE ul_run ", "TABLE ul_run_v5 ", 1)))
    session.exec(text(f"INSERT INTO ul_run_v5 ({old}, seed) SELECT {old}, {seed} FROM ul_run"))
    session.exec(text("DROP TABLE ul_run"))
    session.exec(text("ALTER TABLE ul_run_v5 RENAME TO ul_run"))
    for index in table.indexes:
        session.exec(text(str(CreateIndex(index).compile(dialect=dialect))))


# Our tables (Optuna's own are Optuna's business).
OUR_TABLES = ("ul_forgetset", "ul_document", "ul_study", "ul_run", "ul_milestone", "ul_event")


def _v5_to_v6(session: Session) -> None:
    """v6: heartbeats are written and aged on the database's clock (Store.now), and a study's
    best-cell attack job beats too (ul_study.attack_heartbeat), so a job whose node died is started
    again. On PostgreSQL, a store made by a sqlmodel older than 0.0.45 has `timestamp without time
    zone` columns: a time read back from one is off by the server's offset from UTC. They become
    `timestamptz`, each value read in the session's TimeZone, which is the zone its writer's
    session had (the server's, as no unlearn-lab ever set its own)."""
    from sqlalchemy import inspect, text

    conn = session.connection()
    if "attack_heartbeat" not in {c["name"] for c in inspect(conn).get_columns("ul_study")}:
        kind = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
        session.exec(text(f"ALTER TABLE ul_study ADD COLUMN attack_heartbeat {kind}"))
    if conn.dialect.name != "postgresql":
        return  # SQLite keeps a datetime as text in UTC: nothing to convert
    naive = session.exec(text(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND data_type = 'timestamp without time zone' AND table_name = ANY(:tables) ORDER BY table_name, column_name"),
        params={"tables": list(OUR_TABLES)}).all()
    for table, column in naive:
        session.exec(text(f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE TIMESTAMP WITH TIME ZONE'))


def _v6_to_v7(session: Session) -> None:
    """v7: a run claimed by a SLURM array task names it (ul_run.slurm_job, ARRAYJOB_INDEX), shown
    beside its node by `study status` and the app."""
    from sqlalchemy import inspect, text

    if "slurm_job" not in {c["name"] for c in inspect(session.connection()).get_columns("ul_run")}:
        session.exec(text("ALTER TABLE ul_run ADD COLUMN slurm_job VARCHAR"))


MIGRATIONS: dict[int, Callable[[Any], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5, 5: _v5_to_v6,
                                                6: _v6_to_v7}
