"""engine.files: a file is written whole or not at all, also when several writers race for it (two
workers on one host that miss the same baseline-cache entry)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from engine.files import write_json_atomic, write_text_atomic


def fixed_temp_name_writer(path: Path, text: str) -> None:
    """What the run and the demo did before: one temporary name per target. The control case."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def race(writer, path: Path, writers: int = 8, rounds: int = 200) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def one(i: int) -> None:
        start.wait()
        for r in range(rounds):
            try:
                writer(path, json.dumps({"writer": i, "round": r, "pad": "x" * 2000}))
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
                return

    threads = [threading.Thread(target=one, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_racing_writers_never_fail_and_leave_one_whole_file(tmp_path):
    path = tmp_path / "cache" / "entry.json"
    assert race(write_text_atomic, path) == []
    assert set(json.loads(path.read_text())) == {"writer", "round", "pad"}  # whole, not interleaved
    assert [p.name for p in path.parent.iterdir()] == ["entry.json"]  # no temporary file left


def test_the_race_is_real_for_a_fixed_temporary_name(tmp_path):
    """The control: the same race breaks the old way of writing, so the test above can fail."""
    errors = race(fixed_temp_name_writer, tmp_path / "entry.json")
    assert errors and all(isinstance(e, FileNotFoundError) for e in errors)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": 1})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": Unserializable()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_baseline_cache_entries_go_through_it(tiny_model_dir, tiny_sets, forget_set_texts, tmp_path):
    """Four threads miss the same cache entry together: each computes the baseline, all write it,
    nobody fails, and the entry is one of theirs, whole."""
    from engine.config import RunConfig
    from engine.models import load_model
    from engine.run import baseline_metrics

    cfg = RunConfig(method="ga", lr=1e-3, milestones=(1,), seq_len=128).validate()
    models = [load_model(str(tiny_model_dir)) for _ in range(4)]
    start, results, errors = threading.Barrier(4), [], []

    def one(model):
        start.wait()
        try:
            results.append(baseline_metrics(model, str(tiny_model_dir), tiny_sets, forget_set_texts.hash, cfg, tmp_path)[0])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (entry,) = tmp_path.iterdir()
    assert json.loads(entry.read_text()) == results[0]
