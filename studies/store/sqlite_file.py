"""What a store URL names, checked without SQLAlchemy: the SQLite file behind a sqlite:/// URL,
whether it can be opened as a store, and the URL as messages may show it.

Kept apart from `studies.store.db` so the fast read path (`studies.reading.listing`) can use it without
importing the ORM, which costs half a second of a short command's life."""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UnlearnError

SCHEMA_VERSION = 7
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
    """The URL as messages, logs, exports and process titles show it: any password replaced by ***.

    The credentials are what lies between the scheme and the *last* '@' before the path: a password
    may hold '/', spaces or an unencoded '@', and a parser that stops at the first of them leaves its
    tail in plain sight."""
    head, sep, rest = url.partition("://")
    if not sep:
        return url
    at = rest.rfind("@", 0, _path_start(rest))
    if at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{head}://{user}{':***' if colon else ''}@{rest[at + 1:]}" if colon else url


def _path_start(rest: str) -> int:
    """Where the path of a URL's remainder (after '://') starts: the first '/' after the last '@'
    (a password's '/' lies before it), or its end."""
    at = rest.rfind("@")
    slash = rest.find("/", at + 1)
    return slash if slash >= 0 else len(rest)


def scrub(text: str, url: str) -> str:
    """`text` (a driver's message, say) with the URL's password, and each part of it an unencoded '@'
    splits off, replaced by ***: a driver that read 'p@ss@host' as password 'p', host 'ss@host' names
    that host in its errors."""
    head, sep, rest = url.partition("://")
    at = rest.rfind("@", 0, _path_start(rest)) if sep else -1
    _, colon, password = rest[:at].partition(":") if at >= 0 else ("", "", "")
    if not colon or not password:
        return text
    for piece in sorted({password, *password.split("@")}, key=len, reverse=True):
        if len(piece) >= 3:
            text = text.replace(piece, "***")
    return text


def has_password(text: str) -> bool:
    """Whether a command-line word is a URL carrying a password (scheme://user:PASSWORD@...)."""
    return describe_url(text) != text and "://" in text


class StoreMissing(UnlearnError):
    """A command that only reads found no store at the SQLite path it was given."""


NOT_A_DATABASE = "file is not a database"  # SQLite's own message for a file whose header is not its own


def check_url_shape(url: str) -> None:
    """Refuse in one line the store URLs that cannot work: an in-memory SQLite store (each
    connection would see a database of its own, gone when the command ends) and SQLite URL options
    (`?mode=ro`: the store is written even to be read)."""
    if not is_sqlite(url):
        return
    if "?" in url:
        raise UnlearnError(f"SQLite store URLs take no options (?{url.split('?', 1)[1]}): unlearn-lab writes "
                           f"to its store even to read it (WAL); give sqlite:///path/to/lab.db")
    if sqlite_path(url) is None:
        raise UnlearnError("an in-memory SQLite store (sqlite:// or :memory:) is gone when the command ends: "
                           "give a file, e.g. sqlite:///path/to/lab.db")


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
        # A store holds the forget set's texts (often the private data being unlearned): readable by its
        # owner only. SQLite gives its -wal and -shm files the database file's mode.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:  # another process made it meanwhile
            pass
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
