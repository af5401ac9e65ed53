"""Benchmark presets on fixture folders shaped exactly like the real Hub datasets (the same configs,
splits, file layout and columns; tests/fixtures/presets/make_presets.py writes them): roles, counts,
QA fields, extras, the one-line errors, and a TOFU-shaped folder whose runs score answer tokens only."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

PRESET_DIR = Path(__file__).parents[1] / "fixtures" / "presets"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("split, n_authors, retain", [("forget01", 1, "retain99"), ("forget05", 2, "retain95"),
                                                      ("forget10", 3, "retain90")])
def test_tofu_roles_counts_and_qa_fields(split, n_authors, retain):
    from engine.presets import load_preset

    d = load_preset("tofu", split, str(PRESET_DIR / "tofu"))
    t = d.texts
    forget, kept = _rows(PRESET_DIR / "tofu" / f"{split}.json"), _rows(PRESET_DIR / "tofu" / f"{retain}.json")
    utility = {r["question"] for r in _rows(PRESET_DIR / "tofu" / "retain_perturbed.json")}
    held = [r for r in kept if r["question"] in utility]
    assert held, "the fixture's retain_perturbed asks questions of the retain authors"
    assert t.counts() == {"forget": 4 * n_authors, "retain": 40 - 4 * n_authors - len(held), "retain_eval": len(held),
                          "unseen": 5 * 4 * n_authors, "general": 10}
    assert t.forget == [r["answer"] for r in forget] and t.prompts["forget"] == [r["question"] for r in forget]
    # TOFU's own utility questions are retain_eval, and no longer retain: no retain term trains on them
    kept = [r for r in kept if r["question"] not in utility]
    assert t.retain == [r["answer"] for r in kept] and t.prompts["retain"] == [r["question"] for r in kept]
    assert t.retain_eval == [r["answer"] for r in held] and t.prompts["retain_eval"] == [r["question"] for r in held]
    perturbed = _rows(PRESET_DIR / "tofu" / f"{split}_perturbed.json")
    assert t.unseen == [a for r in perturbed for a in r["perturbed_answer"]]
    assert t.prompts["unseen"] == [r["question"] for r in perturbed for _ in r["perturbed_answer"]]
    assert all(p is not None for ps in t.prompts.values() for p in ps)
    assert d.extras["forget_perturbed"] == perturbed  # truth ratio: paraphrased and perturbed answers, as they are
    assert {"paraphrased_answer", "perturbed_answer", "paraphrased_question"} <= set(d.extras["forget_perturbed"][0])
    assert set(d.extras) == {"forget_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"}
    assert d.meta["preset"] == "tofu" and d.meta["split"] == split and d.meta["qa"]["answer_field"] == "answer"


@pytest.mark.parametrize("name", ["muse-news", "muse-books"])
def test_muse_roles_and_extras(name):
    import pyarrow.parquet as pq

    from engine.presets import load_preset

    d = load_preset(name, None, str(PRESET_DIR / name))
    raw = {s: pq.read_table(PRESET_DIR / name / "raw" / f"{s}-00000-of-00001.parquet").column("text").to_pylist()
           for s in ("forget", "retain1", "retain2", "holdout")}
    assert (d.texts.forget, d.texts.retain, d.texts.unseen, d.texts.general) == (raw["forget"], raw["retain1"], raw["holdout"], [])
    assert d.texts.retain_eval == raw["retain2"]  # MUSE's own utility split
    assert not d.texts.is_qa
    assert {k: len(v) for k, v in d.extras.items()} == {"knowmem_forget_qa": 5, "knowmem_retain_qa": 5,
                                                        "knowmem_forget_qa_icl": 2, "knowmem_retain_qa_icl": 2,
                                                        "verbmem_forget": 4}
    assert set(d.extras["knowmem_forget_qa"][0]) == {"question", "answer"}
    assert set(d.extras["verbmem_forget"][0]) == {"prompt", "gt"}
    assert d.texts.sources["forget"] == [f"hf:{PRESET_DIR / name}:raw/forget"]


@pytest.mark.parametrize("split", ["arxiv", "github"])
def test_yao_roles(split):
    from engine.presets import load_preset

    d = load_preset("yao", split, str(PRESET_DIR / "yao"))
    # the paper has no utility split: a seeded fifth of retain is held out as retain_eval
    assert d.texts.counts() == {"forget": 5, "retain": 5, "retain_eval": 1, "unseen": 7, "general": 5}
    assert d.texts.unseen[0].startswith(f"{split} approximate story 0.")
    assert d.texts.general[0].startswith("general retain story 0.")


def test_a_preset_source_spec_reads_back_the_same_documents():
    """What a role records as its source (hf:DIR:CONFIG/SPLIT) loads the same texts through engine.data."""
    from engine.data import load_texts, normalize_text
    from engine.presets import load_preset

    d = load_preset("muse-news", None, str(PRESET_DIR / "muse-news"))
    assert [normalize_text(t) for t in load_texts(d.texts.sources["unseen"][0])] == d.texts.unseen


@pytest.mark.parametrize("args, needle", [
    (("tofu", "--from", "/no/such/folder"), "--from /no/such/folder: no such folder"),
    (("tofu", "--split", "forget42", "--from", str(PRESET_DIR / "tofu")), "unknown split 'forget42'"),
    (("squad",), "unknown preset 'squad'"),
    (("muse-news", "--from", str(PRESET_DIR / "tofu")), "cannot load raw/forget"),
])
def test_preset_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    from tests.studies_helpers import cli_in_process

    p = cli_in_process(capsys, "forgetset", "preset", *args, "--storage", f"sqlite:///{tmp_path / 's.db'}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr


def test_without_the_hub_a_preset_says_to_use_from(monkeypatch):
    from huggingface_hub import constants

    from engine.errors import DataError
    from engine.presets import load_preset

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="use --from DIR") as e:
        load_preset("muse-books")
    assert "\n" not in str(e.value)


def test_preset_cli_stores_roles_and_extras(tmp_path, capsys):
    from studies.store.db import Store
    from studies.store.forgetsets import forget_set_extras, forget_set_texts
    from tests.studies_helpers import cli_in_process

    url = f"sqlite:///{tmp_path / 's.db'}"
    p = cli_in_process(capsys, "forgetset", "preset", "muse-news", "--from", str(PRESET_DIR / "muse-news"),
                       "--as", "news", "--json", "--storage", url)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["name"] == "news" and info["documents"] == {"forget": 6, "retain": 8, "retain_eval": 8, "unseen": 6,
                                                            "general": 0}
    assert info["meta"]["preset"] == "muse-news" and info["meta"]["extras"]["verbmem_forget"] == 4
    store = Store(url, create=False)
    fs = store.forget_set("news")
    assert forget_set_texts(store, fs).counts() == info["documents"]  # extras are not documents of a role
    assert [r["gt"] for r in forget_set_extras(store, fs)["verbmem_forget"]] == [f"its continuation {i}" for i in range(4)]
    again = cli_in_process(capsys, "forgetset", "preset", "muse-news", "--from", str(PRESET_DIR / "muse-news"),
                           "--as", "news", "--storage", url)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_a_tofu_shaped_folder_becomes_a_forget_set_whose_runs_score_answer_tokens_only(tmp_path, tiny_model_dir,
                                                                                         tiny_tokenizer):
    """The outside check: preset -> store -> a run (rebuilt from the store alone): θ0's perplexities are
    exp of the mean NLL of the answer tokens, computed here in float64 from the raw TOFU rows."""
    from engine.config import RunConfig, RunSettings
    from engine.models import load_model
    from engine.presets import load_preset
    from engine.run import run_unlearning
    from studies.store.db import Store
    from studies.store.forgetsets import forget_set_texts, store_forget_set

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    d = load_preset("tofu", "forget01", str(PRESET_DIR / "tofu"))
    store_forget_set(store, "tofu", d.texts, seq_len=128, meta=d.meta, extras=d.extras)
    texts = forget_set_texts(store, store.forget_set("tofu"))
    # one row of each benchmark list: their figures (greedy answers for model utility, the run's
    # slowest part) are checked in tests/lab/test_benchmark_metrics_in_runs.py
    cfg = RunConfig.of("ga_gd", 1e-3, (2,), RunSettings(batch_size=2, seq_len=128, bench_samples=1))
    result = run_unlearning(str(tiny_model_dir), texts, cfg, device="cpu")
    model = load_model(str(tiny_model_dir), "cpu").eval()
    utility = {r["question"] for r in _rows(PRESET_DIR / "tofu" / "retain_perturbed.json")}
    for role, config in (("forget", "forget01"), ("retain", "retain99"), ("retain_eval", "retain99")):
        nll, n = 0.0, 0
        rows = _rows(PRESET_DIR / "tofu" / f"{config}.json")
        if role != "forget":  # TOFU's utility questions are retain_eval, the rest retain
            rows = [r for r in rows if (r["question"] in utility) == (role == "retain_eval")]
        for row in rows:
            ids = tiny_tokenizer(row["question"] + " " + row["answer"], return_tensors="pt")["input_ids"]
            prompt = tiny_tokenizer(row["question"])["input_ids"]
            start = next(i for i, (x, y) in enumerate(zip(ids[0].tolist(), prompt)) if x != y)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(-1, ids[0, 1:].unsqueeze(-1))[start - 1:].sum())
            n += ids.shape[1] - start
        assert result["baseline"][f"ppl_{role}"] == pytest.approx(math.exp(nll / n), rel=1e-5), role
    assert result["forget_set"]["documents"] == {"forget": 4, "retain": 28, "retain_eval": 8, "unseen": 20, "general": 10}
    assert len(result["milestones"]) == 1 and math.isfinite(result["losses"][-1])
