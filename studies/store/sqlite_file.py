"""What a store URL names, checked without SQLAlchemy: the SQLite file behind a sqlite:/// URL,
whether it can be opened as a store, and the URL as messages may show it.

Kept apart from `studies.store.db` so the fast read path (`studies.reading.listing`) can use it without
importing the ORM, which costs half a second of a short command's life."""
from __future__ import annotations

import os
import re
from pathlib import Path

from engine.errors import UnlearnError

SCHEMA_VERSION = 5
SQLITE_BUSY_MS = 60_000  # how long a connection waits for a writer's lock before it fails


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for memory or other databases)."""
    if not is_sqlite(url):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    path = path.split("?", 1)[0]
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


def describe_url(url: str) -> str:
    """The URL as messages, logs and exports show it: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparseable: hide whatever sits between ':' and '@' after the scheme
        return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


class StoreMissing(UnlearnError):
    """A command that only reads found no store at the SQLite path it was given."""


NOT_A_DATABASE = "file is not a database"  # SQLite's own message for a file whose header is not its own


def check_sqlite_file(url: str, create: bool) -> None:
    """Refuse, before SQLite touches anything, what would otherwise fail half-way or write where it
    should not: a missing folder, a missing file when nothing may be created, a file that is not an
    SQLite database, a read-only file or folder (a store is written even to be read: WAL)."""
    path = sqlite_path(url)
    if path is None:
        return
    if not path.parent.is_dir():
        raise UnlearnError(f"store folder does not exist: {path.parent}")
    if not path.exists():
        if not create:
            raise StoreMissing(f"no store at {path} (give --storage or set UNLEARN_STORAGE_URL)")
        if not os.access(path.parent, os.W_OK):
            raise UnlearnError(f"cannot create store {path}: its folder is read-only")
        return
    if not path.is_file():
        raise UnlearnError(f"store {path} is not a file")
    # The header is not read here: opening and closing the file in a process that already has SQLite
    # connections to it drops that process's POSIX locks on it (close() releases every lock the process
    # holds on the inode), among them WAL mode's "a connection is still open" lock; another process
    # closing its last connection then resets the WAL under this one's feet, and the store reads back
    # "database disk image is malformed". SQLite checks the header itself (Store: NOT_A_DATABASE).
    if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:  # (root ignores a 0444 mode; we do not)
        raise UnlearnError(f"store {path} is read-only; unlearn-lab writes to its store (WAL, heartbeats): "
                           f"copy it somewhere writable to read it")
    if not os.access(path.parent, os.W_OK):
        raise UnlearnError(f"store {path} is in a read-only folder; SQLite needs to write its -wal and -shm files there")
