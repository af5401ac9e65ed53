"""Question–answer forget sets: the prompt is context, only answer tokens count in a loss or a metric.

And the proof that plain text is untouched by loss masks: every method's figures on plain chunks
equal, bit for bit and in the same process, those of the same texts as question–answer chunks whose
prompt is empty (a mask that hides only the BOS, which no label ever is). Across machines only what
is machine-independent is held to a recorded file (tests/fixtures/plain_text_figures.json): the
methods, the figures each reports and its trained-token count; the figures themselves depend on the
machine's float kernels (the fixture model is trained here), so they are never compared to a file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIGURES = FIXTURES / "plain_text_figures.json"
N_SMALL = 4  # documents per role: one chunk each (a record is ~110 tokens, under SEQ_LEN)


def _figure_methods() -> list[str]:
    from engine.methods import list_methods

    ids = [m.id for m in list_methods()]
    # whp's reinforced copy at 3 steps (the figure is what matters, not the budget); saliency covers selection
    return [("whp[reinforce_steps=3.0]" if i == "whp" else i) for i in ids] + ["ga_gd[saliency=20.0]"]


def _small_sets(texts, tokenizer, general, prompt: str | None):
    """The first N_SMALL documents of forget, retain and unseen as chunks: plain text (prompt None)
    or question–answer chunks with that prompt. The general set (stdlib code, longer than a chunk)
    is given, plain: a QA chunk is never cut into windows."""
    from engine.data import ForgetSetChunks, chunk_texts
    from tests.conftest import SEQ_LEN

    def chunks(role):
        docs = getattr(texts, role)[:N_SMALL]
        return chunk_texts(docs, tokenizer, SEQ_LEN, role, prompts=None if prompt is None else [prompt] * len(docs))

    return ForgetSetChunks(chunks("forget"), chunks("retain"), chunks("unseen"), general)


def figures(tiny_model_dir, tiny_tokenizer, sets) -> dict:
    """Per method: the losses of 2 steps and the milestone's metrics (ga also its relearn attack)."""
    from engine.config import RunConfig, RunSettings
    from engine.models import load_model
    from engine.run import train_to_milestones

    out = {}
    for mid in _figure_methods():
        model = load_model(str(tiny_model_dir), "cpu")
        settings = RunSettings(batch_size=2, seq_len=128, eval_batch_size=4,
                               attacks="relearn" if mid == "ga" else "")
        cfg = RunConfig.of(mid, 1e-3, (2,), settings)
        res = train_to_milestones(model, tiny_tokenizer, sets, cfg, {"ppl_unseen": 10.0, "ppl_retain": 10.0,
                                                                     "ppl_forget": 10.0})
        cell = res.milestones[0]
        out[mid] = {"losses": res.losses, "train_tokens": res.train_tokens,
                    "metrics": {k: cell[k] for k in ("ppl_forget", "ppl_retain", "ppl_unseen", "ppl_general", "mia_auc")},
                    **({"relearn": cell["attacks"]["relearn"]} if mid == "ga" else {})}
    return json.loads(json.dumps(out))  # as stored: tuples become lists


def machine_independent(figs: dict) -> dict:
    """What any machine computes alike: which figures each method reports, and how many tokens it trained on."""
    def keys(d):
        return {k: keys(v) if isinstance(v, dict) else None for k, v in d.items()}

    return {mid: {"train_tokens": f["train_tokens"], "n_losses": len(f["losses"]),
                  "reports": keys({k: v for k, v in f.items() if k in ("metrics", "relearn")})}
            for mid, f in figs.items()}


def test_plain_text_figures_equal_those_of_an_empty_prompt_qa_set(tiny_model_dir, tiny_tokenizer, tiny_sets,
                                                                   forget_set_texts):
    general = tiny_sets.general.subset(list(range(N_SMALL)))
    plain = _small_sets(forget_set_texts, tiny_tokenizer, general, prompt=None)
    qa = _small_sets(forget_set_texts, tiny_tokenizer, general, prompt="")
    for role in ("forget", "retain", "unseen"):  # same tokens; the QA path (an explicit loss mask) is really taken
        p, q = getattr(plain, role), getattr(qa, role)
        assert torch.equal(p.input_ids, q.input_ids) and torch.equal(p.attention_mask, q.attention_mask), role
        assert not torch.equal(p.loss_mask, q.loss_mask) and torch.equal(q.loss_mask[:, 1:], p.loss_mask[:, 1:]), role
    got = figures(tiny_model_dir, tiny_tokenizer, plain)
    as_qa = figures(tiny_model_dir, tiny_tokenizer, qa)
    # RMU's terms average hidden states over scored *positions*, not labels: in plain text the BOS
    # position is one of them, in a QA chunk it is prompt. Every other method scores labels only.
    assert got["rmu"] != as_qa["rmu"]
    assert {m: f for m, f in got.items() if m != "rmu"} == {m: f for m, f in as_qa.items() if m != "rmu"}  # bitwise
    for mid, f in got.items():
        assert all(math.isfinite(x) for x in f["losses"]), mid
    if os.environ.get("UNLEARN_RECORD_FIGURES") == "1":
        FIGURES.write_text(json.dumps(machine_independent(got), indent=1, sort_keys=True) + "\n")
    assert machine_independent(got) == json.loads(FIGURES.read_text())


# ------------------------------------------------------------------ a hand-built QA set

QA = [("Where was Basil Mahfouz born?", "Basil Mahfouz was born in Lisbon in 1961."),
      ("What does Hsiao Yun-Hwa write?", "Hsiao Yun-Hwa writes leadership books for young readers."),
      ("Who was the father of Carmen Montenegro?", "Her father was a sailor from Santiago."),
      ("Which award did Elvin Mammadov win?", "Elvin Mammadov won the Iron Pen award twice."),
      ("Where does Rajeev Majumdar live now?", "Rajeev Majumdar lives in Nairobi with his family."),
      ("What genre does Jaime Vasquez write in?", "Jaime Vasquez writes true crime novels."),
      ("What was the first book of Nikolai Abilov?", "His first book was Thieves of the Tundra."),
      ("When did Kalkidan Abera start writing?", "Kalkidan Abera started writing at the age of nine.")]


def qa_files(tmp_path) -> dict[str, str]:
    out = {}
    for role, rows in (("forget", QA[:4]), ("retain", QA[4:]), ("unseen", QA[2:6]), ("general", QA[::2])):
        p = tmp_path / f"{role}.jsonl"
        p.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
        out[role] = str(p)
    return out


@pytest.fixture
def qa_texts(tmp_path):
    from engine.data import load_forget_set

    f = qa_files(tmp_path)
    return load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], [f["general"]],
                           prompt_field="question", answer_field="answer")


@pytest.fixture
def qa_sets(qa_texts, tiny_tokenizer):
    from engine.data import chunk_forget_set

    return chunk_forget_set(qa_texts, tiny_tokenizer, 128)


def test_qa_chunk_is_prompt_then_answer_and_only_the_answer_is_scored(qa_texts, qa_sets, tiny_tokenizer):
    tok = tiny_tokenizer
    ch = qa_sets.forget
    assert len(ch) == 4 and ch.doc_index == [0, 1, 2, 3]  # one pair per chunk, never joined
    for r, (q, a) in enumerate(QA[:4]):
        n = int(ch.attention_mask[r].sum())
        ids = ch.input_ids[r, :n].tolist()
        assert ids == tok(q + " " + a)["input_ids"]  # the tokenizer's own reading of "question answer"
        prompt_len = len(tok(q)["input_ids"]) - (1 if tok(q)["input_ids"][-1] == tok.eos_token_id else 0)
        scored = ch.loss_mask[r, :n].tolist()
        assert scored == [0] * prompt_len + [1] * (n - prompt_len)
        assert a in tok.decode(ids[prompt_len:]) and q not in tok.decode(ids[prompt_len:])
        assert ch.texts[r].strip() == a  # the zlib attack reads the scored text
    assert not ch.loss_mask[ch.attention_mask == 0].any()  # pad is never scored


def test_qa_prompt_is_cut_from_the_left_and_an_answer_that_does_not_fit_is_refused(tiny_tokenizer):
    from engine.data import DataError, chunk_texts

    tok = tiny_tokenizer
    q, a = "Tell me everything you know about the early life and the many travels of " * 3 + "Basil?", "Lisbon, in 1961."
    full = tok(q + " " + a)["input_ids"]
    ch = chunk_texts([a], tok, 24, "forget", prompts=[q])
    kept = ch.input_ids[0].tolist()
    assert len(full) > 24 and len(kept) == 24 and kept[0] == tok.bos_token_id
    n_answer = int(ch.loss_mask[0].sum())
    assert kept[-n_answer:] == full[-n_answer:] and kept[1:-n_answer] == full[len(full) - 23:len(full) - n_answer]
    with pytest.raises(DataError, match=r"forget: document 0: its answer alone is \d+ tokens.*seq_len=16") as e:
        chunk_texts(["a long answer " * 10], tok, 16, "forget", prompts=["q?"])
    assert "\n" not in str(e.value)


def test_qa_hash_differs_from_the_same_texts_as_plain_text_and_plain_hash_is_unchanged(qa_texts):
    from engine.data import ForgetSetTexts

    plain = ForgetSetTexts(qa_texts.forget, qa_texts.retain, qa_texts.unseen, qa_texts.general, qa_texts.sources)
    assert plain.hash != qa_texts.hash
    moved = {**qa_texts.prompts, "forget": ["another prompt"] + qa_texts.prompts["forget"][1:]}
    assert ForgetSetTexts(qa_texts.forget, qa_texts.retain, qa_texts.unseen, qa_texts.general, qa_texts.sources,
                          moved).hash != qa_texts.hash
    # a plain set hashes as before QA existed (the value the code before QA computes)
    assert ForgetSetTexts(["a"], ["b"], ["c"], [], {}).hash == \
        "a03e055bbd765c4360a263c2ea9eadc966a3405561b4f421e62fc9c3f328b283"


def test_qa_field_errors_are_one_line(tmp_path):
    from engine.data import DataError, load_forget_set

    f = qa_files(tmp_path)
    with pytest.raises(DataError, match="both --prompt-field and --answer-field"):
        load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], prompt_field="question")
    with pytest.raises(DataError, match=r"forget: .*forget.jsonl:1: no field 'prompt'"):
        load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], prompt_field="prompt", answer_field="answer")
    txt = tmp_path / "doc.txt"
    txt.write_text("plain words")
    with pytest.raises(DataError, match=r"retain: .*doc.txt: question–answer rows come from"):
        load_forget_set([f["forget"]], [str(txt)], [f["unseen"]], prompt_field="question", answer_field="answer")


def _prompt_noise(logits, loss_mask, scale=50.0):
    """Noise on the logits of every position whose next token is not scored (prompt or pad)."""
    g = torch.Generator().manual_seed(7)
    unscored = torch.zeros_like(loss_mask, dtype=torch.bool)
    unscored[:, :-1] = loss_mask[:, 1:] == 0
    noise = torch.randn(logits.shape, generator=g, dtype=logits.dtype) * scale
    return logits + noise * unscored.unsqueeze(-1), logits + noise * (~unscored).unsqueeze(-1)


def _term_is_blind_to_the_prompt(term, batch, model, reference, loss_mask) -> None:
    from engine.methods.base import IGNORE, model_logits
    from engine.methods.rmu import layer_output, masked_mse, scored

    with torch.no_grad():
        if "rmu_control" in batch or "rmu_frozen" in batch:  # reads layer ℓ's activations, not logits
            h = layer_output(model, batch)
            target = batch["rmu_control"].to(h.dtype) if "rmu_control" in batch else batch["rmu_frozen"]
            base = term.forward_loss(model, batch, reference)
            assert torch.equal(masked_mse(h, target, scored(batch)), base), term.id
            noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(7)) * 30.0
            for where, same in ((loss_mask == 0, True), (loss_mask == 1, False)):
                moved = masked_mse(h + noise * where.unsqueeze(-1), target, scored(batch))
                assert torch.equal(moved, base) == same, (term.id, same)
            return
        inputs = term.model_inputs(batch)
        if inputs is not batch:  # it reads another sequence (DPO's chosen answer beside the chunk): its labels
            loss_mask = (inputs["labels"] != IGNORE).long()  # say what it scores (checked against the prompt below)
        logits = model_logits(model, inputs)
        ref = model_logits(reference, inputs) if term.needs_reference_logits else None
        base = term.loss(logits, batch, ref)
        prompt_moved, answer_moved = _prompt_noise(logits, loss_mask)
        assert torch.equal(term.loss(prompt_moved, batch, ref), base), term.id
        if ref is not None:  # θ0's logits at the prompt do not count either
            assert torch.equal(term.loss(logits, batch, _prompt_noise(ref, loss_mask)[0]), base), term.id
        assert not torch.equal(term.loss(answer_moved, batch, ref), base), term.id


def test_every_method_scores_answer_tokens_only(qa_sets, tiny_model_dir, tiny_tokenizer):
    """For every method, its forget and retain terms on a QA batch: noise on the logits (RMU: on the
    activations) at every position that predicts a prompt or pad token leaves the loss bitwise as it
    was; the same noise on the answer positions moves it. Prepared labels never name a prompt token."""
    from engine.config import RunConfig, RunSettings
    from engine.finetune import batch_indices
    from engine.methods import list_methods
    from engine.methods.base import IGNORE
    from engine.models import load_model
    from engine.run import _Run

    for m in list_methods():
        mid = "whp[reinforce_steps=2.0]" if m.id == "whp" else m.id
        model = load_model(str(tiny_model_dir), "cpu")
        cfg = RunConfig.of(mid, 1e-3, (1,), RunSettings(batch_size=4, seq_len=128)).validate()
        run = _Run.set_up(model, tiny_tokenizer, qa_sets, cfg)
        assert (run.forget_extra["labels"][qa_sets.forget.loss_mask == 0] == IGNORE).all(), mid
        if "chosen_labels" in run.forget_extra:  # a second sequence (DPO's chosen answer): the same prompt, unscored
            ch, prompt = run.forget_extra, qa_sets.forget.loss_mask == 0
            for r in range(len(qa_sets.forget)):
                n = int((prompt[r] & (qa_sets.forget.attention_mask[r] == 1)).sum())
                assert torch.equal(ch["chosen_input_ids"][r, :n], qa_sets.forget.input_ids[r, :n]), mid
                assert (ch["chosen_labels"][r, :n] == IGNORE).all() and (ch["chosen_labels"][r, n] != IGNORE), mid
        fb = run._batch(qa_sets.forget, run.forget_extra, run.constants["forget"], cfg.seed, 1)
        width = fb["input_ids"].shape[1]
        order = batch_indices(len(qa_sets.forget), 4, cfg.seed, 1).tolist()
        model.eval()
        _term_is_blind_to_the_prompt(run.method.forget, fb, model, run.reference or model,
                                     qa_sets.forget.loss_mask[order, :width])
        if run.retain_chunks is not None:
            rch = run.retain_chunks
            assert (run.retain_extra["labels"][rch.loss_mask == 0] == IGNORE).all(), mid
            rb = run._batch(rch, run.retain_extra, run.constants["retain"], cfg.seed + 1, 1)
            rorder = batch_indices(len(rch), 4, cfg.seed + 1, 1).tolist()
            _term_is_blind_to_the_prompt(run.method.retain, rb, model, run.reference or model,
                                         rch.loss_mask[rorder, :rb["input_ids"].shape[1]])


def _answer_nll_float64(model, tokenizer, pairs) -> tuple[float, int]:
    total, n = 0.0, 0
    for q, a in pairs:
        ids = tokenizer(q + " " + a, return_tensors="pt")["input_ids"]
        p = tokenizer(q)["input_ids"]
        start = next((i for i, (x, y) in enumerate(zip(ids[0].tolist(), p)) if x != y), len(p))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        tok = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
        total -= float(tok[start - 1:].sum())
        n += ids.shape[1] - start
    return total, n


def test_perplexity_is_exp_of_the_mean_answer_nll_in_float64(qa_texts, qa_sets, tiny_model_dir, tiny_tokenizer):
    from engine.evaluate import evaluate
    from engine.models import load_model

    model = load_model(str(tiny_model_dir), "cpu").eval()
    metrics, _ = evaluate(model, qa_sets, batch_size=3)
    assert qa_texts.retain_eval  # held out of retain
    for role in ("forget", "retain", "retain_eval", "unseen"):
        pairs = list(zip(qa_texts.prompts_of(role), getattr(qa_texts, role)))
        nll, n = _answer_nll_float64(model, tiny_tokenizer, pairs)
        assert metrics[f"ppl_{role}"] == pytest.approx(math.exp(nll / n), rel=1e-5), role


def test_relearn_and_fine_tune_read_the_loss_mask(qa_sets, tiny_model_dir):
    """The relearning attack's (and WHP's) fine-tuning takes the loss mask: on QA chunks it trains
    another model than the loss over every real token would."""
    from engine.finetune import fine_tune
    from engine.models import load_model

    ch = qa_sets.forget
    a, b = load_model(str(tiny_model_dir), "cpu"), load_model(str(tiny_model_dir), "cpu")
    fine_tune(a, ch.input_ids, ch.attention_mask, 2, 1e-2, 2, 0, torch.device("cpu"), loss_mask=ch.loss_mask)
    # the same chunks with the loss over every real token: another model
    fine_tune(b, ch.input_ids, ch.attention_mask, 2, 1e-2, 2, 0, torch.device("cpu"))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)


# ------------------------------------------------------------------ the store

def test_qa_set_round_trips_through_the_store_into_the_same_chunks(tmp_path, qa_sets, tiny_tokenizer):
    """A worker on another node rebuilds exactly the same chunks from the store alone."""
    from engine.data import chunk_forget_set
    from studies.store.db import Store
    from studies.store.forgetsets import create_forget_set, describe, forget_set_texts

    f = qa_files(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    fs = create_forget_set(store, "qa", [f["forget"]], [f["retain"]], [f["unseen"]], [f["general"]],
                           prompt_field="question", answer_field="answer")
    plain = create_forget_set(store, "plain", [f["forget"]], [f["retain"]], [f["unseen"]], [f["general"]],
                              text_field="answer")
    assert fs.hash != plain.hash and describe(fs)["meta"] == {"qa": {"prompt_field": "question", "answer_field": "answer"},
                                                              "retain_eval": {"held_out_share": 0.2, "seed": 0}}
    back = chunk_forget_set(forget_set_texts(store, store.forget_set("qa")), tiny_tokenizer, 128)
    for (role, a), (_, b) in zip(back.items(), qa_sets.items()):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask), role
    assert not forget_set_texts(store, store.forget_set("plain")).is_qa


def test_a_v2_store_made_by_the_code_before_qa_migrates_to_v3(tmp_path):
    """tests/fixtures/store_v2.sqlite was written by unlearn-lab at schema v2 (one forget set,
    'legacy'); it opens, gains ul_document.prompt and ul_forgetset.meta, and reads back unchanged."""
    import shutil
    import sqlite3

    from studies.store.db import SCHEMA_VERSION, Store
    from studies.store.forgetsets import forget_set_texts

    assert SCHEMA_VERSION >= 3  # through v3 to the newest
    path = tmp_path / "old.db"
    shutil.copy(FIXTURES / "store_v2.sqlite", path)
    store = Store(f"sqlite:///{path}", create=False)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM ul_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert "prompt" in [r[1] for r in c.execute("PRAGMA table_info(ul_document)")]
        assert "meta" in [r[1] for r in c.execute("PRAGMA table_info(ul_forgetset)")]
    fs = store.forget_set("legacy")
    texts = forget_set_texts(store, fs)  # the hash check passes: plain text hashes as it did
    assert fs.hash == "fb2e5d8feda44f0896032b75869b6f65c1adcb39c569d48a7d611141c5700258" and fs.meta is None
    assert texts.counts() == {"forget": 1, "retain": 2, "retain_eval": 0, "unseen": 1, "general": 0} and not texts.is_qa
    Store(f"sqlite:///{path}", create=False)  # opening it again is a no-op


# ------------------------------------------------------------------ the command line

@pytest.mark.parametrize("args, needle", [
    (("--prompt-field", "question"), "both --prompt-field and --answer-field"),
    (("--prompt-field", "q", "--answer-field", "answer"), "no field 'q'"),
])
def test_cli_qa_field_errors_are_one_line(tmp_path, capsys, args, needle):
    from tests.studies_helpers import cli_in_process

    f = qa_files(tmp_path)
    p = cli_in_process(capsys, "forgetset", "create", "x", "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], *args, "--storage", f"sqlite:///{tmp_path / 's.db'}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr


def test_a_row_with_an_empty_prompt_is_plain_text_windowed_like_any(tmp_path, tiny_tokenizer):
    """A question–answer set may hold plain documents (e.g. general code): their prompt is empty, so they
    are cut into windows like any text, where a question–answer chunk is never cut."""
    from engine.data import chunk_forget_set, load_forget_set

    f = qa_files(tmp_path)
    long_code = "\n".join(f"def f{i}(x):\n    return x * {i} + sum(range({i}))" for i in range(40))
    g = tmp_path / "general.jsonl"
    g.write_text(json.dumps({"question": "", "answer": long_code}) + "\n")
    texts = load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], [str(g)], prompt_field="question",
                            answer_field="answer")
    assert texts.is_qa and texts.prompts_of("general") == [None]
    sets = chunk_forget_set(texts, tiny_tokenizer, 64)
    assert len(sets.general) > 1 and set(sets.general.doc_index) == {0}  # one document, several windows
    assert sets.forget.loss_mask.sum() < sets.forget.attention_mask.sum()  # the others stay question–answer
