"""A disk cache for what the test session builds and does not change: a folder made once per machine
and per content key, copied into each session that asks for it (a plain module; the fixtures that
use it live in conftest.py).

Why: tests/conftest.py's tiny model takes ~10 s to train on two cores, and pytest-xdist's workers
are separate sessions that would each train it again. The folder is built under a lock (one
builder; the others wait, then copy) in the system temp folder (UNLEARN_TEST_CACHE overrides it,
as for tests/lab/scale_store.py), and published whole with a rename, so a parallel session never
copies half a folder. Each session gets a copy of its own and may write into it.

The key must hold everything that shapes the folder's bytes: the source of the functions that make
it, the files of the code they call, and the versions of the libraries and of Python (the model is
trained by the machine's float kernels: the cache never leaves the machine).
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("UNLEARN_TEST_CACHE") or Path(tempfile.gettempdir()) / "unlearn-lab-test-cache")


def source_key(*parts, extra=()) -> str:
    """A hash of functions (their source), repository files (paths relative to the root, their
    bytes), `extra` values, and the machine's Python, torch, transformers and tokenizers."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for part in parts:
        h.update(inspect.getsource(part).encode() if callable(part) else (ROOT / part).read_bytes())
    h.update(repr((tuple(extra), sys.version, platform.machine(), torch.__version__, transformers.__version__,
                   tokenizers.__version__, torch.get_num_threads())).encode())
    return h.hexdigest()[:16]


def cached_folder(name: str, key: str, build: Callable[[Path], None], dst: Path) -> Path:
    """Copy the cached folder `name`-`key` into `dst` (created or empty), running build(folder)
    first when no such folder is cached. Returns dst."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{name}-{key}"
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and then copy
        if not final.is_dir():  # (folders of other keys stay: small, and another checkout may use them)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
            try:
                build(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, dst, dirs_exist_ok=True)
    return dst
