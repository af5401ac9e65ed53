"""A store at scale for timing tests: ~10,000 trials in grid studies made through the studies API
(create_study, then studies.running.recorder.record_cell for every cell with app_stores.synthetic_cell
metrics, runs marked done), so `study ls` and the app's first paint are timed on what a
long-lived lab's store looks like.

A plain module (the fixture lives in tests/lab/test_scale.py).

What it costs: record_cell spends 30-45 ms per cell on a 2-core machine, nearly all of it in
Optuna's RDBStorage.create_new_trial (one INSERT and one find-by-id SELECT per user attribute:
a cell carries 16). Writing the milestones in one transaction per run and calling
create_new_trial directly measured no faster (the Optuna part is the cost), and parallel writers
would only queue on SQLite's single write lock (Optuna holds it through those statements). So the 10,250 trials take 5-8 minutes to make (467 s
measured on a busy machine), once: the built store is cached under the system temp folder
(UNLEARN_TEST_CACHE overrides it), keyed by a hash of everything that shapes it (this file,
app_stores.py, the studies/engine modules that write a store, the Optuna and SQLModel
versions), and each test session works on a copy of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("ga", "ga_gd")
LRS = tuple(float(f"{10 ** (-6 + i / 3):.3g}") for i in range(10))  # 1e-6 … 1e-3
STEPS = tuple(range(5, 130, 5))  # 25 milestones
CELLS_PER_STUDY = len(METHODS) * len(LRS) * len(STEPS)  # 500
DIVERGE_AT = 60  # the last good step of a diverging run
# What a store's content depends on: a change to any of these builds the cache again.
# The store as built by this code, committed compressed (1.7 MB): building it takes Optuna 5-8
# minutes, more than the whole test suite may, so a fresh clone (CI) starts from this file. It is
# used only when its key matches cache_key(); otherwise the store is built again and
# `python tests/lab/scale_store.py --write-fixture` refreshes the file.
FIXTURE = ROOT / "tests" / "fixtures" / "scale-store.db.xz"


def plan(trials: int = 10_000) -> list[dict]:
    """The studies to make: 500-cell grid studies until `trials` cells are written; every seventh only
    half run (its other runs pending), and of the others every third with one diverged run. Each
    entry carries the cells done (computed, not diverged) that `study ls` must count."""
    out: list[dict] = []
    i = -1
    while sum(p["written"] for p in out) < trials:
        i += 1
        half = i % 7 == 6
        diverge = {(METHODS[-1], LRS[-1]): DIVERGE_AT} if i % 3 == 1 and not half else {}
        written = round((0.5 if half else 1.0) * len(METHODS) * len(LRS)) * len(STEPS)
        diverged = sum(1 for last in diverge.values() for s in STEPS if s > last)
        out.append({"name": f"scale-{i:03d}", "fill": 0.5 if half else 1.0, "diverge": diverge,
                    "done": written - diverged, "written": written, "total": CELLS_PER_STUDY})
    return out


def scale_store(path: Path, model_dir, forget_set_files: dict[str, str], trials: int = 10_000) -> dict:
    """Make the store at `path` (an SQLite file that must not exist yet). Returns its manifest:
    {"studies": {name: {"done", "total", "written"}}, "trials", "build_s"}."""
    from studies.store.db import Store
    from tests.app.app_stores import make_study
    from tests.studies_helpers import make_forget_set

    started = time.perf_counter()
    store = Store(f"sqlite:///{path}")
    make_forget_set(store, "people", forget_set_files)
    studies = {}
    for p in plan(trials):
        make_study(store, p["name"], str(model_dir), "people", methods=METHODS, lrs=LRS, steps=STEPS,
                   fill=p["fill"], diverge=p["diverge"])
        studies[p["name"]] = {"done": p["done"], "total": p["total"], "written": p["written"]}
    _close(store)
    return {"studies": studies, "trials": sum(s["written"] for s in studies.values()),
            "build_s": round(time.perf_counter() - started, 1)}


def _close(store) -> None:
    """Close every connection, so SQLite folds its WAL back into the file."""
    if store._optuna is not None:
        store._optuna.engine.dispose()
    store.engine.dispose()
    store.write_engine.dispose()


def copy_store(src: Path, dst: Path) -> Path:
    """A consistent copy of an SQLite store (the backup API: whatever its WAL holds comes along)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()
    return dst


# ---------------------------------------------------------------- the cache

def cache_dir() -> Path:
    return Path(os.environ.get("UNLEARN_TEST_CACHE") or Path(tempfile.gettempdir()) / "unlearn-lab-test-cache")


def cache_key(trials: int = 10_000) -> str:
    """What the store's content depends on: this file (the plan), the functions that write each
    study and cell, and the two schemas (ours, Optuna's). Not the versions of the code that reads it."""
    import inspect

    from optuna.storages._rdb.models import SCHEMA_VERSION as OPTUNA_SCHEMA

    import tests.app.app_stores as app_stores
    from studies.store.db import SCHEMA_VERSION

    def without_imports(source: str) -> bytes:
        # a module moved (the lab's split did) or imports sorted (ruff) writes the same store
        return "\n".join(x for x in source.splitlines() if not x.lstrip().startswith(("import ", "from "))).encode()

    h = hashlib.sha256(f"{trials} {SCHEMA_VERSION} {OPTUNA_SCHEMA}".encode())
    h.update(without_imports(Path(__file__).read_text()))
    for fn in (app_stores.synthetic_cell, app_stores.make_study):
        h.update(without_imports(inspect.getsource(fn)))
    return h.hexdigest()[:16]


def cached_path(trials: int = 10_000) -> Path:
    return cache_dir() / f"scale-{cache_key(trials)}.db"


def is_cached(trials: int = 10_000) -> bool:
    p = cached_path(trials)
    return p.is_file() and p.with_suffix(".json").is_file()


def _inputs(folder: Path) -> tuple[Path, dict[str, str]]:
    """A stand-in model folder and small forget-set files that live beside the cache (the study
    records their paths; nothing in a timing test loads the model)."""
    model = folder / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text('{"note": "stand-in: scale-store studies are never run"}\n')
    files = {}
    for role in ("forget", "retain", "unseen", "general"):
        p = folder / f"{role}.jsonl"
        p.write_text("".join(json.dumps({"text": f"{role} record {i}: " + "words " * 20}) + "\n" for i in range(8)))
        files[role] = str(p)
    return model, files


def available(trials: int = 10_000) -> bool:
    """Whether the store comes without a build: cached, or committed for this code."""
    meta = FIXTURE.with_suffix("").with_suffix(".json")
    return is_cached(trials) or (FIXTURE.is_file() and meta.is_file()
                                 and json.loads(meta.read_text()).get("key") == cache_key(trials))


def _from_fixture(cached: Path, manifest_path: Path, trials: int) -> bool:
    """Unpack the committed store into the cache when it was made by this code."""
    import lzma

    meta = FIXTURE.with_suffix("").with_suffix(".json")
    if not (FIXTURE.is_file() and meta.is_file()):
        return False
    info = json.loads(meta.read_text())
    if info.get("key") != cache_key(trials):
        return False
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".db.{os.getpid()}")
    with lzma.open(FIXTURE) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(tmp, cached)
    manifest_tmp = manifest_path.with_suffix(f".json.{os.getpid()}")
    manifest_tmp.write_text(json.dumps(info["manifest"], indent=1))
    os.replace(manifest_tmp, manifest_path)
    return True


def cached_scale_store(dst: Path, trials: int = 10_000) -> dict:
    """The scale store copied to `dst`: from the cache, else from the committed fixture when this
    code made it, else built (minutes). Returns the manifest (with "cached": whether no build ran)."""
    cached = cached_path(trials)
    manifest_path = cached.with_suffix(".json")
    hit = is_cached(trials) or _from_fixture(cached, manifest_path, trials)
    if not hit:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("scale-*.*"):  # stores of older code: 20+ MB each
            stale.unlink(missing_ok=True)
        model, files = _inputs(folder / "inputs")
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=folder)) / "scale.db"
        try:
            manifest = scale_store(build, model, files, trials)
            copy_store(build, build.with_name("final.db"))
            os.replace(build.with_name("final.db"), cached)  # whole or not at all (a parallel session may race)
            manifest_tmp = manifest_path.with_suffix(f".json.{os.getpid()}")
            manifest_tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(manifest_tmp, manifest_path)
        finally:
            shutil.rmtree(build.parent, ignore_errors=True)
    manifest = json.loads(manifest_path.read_text())
    copy_store(cached, dst)
    return {**manifest, "cached": hit}


def write_fixture(trials: int = 10_000, store: Path | None = None) -> Path:
    """Compress the store (the cached one, built if needed; or `store`, made by this code) into
    tests/fixtures with its key and manifest."""
    import lzma

    if store is None:
        cached_scale_store(Path(tempfile.mkdtemp()) / "scale.db", trials)
        store = cached_path(trials)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    with open(store, "rb") as src, lzma.open(FIXTURE, "wb", preset=9) as out:
        shutil.copyfileobj(src, out)
    manifest = json.loads(cached_path(trials).with_suffix(".json").read_text())
    FIXTURE.with_suffix("").with_suffix(".json").write_text(
        json.dumps({"key": cache_key(trials), "manifest": manifest}, indent=1) + "\n")
    return FIXTURE


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(ROOT))
    p = argparse.ArgumentParser(description="Build the 10,000-trial store and write it to tests/fixtures.")
    p.add_argument("--write-fixture", action="store_true", required=True)
    p.add_argument("--store", type=Path, help="a store this code already made (else the cache, built if needed)")
    a = p.parse_args()
    print(write_fixture(store=a.store))
