"""Benchmark metrics at a run's milestones, on the TOFU and MUSE fixture folders (shaped like the
real datasets): the preset goes into a store, the run is rebuilt from the store alone (extras
included), and θ0's figures equal the engine.benchmark_metrics functions called directly on the model,
with the aggregates (TOFU's min(R, 1/R) mean, forget quality, PrivLeak) written out here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.stats import ks_2samp

PRESET_DIR = Path(__file__).parents[1] / "fixtures" / "presets"


def _stored(tmp_path, preset: str, split: str | None):
    from engine.presets import load_preset
    from studies.store.db import Store
    from studies.store.forgetsets import forget_set_texts, store_forget_set

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    d = load_preset(preset, split, str(PRESET_DIR / preset))
    store_forget_set(store, "fs", d.texts, seq_len=128, meta=d.meta, extras=d.extras)
    texts = forget_set_texts(store, store.forget_set("fs"))
    assert texts.extras == d.extras and texts.hash == d.texts.hash  # extras travel with the set, outside the hash
    return d, texts


def test_tofu_truth_ratio_forget_quality_and_model_utility_at_milestones(tmp_path, tiny_model_dir, tiny_tokenizer):
    from engine.benchmark_metrics.tofu import truth_ratio
    from engine.benchmark_metrics.tofu_utility import model_utility_parts
    from engine.config import RunConfig, RunSettings
    from engine.models import load_model
    from engine.run import run_unlearning

    d, texts = _stored(tmp_path, "tofu", "forget01")
    retain = [0.31, 0.52, 0.77, 0.95, 1.4]
    (tmp_path / "retain.json").write_text(json.dumps({"truth_ratios": retain}))
    cfg = RunConfig.of("ga_gd", 3e-3, (1, 2), RunSettings(batch_size=2, seq_len=128, bench_samples=3,
                                                          tofu_retain_truth_ratios=str(tmp_path / "retain.json")))
    result = run_unlearning(str(tiny_model_dir), texts, cfg, device="cpu", save_to=tmp_path / "out")

    def by_hand(model) -> tuple[list[float], float, float, dict]:
        rows = d.extras["forget_perturbed"][:3]  # --bench-samples 3 of the 4 questions
        ratios = [truth_ratio(model, tiny_tokenizer, r["question"], r["paraphrased_answer"], r["perturbed_answer"],
                              mean="geometric") for r in rows]
        tofu = sum(min(r, 1 / r) for r in ratios) / len(ratios)
        # model utility: the nine parts on the first 3 rows of each utility set, their harmonic mean
        # (0 when one is: the tiny model's greedy answers share no word with these answers)
        cut = {k: v[:3] for k, v in d.extras.items()}
        parts = model_utility_parts(model, tiny_tokenizer, cut)
        parts["tofu_model_utility"] = 0.0 if 0 in parts.values() else 9 / sum(1 / v for v in parts.values())
        return ratios, tofu, ks_2samp(ratios, retain).pvalue, parts

    ratios, tofu, fq, utility = by_hand(load_model(str(tiny_model_dir), "cpu").eval())
    b = result["baseline"]["bench"]
    assert b["tofu_truth_ratios"] == pytest.approx(ratios, rel=1e-9) and len(ratios) == 3
    assert b["tofu_truth_ratio"] == pytest.approx(tofu, rel=1e-9) and 0 < tofu <= 1
    assert b["tofu_forget_quality"] == pytest.approx(fq, rel=1e-9)
    assert {k: b[k] for k in utility} == pytest.approx(utility, rel=1e-9) and len(utility) == 10
    assert utility["tofu_mu_real_authors_prob"] > 0 and utility["tofu_mu_world_facts_truth_ratio"] > 0
    for cell in result["milestones"]:
        assert set(cell["bench"]) == {"tofu_truth_ratio", "tofu_forget_quality", *utility}
        assert all(math.isfinite(v) for v in cell["bench"].values())
    _, tofu2, fq2, utility2 = by_hand(load_model(str(tmp_path / "out"), "cpu").eval())  # the last milestone's model
    assert result["milestones"][-1]["bench"] == pytest.approx({"tofu_truth_ratio": tofu2, "tofu_forget_quality": fq2,
                                                               **utility2}, rel=1e-6)


def test_muse_verbmem_knowmem_privleak_at_milestones(tmp_path, tiny_model_dir, tiny_tokenizer):
    from engine.benchmark_metrics.muse import knowmem, min_k_auc, verbmem
    from engine.config import RunConfig, RunSettings
    from engine.models import load_model
    from engine.run import run_unlearning

    d, texts = _stored(tmp_path, "muse-news", None)
    cfg = RunConfig.of("ga", 3e-3, (1,), RunSettings(batch_size=2, seq_len=128, bench_samples=3,
                                                     muse_retrained_auc=0.48))
    result = run_unlearning(str(tiny_model_dir), texts, cfg, device="cpu")
    model = load_model(str(tiny_model_dir), "cpu").eval()
    x = d.extras
    verb = x["verbmem_forget"][:3]
    want = {"muse_verbmem_f": verbmem(model, tiny_tokenizer, [r["prompt"] for r in verb], [r["gt"] for r in verb])}
    for role, short in (("forget", "f"), ("retain", "r")):
        qa, icl = x[f"knowmem_{role}_qa"][:3], x[f"knowmem_{role}_qa_icl"]
        want[f"muse_knowmem_{short}"] = knowmem(model, tiny_tokenizer, [r["question"] for r in qa],
                                                [r["answer"] for r in qa],
                                                few_shot=[(r["question"], r["answer"]) for r in icl])
    auc = min_k_auc(model, tiny_tokenizer, d.texts.forget[:3], d.texts.unseen[:3], max_tokens=128)
    want |= {"muse_auc": auc, "muse_privleak": (auc - 0.48) / 0.48 * 100}
    assert result["baseline"]["bench"] == pytest.approx(want, rel=1e-9)
    cell = result["milestones"][0]["bench"]
    assert set(cell) == set(want) and all(math.isfinite(v) for v in cell.values())
    assert cell["muse_privleak"] == pytest.approx((cell["muse_auc"] - 0.48) / 0.48 * 100)


def test_bench_settings_are_checked_in_one_line(tmp_path):
    from engine.config import RunSettings
    from engine.errors import UnlearnError

    for kwargs, needle in (({"tofu_retain_truth_ratios": str(tmp_path / "no.json")}, "no such file"),
                           ({"muse_retrained_auc": 1.5}, "AUC in (0, 1]"),
                           ({"bench_samples": -1}, "--bench-samples"),
                           ({"eval_tasks_dir": str(tmp_path)}, "need --eval-tasks"),
                           ({"eval_tasks": "arc easy"}, "not a task name")):
        with pytest.raises(UnlearnError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            RunSettings(**kwargs).validate()
    s = RunSettings(eval_tasks=" arc_easy, piqa,arc_easy", eval_tasks_dir=str(tmp_path)).validate()
    assert s.eval_tasks == "arc_easy,piqa" and s.eval_tasks_dir == str(tmp_path)
    assert "--eval-tasks" in s.to_flags() and "--muse-retrained-auc" not in s.to_flags()


def test_heatmap_and_picker_offer_bench_metrics_only_where_cells_have_them(tmp_path, capsys, tiny_model_dir,
                                                                           forget_set_files):
    from sqlmodel import select

    from engine.metric_registry import every_run_paths
    from studies.reading.grid import load_cells, study_metrics
    from studies.store.db import CellRow, Run, Store
    from studies.store.states import RunState
    from tests.studies_helpers import cli_in_process, make_forget_set

    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    p = cli_in_process(capsys, "study", "create", "S", "--model", str(tiny_model_dir), "--forget-set", "fs",
                       "--methods", "ga", "--lr", "1e-3", "--steps", "1,2", "--storage", url)
    assert p.returncode == 0, p.stderr
    spec = store.study("S").spec
    assert study_metrics(spec, load_cells(store, "S")) == every_run_paths()  # a plain set: no bench.* offered
    with store.write() as s:
        run = s.exec(select(Run)).one()
        run.state = RunState.DONE
        s.add(CellRow(run_id=run.id, step=1, metrics={"score": 0.5, "bench": {"tofu_truth_ratio": 0.7,
                                                                               "tofu_model_utility": 0.4}}, score=0.5))
        s.add(CellRow(run_id=run.id, step=2, metrics={"score": 0.4, "bench": {"tofu_truth_ratio": 0.9}}, score=0.4))
    assert study_metrics(spec, load_cells(store, "S")) == every_run_paths() + ("bench.tofu_truth_ratio",
                                                                               "bench.tofu_model_utility")
    p = cli_in_process(capsys, "study", "heatmap", "S", "--metric", "bench.tofu_truth_ratio", "--json", "--storage", url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ga"]["values"] == [[0.7, 0.9]]
    p = cli_in_process(capsys, "study", "heatmap", "S", "--metric", "bench.tofu_model_utility", "--json", "--storage", url)
    assert p.returncode == 0 and json.loads(p.stdout)["ga"]["values"] == [[0.4, None]], p.stderr
    p = cli_in_process(capsys, "study", "heatmap", "S", "--metric", "bench.tofu_truth_ratio", "--storage", url)
    assert p.returncode == 0 and "higher = greener" in p.stdout, p.stdout
