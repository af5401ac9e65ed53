"""Downstream tasks through lm-eval (`--eval-tasks`, `--eval-tasks-dir`): a multiple-choice task
written here as a YAML file over a local JSONL, run on the tiny model through `unlearn run`; the
accuracy it reports at θ0 and at the milestone equals the one counted by hand from an independent
forward pass (the log-likelihood of each choice after the question). Skipped without lm-eval."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the optional extra: pip install 'unlearn-lab[eval]')")

TASK_YAML = """task: mytask
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
"""


def _task_rows() -> list[dict]:
    """Questions about the tiny model's people-like records, each with 3 choices, the right one at a
    random place (so neither always-first nor shortest wins by construction)."""
    rng = random.Random(7)
    rows = []
    for i in range(12):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices = [f"born in {a}", f"lives at {b} Main Street", f"works as a {['baker', 'clerk', 'pilot'][i % 3]}"]
        label = rng.randrange(3)
        rows.append({"question": f"What about person {a}{b}?", "choices": choices, "label": label})
    return rows


def _write_task(folder) -> list[dict]:
    rows = _task_rows()
    folder.mkdir()
    data = folder / "mytask.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "mytask.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return rows


def _ids(tok, text: str) -> list[int]:
    """BOS + the text's tokens (the tiny tokenizer's template would also append </s>)."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def hand_accuracy(model, tok, rows: list[dict]) -> tuple[float, list[list[float]]]:
    """lm-eval's multiple-choice protocol written out: context = "Question: q\\nAnswer:", each choice
    scored as Σ log p of the tokens of context + " " + choice past the context's own tokens, in a
    float64 log_softmax; the prediction is the argmax."""
    correct, table = 0, []
    for r in rows:
        context = f"Question: {r['question']}\nAnswer:"
        ctx = _ids(tok, context)
        scores = []
        for choice in r["choices"]:
            whole = _ids(tok, context + " " + choice)
            assert whole[: len(ctx)] == ctx
            x = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            scores.append(math.fsum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        table.append(scores)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    return correct / len(rows), table


def test_local_task_accuracy_equals_the_hand_count(tmp_path, capsys, tiny_model_dir, tiny_tokenizer, forget_set_files):
    from engine.models import load_model
    from tests.studies_helpers import cli_in_process

    rows = _write_task(tmp_path / "tasks")
    f = forget_set_files
    p = cli_in_process(capsys, "run", "--model", str(tiny_model_dir), "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], "--method", "ga", "--lr", "3e-3", "--steps", "2", "--batch-size", "2",
                       "--seq-len", "128", "--device", "cpu", "--eval-tasks", "mytask",
                       "--eval-tasks-dir", str(tmp_path / "tasks"), "--save-model", str(tmp_path / "out"), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    theta0, _ = hand_accuracy(load_model(str(tiny_model_dir), "cpu").eval(), tiny_tokenizer, rows)
    after, table = hand_accuracy(load_model(str(tmp_path / "out"), "cpu").eval(), tiny_tokenizer, rows)
    print(f"mytask accuracy: θ0 lm-eval {result['baseline']['downstream']['mytask']} hand {theta0}; "
          f"step 2 lm-eval {result['milestones'][0]['downstream']['mytask']} hand {after}")
    assert result["baseline"]["downstream"] == {"mytask": pytest.approx(theta0, abs=1e-12)}
    cell = result["milestones"][0]
    assert cell["step"] == 2 and cell["downstream"] == {"mytask": pytest.approx(after, abs=1e-12)}
    assert 0 < after < 1  # not a degenerate count: some right, some wrong
    assert result["config"]["eval_tasks"] == "mytask"
    assert "bench" not in cell  # plain files: no benchmark extras


def test_unknown_task_is_one_line(tmp_path, tiny_model_dir, tiny_tokenizer):
    from engine.downstream import evaluate_tasks
    from engine.errors import UnlearnError
    from engine.models import load_model

    _write_task(tmp_path / "tasks")
    with pytest.raises(UnlearnError, match="knows no task 'nosuchtask'") as e:
        evaluate_tasks(load_model(str(tiny_model_dir), "cpu"), tiny_tokenizer, "mytask,nosuchtask", str(tmp_path / "tasks"))
    assert "\n" not in str(e.value)


def test_best_cell_job_evaluates_the_tasks_and_the_heatmap_shows_them(tmp_path, capsys, tiny_model_dir,
                                                                       tiny_tokenizer, forget_set_files):
    """study create --eval-tasks mytask (at the best cells, the default): the runs skip the task; the
    best-cell job reruns each method's best cell with it and stores downstream.mytask there, which
    `study heatmap --metric downstream.mytask` and the app's picker then show."""
    from sqlmodel import select

    from studies.lifecycle.spec import StudySpec
    from studies.reading.grid import load_cells, study_metrics
    from studies.running.attack import attack_best_cells, describe_row
    from studies.store.db import CellRow, Run, Store
    from studies.store.states import RunState
    from tests.studies_helpers import cli_in_process, make_forget_set

    rows = _write_task(tmp_path / "tasks")
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    p = cli_in_process(capsys, "study", "create", "S", "--model", str(tiny_model_dir), "--forget-set", "fs",
                       "--methods", "ga", "--lr", "3e-3", "--steps", "1", "--batch-size", "2", "--seq-len", "128",
                       "--eval-tasks", "mytask", "--eval-tasks-dir", str(tmp_path / "tasks"), "--storage", url)
    assert p.returncode == 0, p.stderr
    spec = StudySpec.from_dict(store.study("S").spec)
    assert spec.wants_best_cell_attacks and spec.run_config("ga", 3e-3).eval_tasks == ""  # the runs skip it
    with store.write() as s:  # the run's one cell, as a finished run leaves it
        run = s.exec(select(Run)).one()
        run.state = RunState.DONE
        s.add(CellRow(run_id=run.id, step=1, metrics={"score": 0.5}, score=0.5))
    got = attack_best_cells(store, "S", device="cpu")
    hand, _ = hand_accuracy(_trained(tmp_path, tiny_model_dir, forget_set_files), tiny_tokenizer, rows)
    assert got[0]["downstream.mytask"] == pytest.approx(hand, abs=1e-12)
    assert "downstream mytask" in describe_row(got[0]) and "recovery" not in describe_row(got[0])
    cells = load_cells(store, "S")
    assert cells[0].value("downstream.mytask") == pytest.approx(hand, abs=1e-12)
    assert "downstream.mytask" in study_metrics(store.study("S").spec, cells)
    p = cli_in_process(capsys, "study", "heatmap", "S", "--metric", "downstream.mytask", "--json", "--storage", url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ga"]["values"] == [[pytest.approx(hand, abs=1e-12)]]


def _trained(tmp_path, model_dir, files):
    """The best cell's model (ga, lr 3e-3, 1 step), trained again here and loaded back."""
    from engine.config import RunConfig, RunSettings
    from engine.data import load_forget_set
    from engine.models import load_model
    from engine.run import run_unlearning

    texts = load_forget_set([files["forget"]], [files["retain"]], [files["unseen"]], [files["general"]])
    cfg = RunConfig.of("ga", 3e-3, (1,), RunSettings(batch_size=2, seq_len=128))
    run_unlearning(str(model_dir), texts, cfg, device="cpu", save_to=tmp_path / "best")
    return load_model(str(tmp_path / "best"), "cpu").eval()




def _digit_rows() -> list[dict]:
    """Choices of one token each ("1" … "9"), so no choice wins by its length alone: which one a
    model picks depends on its weights."""
    rng = random.Random(11)
    rows = []
    for _ in range(24):
        a = rng.randint(1000, 9999)
        choices = [str(d) for d in rng.sample(range(1, 10), 3)]
        rows.append({"question": f"What about person {a}?", "choices": choices, "label": rng.randrange(3)})
    return rows


def test_lm_eval_reads_a_lora_model_with_its_adapter_on(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A LoRA run's model is a peft model: lm-eval scores it with its adapter on (the hand count on
    the merged model), and with the adapter switched off it scores θ0 (the hand count on the base)."""
    from engine.downstream import evaluate_tasks
    from engine.lora import apply_lora
    from engine.models import load_model

    rows = _digit_rows()
    assert all(len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for r in rows for c in r["choices"])
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mytask.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "mytask.yaml").write_text(TASK_YAML.format(data=folder / "mytask.jsonl"), encoding="utf-8")
    # peft draws lora_A from the global generator, so without a seed the tests that ran before chose
    # it. Under seed 2 the adapter moves the count (10 of 24 vs θ0's 7); under 0, 1 and 3 it reads 7 too.
    torch.manual_seed(2)
    model = apply_lora(load_model(str(tiny_model_dir), "cpu"), 4, None, "")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that moves the model a lot (peft starts B at zero: θ0 exactly)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    lm_eval_on = evaluate_tasks(model, tiny_tokenizer, "mytask", str(folder))["mytask"]
    with model.disable_adapter():
        lm_eval_off = evaluate_tasks(model, tiny_tokenizer, "mytask", str(folder))["mytask"]
    on, table_on = hand_accuracy(model.merge_and_unload().eval(), tiny_tokenizer, rows)
    off, table_off = hand_accuracy(load_model(str(tiny_model_dir), "cpu").eval(), tiny_tokenizer, rows)
    print(f"mytask accuracy: adapter on lm-eval {lm_eval_on} hand {on}; off lm-eval {lm_eval_off} hand {off}")
    assert table_on != table_off and on != off  # the two models are told apart by the task itself
    assert lm_eval_on == pytest.approx(on, abs=1e-12) and lm_eval_off == pytest.approx(off, abs=1e-12)
