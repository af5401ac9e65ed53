"""An exported command reproduces its cell whatever the forget set is: a question–answer set from
files carries its fields, and a preset (built from a benchmark's tables, not from re-readable
sources) is named with --forget-set and read from the store."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from studies.lifecycle.spec import StudySpec
from studies.reading.export import reproduce_command
from studies.store.db import Store
from tests.studies_helpers import assert_one_line_error, cli_in_process

PRESETS = Path(__file__).parents[1] / "fixtures" / "presets"


def spec_for(model: str) -> StudySpec:
    return StudySpec(model=model, forget_set="x", forget_set_hash="h", methods=("ga",), steps=(1,), lrs=(1e-3,)).validate()


def test_a_preset_is_exported_as_forget_set_and_runs_from_the_store(tmp_path, tiny_model_dir, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    p = cli_in_process(capsys, "forgetset", "preset", "tofu", "--split", "forget01", "--from", str(PRESETS / "tofu"),
                       "--seq-len", "128", "--storage", url)
    assert p.returncode == 0, p.stderr
    store = Store(url)
    fs = store.forget_set("tofu-forget01")
    command = reproduce_command(str(tiny_model_dir), fs, spec_for(str(tiny_model_dir)), "ga", 1e-3, 1)
    argv = shlex.split(command)
    assert argv[argv.index("--forget-set") + 1] == "tofu-forget01" and "--forget" not in argv
    # one row of each TOFU list for the benchmark figures, which are not what this test checks
    r = cli_in_process(capsys, *argv[1:], "--bench-samples", "1", "--storage", url)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["forget_set"]["hash"] == fs.hash and result["milestones"][0]["score"] is not None

    assert_one_line_error(cli_in_process(capsys, "run", "--model", str(tiny_model_dir), "--forget-set", "tofu-forget01",
                                         "--forget", "x.jsonl", "--method", "ga", "--lr", "1e-3", "--steps", "1",
                                         "--storage", url), "not both")
    assert_one_line_error(cli_in_process(capsys, "run", "--model", str(tiny_model_dir), "--forget", "x.jsonl",
                                         "--method", "ga", "--lr", "1e-3", "--steps", "1"), "give --retain, --unseen")


def test_a_question_answer_set_from_files_is_exported_with_its_fields(tmp_path, tiny_model_dir, capsys):
    rows = {role: [{"q": f"Who wrote book {role} {i}?", "a": f"Author number {i} of the {role} shelf wrote it."}
                   for i in range(6)] for role in ("forget", "retain", "unseen")}
    files = {}
    for role, items in rows.items():
        files[role] = tmp_path / f"{role}.jsonl"
        files[role].write_text("".join(json.dumps(r) + "\n" for r in items))
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    p = cli_in_process(capsys, "forgetset", "create", "qa", *[a for role in rows for a in (f"--{role}", str(files[role]))],
                       "--prompt-field", "q", "--answer-field", "a", "--seq-len", "64", "--storage", url)
    assert p.returncode == 0, p.stderr
    fs = Store(url).forget_set("qa")
    argv = shlex.split(reproduce_command(str(tiny_model_dir), fs, spec_for(str(tiny_model_dir)), "ga", 1e-3, 1))
    assert argv[argv.index("--prompt-field") + 1] == "q" and argv[argv.index("--answer-field") + 1] == "a"
    r = cli_in_process(capsys, *argv[1:], "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["forget_set"]["hash"] == fs.hash  # the same documents, prompts and answers
