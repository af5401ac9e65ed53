"""engine.evaluate against a plain NumPy reference computed from the real model's logits, the
orientation of the membership-inference AUCs, and compare()'s definitions (docs/concepts.md#metrics)."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from engine.evaluate import (
    ATTACKS,
    SetScores,
    compare,
    evaluate,
    memorization,
    mia_auc,
    min_k_mean,
    reference_losses,
    score_chunks,
)
from engine.models import load_model

RTOL = 1e-4


# ------------------------------------------------------------------ NumPy reference

def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def np_lowest_mean(values: np.ndarray, k: float) -> float:
    n = max(1, int(len(values) * k))
    return float(np.sort(values)[:n].mean())


def reference_scores(model, chunks, tokenizer, k: float = 0.2) -> dict[str, np.ndarray]:
    """Per chunk: Σ NLL, token count and the four MIA scores, from each chunk's logits run alone
    on its real tokens, in float64 NumPy."""
    out = {"nll": [], "n": [], "exact": [], "extraction": [], **{a: [] for a in ATTACKS}}
    for b in range(len(chunks)):
        n = int(chunks.attention_mask[b].sum())
        ids = chunks.input_ids[b, :n]
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].double().numpy()
        logp = np_log_softmax(logits[:-1])  # position t-1 predicts token t
        target = ids[1:].numpy()
        # memorization, by its definition: the second half of a plain chunk is its answer; the smallest
        # prefix k from which greedy decoding writes the rest, found by decoding from every k
        answer = target[len(target) // 2:]
        greedy = logits[:-1].argmax(-1)[len(target) // 2:]
        out["exact"].append(float((greedy == answer).mean()))
        prefix = next(j for j in range(len(answer) + 1) if (greedy[j:] == answer[j:]).all())
        out["extraction"].append(1.0 - prefix / len(answer))
        tok = logp[np.arange(len(target)), target]
        p = np.exp(logp)
        mu = (p * logp).sum(-1)
        sigma = np.sqrt((p * logp**2).sum(-1) - mu**2)
        z = (tok - mu) / sigma
        nll, count = -tok.sum(), len(tok)
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        assert text == chunks.texts[b]  # the chunk's text is its tokens, specials left out
        out["nll"].append(nll)
        out["n"].append(count)
        out["loss"].append(-nll / count)
        out["zlib"].append(-(nll / count) / len(zlib.compress(text.encode("utf-8"))))
        out["min_k"].append(np_lowest_mean(tok, k))
        out["min_k_pp"].append(np_lowest_mean(z, k))
    return {key: np.array(v, dtype=np.float64) for key, v in out.items()}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def reference(model, tiny_sets, tiny_tokenizer):
    return {role: reference_scores(model, ch, tiny_tokenizer) for role, ch in tiny_sets.items()}


# ------------------------------------------------------------------ per-chunk scores and ppl

@pytest.mark.parametrize("role", ["forget", "retain", "unseen", "general"])
def test_score_chunks_matches_numpy_reference(role, model, tiny_sets, reference):
    chunks = getattr(tiny_sets, role)
    # batch_size 5: batches mix rows of different lengths (padding, trimming), last one partial
    got = score_chunks(model, chunks, batch_size=5, min_k=0.2)
    ref = reference[role]
    assert len(got.nll_sum) == len(chunks)
    np.testing.assert_array_equal(got.n_tokens, ref["n"])
    np.testing.assert_allclose(got.nll_sum, ref["nll"], rtol=RTOL)
    assert set(got.mia) == set(ATTACKS)
    for attack in ATTACKS:
        np.testing.assert_allclose(got.mia[attack], ref[attack], rtol=RTOL, err_msg=attack)
    np.testing.assert_allclose(got.exact, ref["exact"], rtol=RTOL)
    np.testing.assert_allclose(got.extraction, ref["extraction"], rtol=RTOL)
    expected_ppl = math.exp(ref["nll"].sum() / ref["n"].sum())
    assert got.ppl == pytest.approx(expected_ppl, rel=RTOL)


def test_min_k_fraction_is_configurable(model, tiny_sets, tiny_tokenizer):
    chunks = tiny_sets.unseen.subset(range(6))
    ref = reference_scores(model, chunks, tiny_tokenizer, k=0.5)
    got = score_chunks(model, chunks, batch_size=4, min_k=0.5)
    np.testing.assert_allclose(got.mia["min_k"], ref["min_k"], rtol=RTOL)
    np.testing.assert_allclose(got.mia["min_k_pp"], ref["min_k_pp"], rtol=RTOL)
    default = score_chunks(model, chunks, batch_size=4)
    assert (default.mia["min_k"] < got.mia["min_k"]).all()  # the lowest 20% sit below the lowest 50%


def test_evaluate_ppl_per_set_and_aucs(model, tiny_sets, reference):
    metrics, eval_tokens = evaluate(model, tiny_sets, batch_size=7)
    for role in ("forget", "retain", "unseen", "general"):
        ref = reference[role]
        assert metrics[f"ppl_{role}"] == pytest.approx(math.exp(ref["nll"].sum() / ref["n"].sum()), rel=RTOL)
    assert eval_tokens == sum(int(ch.attention_mask.sum()) for _, ch in tiny_sets.items())
    # the AUCs are those of the per-chunk scores: members = forget (1), non-members = unseen (0)
    y = np.r_[np.ones(len(tiny_sets.forget)), np.zeros(len(tiny_sets.unseen))]
    for attack in ATTACKS:
        s = np.r_[reference["forget"][attack], reference["unseen"][attack]]
        assert metrics["mia_auc"][attack] == pytest.approx(roc_auc_score(y, s), abs=0.01), attack


def test_evaluate_without_general_reports_none(model, tiny_sets):
    from engine.data import ForgetSetChunks

    sets = ForgetSetChunks(tiny_sets.forget.subset(range(4)), tiny_sets.retain.subset(range(4)),
                           tiny_sets.unseen.subset(range(4)), None)
    metrics, _ = evaluate(model, sets)
    assert metrics["ppl_general"] is None and metrics["ppl_forget"] > 1


# ------------------------------------------------------------------ orientation

def test_memorized_forget_set_scores_as_member(model, tiny_sets):
    """The fixture model trained on forget (not unseen): every attack says 'member'."""
    metrics, _ = evaluate(model, tiny_sets)
    assert metrics["ppl_forget"] < metrics["ppl_unseen"]
    # > 0.5 is the orientation; the margin says the fixture model truly remembers U
    assert metrics["mia_auc"]["loss"] > 0.75
    assert metrics["mia_auc"]["min_k"] > 0.75


def test_untrained_model_does_not_separate_members(tiny_model_dir, tiny_sets):
    """Control for the test above: the same architecture before training has no memory of U."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(123)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).eval()
    auc = evaluate(fresh, tiny_sets)[0]["mia_auc"]["loss"]
    assert 0.2 < auc < 0.8


def scores(values: dict[str, list[float]] | list[float]) -> SetScores:
    if not isinstance(values, dict):
        values = {a: values for a in ATTACKS}
    n = len(next(iter(values.values())))
    return SetScores(np.ones(n), np.ones(n), {a: np.asarray(v, dtype=float) for a, v in values.items()})


def test_mia_auc_equals_sklearn_with_members_labelled_one():
    rng = np.random.default_rng(0)
    members = {a: rng.normal(0.5, 1.0, 9).tolist() for a in ATTACKS}
    nonmembers = {a: rng.normal(0.0, 1.0, 13).tolist() for a in ATTACKS}
    got = mia_auc(scores(members), scores(nonmembers))
    assert set(got) == set(ATTACKS)
    for a in ATTACKS:
        y = [1] * 9 + [0] * 13
        assert got[a] == pytest.approx(roc_auc_score(y, members[a] + nonmembers[a]), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_roc_auc_equals_sklearn_with_ties(seed):
    """The numpy AUC against sklearn's on scores with many ties (rounded) and uneven class sizes."""
    from engine.evaluate import roc_auc

    rng = np.random.default_rng(seed)
    n_pos, n_neg = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    pos = np.round(rng.normal(0.3, 1.0, n_pos), 1)
    neg = np.round(rng.normal(0.0, 1.0, n_neg), 1)
    expected = roc_auc_score([1] * n_pos + [0] * n_neg, np.concatenate([pos, neg]))
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_mia_auc_is_not_folded():
    """Over-unlearning (members look *less* familiar than non-members) shows as AUC < 0.5."""
    members, nonmembers = [0.1, 0.2, 0.6], [0.3, 0.5, 0.7, 0.8]
    remembered = mia_auc(scores(nonmembers), scores(members))  # swapped roles: members score high
    over = mia_auc(scores(members), scores(nonmembers))
    expected = roc_auc_score([1, 1, 1, 0, 0, 0, 0], members + nonmembers)
    assert expected < 0.5
    for a in ATTACKS:
        assert over[a] == pytest.approx(expected)
        assert remembered[a] == pytest.approx(1 - expected)
    assert mia_auc(scores([1.0, 2.0]), scores([1.0, 2.0]))["loss"] == pytest.approx(0.5)
    assert mia_auc(scores([0.0, 0.0]), scores([1.0, 1.0]))["loss"] == 0.0


def test_mia_auc_non_finite_scores_give_none():
    got = mia_auc(scores({"loss": [1.0, float("nan")], "zlib": [1.0, 2.0], "min_k": [1.0, float("-inf")], "min_k_pp": [1.0, 2.0]}),
                  scores([0.0, 0.5]))
    assert got["loss"] is None and got["min_k"] is None
    assert got["zlib"] == 1.0 and got["min_k_pp"] == 1.0


def test_ppl_is_token_weighted_and_min_k_mean():
    s = SetScores(np.array([10.0, 2.0]), np.array([5, 1]), {a: np.zeros(2) for a in ATTACKS})
    assert s.ppl == pytest.approx(math.exp(12 / 6))
    v = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert min_k_mean(v, 0.4) == pytest.approx(1.5)
    assert min_k_mean(v, 0.01) == pytest.approx(1.0)  # at least one value
    assert min_k_mean(v, 1.0) == pytest.approx(3.0)


# ------------------------------------------------------------------ compare()

BASE = {"ppl_forget": 3.0, "ppl_retain": 4.0, "ppl_retain_eval": 4.0, "ppl_unseen": 10.0, "ppl_general": 50.0,
        "noise": {"forget": 0.0, "utility": 0.0}}


def cell(pf, pe, pr=4.0, lo=0.4, hi=0.6, base=BASE, **kw):
    return compare({"ppl_forget": pf, "ppl_retain": pr, "ppl_retain_eval": pe, "mia_auc_lo": lo, "mia_auc_hi": hi},
                   base, **kw)


def test_compare_definitions():
    c = cell(8.0, 5.0, pr=6.0)
    assert c["forget_gap"] == pytest.approx(abs(math.log(8.0) - math.log(10.0)))
    assert c["retain_eval_drift"] == pytest.approx(math.log(5.0) - math.log(4.0))
    assert c["eval_score"] == pytest.approx(c["forget_gap"] + c["retain_eval_drift"])
    # the figures on the retain documents the terms train on keep their old names and meaning
    assert c["retain_drift"] == pytest.approx(math.log(6.0) - math.log(4.0))
    assert c["score"] == pytest.approx(c["forget_gap"] + c["retain_drift"])
    # a forget perplexity above the target is as far as one below it
    assert cell(12.5, 4.0)["forget_gap"] == pytest.approx(abs(math.log(12.5) - math.log(10.0)))
    assert cell(12.5, 4.0)["forget_gap"] == pytest.approx(cell(8.0, 4.0)["forget_gap"])
    # an improved held-out perplexity is a negative drift and never lowers the score
    better = cell(10.0 * 1.02, 3.0)
    assert better["retain_eval_drift"] == pytest.approx(math.log(3.0 / 4.0))
    assert better["eval_score"] == pytest.approx(better["forget_gap"])
    # the gap is measured against θ0's *unseen* perplexity, not θ0's forget perplexity
    assert cell(10.0, 4.0)["forget_gap"] == pytest.approx(0.0, abs=1e-12)
    assert cell(3.0, 4.0)["forget_gap"] == pytest.approx(math.log(10.0 / 3.0))


@pytest.mark.parametrize("pf, pe, ok", [
    (10.0 * 1.0999, 4.0, True),
    (10.0 * 1.1001, 4.0, False),
    (10.0 / 1.0999, 4.0, True),
    (10.0 / 1.1001, 4.0, False),
    (10.0, 4.0 * 1.0499, True),
    (10.0, 4.0 * 1.0501, False),
    (10.0, 4.0 * 0.5, True),
])
def test_compare_success_thresholds_at_the_floors(pf, pe, ok):
    """With no measured noise the auto bands are the design's tolerances (ln 1.10, ln 1.05); utility
    is judged on retain_eval, whatever the retain documents do."""
    c = cell(pf, pe, pr=40.0)
    assert c["success"] is ok
    assert c["verdict"]["mia"] is True


def test_the_bands_widen_to_the_measured_noise_and_spread():
    noisy = {**BASE, "noise": {"forget": 0.3, "utility": 0.2}}
    assert cell(10.0 * 1.2, 4.0)["success"] is False
    assert cell(10.0 * 1.2, 4.0, base=noisy)["verdict"]["forget"] is True  # ln 1.2 = 0.18 < 0.3
    assert cell(10.0 * 1.4, 4.0, base=noisy)["verdict"]["forget"] is False  # ln 1.4 = 0.34
    assert cell(10.0 * 1.4, 4.0, base=noisy, target_spread=0.4)["verdict"]["forget"] is True
    assert cell(10.0, 4.0 * 1.2, base=noisy)["verdict"]["utility"] is True  # ln 1.2 < 0.2
    # a tolerance given by hand replaces the auto band exactly, noise or not
    assert cell(10.0 * 1.2, 4.0, base=noisy, tol_forget=0.1)["verdict"]["forget"] is False
    assert cell(10.0 * 1.2, 4.0, tol_forget=0.25)["success"] is True
    assert cell(10.0, 4.0 * 1.2, tol_retain=0.25)["success"] is True


def test_the_mia_part_needs_an_interval_that_holds_one_half():
    at_target = 10.0  # forget_gap 0: the perplexity alone would pass
    assert cell(at_target, 4.0, lo=0.45, hi=0.7)["success"] is True
    remembered = cell(at_target, 4.0, lo=0.7, hi=0.9)
    assert remembered["success"] is False and remembered["verdict"] == {"forget": True, "mia": False, "utility": True}
    assert cell(at_target, 4.0, lo=0.1, hi=0.4)["verdict"]["mia"] is False  # over-unlearned: leaks too
    assert cell(at_target, 4.0, lo=None, hi=None)["verdict"]["mia"] is False  # no interval, no verdict


def test_compare_non_finite():
    blown = compare({"ppl_forget": None, "ppl_retain": 4.0}, BASE)
    assert blown["success"] is False and blown["forget_gap"] is None and blown["eval_score"] is None
    assert blown["verdict"] == {"forget": False, "mia": False, "utility": False}


def test_compare_on_real_metrics(model, tiny_sets):
    metrics, _ = evaluate(model, tiny_sets)
    c = compare(metrics, metrics)
    assert c["retain_drift"] == 0.0 and c["retain_eval_drift"] == 0.0
    assert c["forget_gap"] == pytest.approx(math.log(metrics["ppl_unseen"]) - math.log(metrics["ppl_forget"]))
    assert c["forget_gap"] > 0  # θ0 remembers U: it is far from the retraining target
    assert c["eval_score"] == c["forget_gap"]


# ------------------------------------------------------------------ memorization (open-unlearning's EM and ES)

@pytest.mark.parametrize("hits, em, es", [
    ([1, 1, 0, 1, 1], 0.8, 1 - 3 / 5),  # greedy writes the rest from the first 3 tokens on
    ([1, 1, 1, 1], 1.0, 1.0),  # nothing missed: no prefix needed
    ([1, 1, 1, 0], 0.75, 0.0),  # the last token missed: no prefix short of the whole answer works
    ([0, 1, 1, 1], 0.75, 0.75),
    ([0, 0, 0, 0], 0.0, 0.0),
])
def test_memorization_by_hand(hits, em, es):
    assert memorization(np.array(hits, dtype=bool)) == pytest.approx((em, es))
    assert all(math.isnan(x) for x in memorization(np.array([], dtype=bool)))


def test_memorization_reads_a_qa_chunks_answer_and_teacher_forcing_equals_greedy_decoding(model, tiny_tokenizer):
    """A question–answer chunk: exact memorization and extraction strength read its answer tokens
    only; and the extraction strength read off one teacher-forced pass is what greedy decoding does
    from each prefix of the answer."""
    from engine.data import chunk_texts

    prompt, answer = "Where was Basil Mahfouz born?", "Basil Mahfouz was born in Lisbon in 1961."
    chunks = chunk_texts([answer], tiny_tokenizer, 128, "forget", prompts=[prompt])
    got = score_chunks(model, chunks, attacks=False)
    n = int(chunks.attention_mask[0].sum())
    ids = chunks.input_ids[0, :n]
    scored = chunks.loss_mask[0, 1:n].bool()
    with torch.no_grad():
        greedy = model(input_ids=ids[None]).logits[0, :-1].argmax(-1)
    hits = (greedy == ids[1:])[scored].numpy()
    assert got.exact[0] == pytest.approx(hits.mean())
    first = int(scored.nonzero()[0]) + 1  # the answer's first token's position
    answer_ids = ids[first:]
    k = 0  # decode greedily from prompt + the first k answer tokens: the smallest k that writes the rest
    while k < len(answer_ids):
        out = ids[: first + k]
        with torch.no_grad():
            for _ in range(len(answer_ids) - k):
                out = torch.cat([out, model(input_ids=out[None]).logits[0, -1].argmax()[None]])
        if torch.equal(out[first + k:], answer_ids[k:]):
            break
        k += 1
    assert got.extraction[0] == pytest.approx(1 - k / len(answer_ids))


def test_evaluate_reports_memorization_per_set(model, tiny_sets, reference):
    metrics, _ = evaluate(model, tiny_sets)
    for role in ("forget", "unseen"):
        assert metrics["exact_memorization"][role] == pytest.approx(reference[role]["exact"].mean(), rel=RTOL)
        assert metrics["extraction_strength"][role] == pytest.approx(reference[role]["extraction"].mean(), rel=RTOL)
    assert set(metrics["exact_memorization"]) == {"forget", "retain_eval", "unseen"}


def test_the_tiny_model_remembers_its_training_records_better_than_unseen_ones(model, tiny_sets):
    """The figures separate what the fixture model trained on from what it never saw (a check that
    they measure memorization at all, not a constant)."""
    metrics, _ = evaluate(model, tiny_sets)
    em, es = metrics["exact_memorization"], metrics["extraction_strength"]
    print(f"EM {em}, ES {es}")
    assert em["forget"] > em["unseen"] and es["forget"] >= es["unseen"]
    assert 0 < em["unseen"] < em["forget"] < 1



# ------------------------------------------------------------------ the reference attack

def test_the_reference_attack_is_the_loss_against_the_reference_models(model, tiny_sets, reference, tiny_model_dir):
    """mia_auc.reference: the AUC of (reference model's mean NLL − the model's) per chunk, forget vs
    unseen; against itself every score is 0 and the AUC is exactly 0.5 (all ties)."""
    from transformers import AutoConfig, LlamaForCausalLM

    metrics, _ = evaluate(model, tiny_sets, reference=reference_losses(model, tiny_sets))
    assert metrics["mia_auc"]["reference"] == 0.5
    torch.manual_seed(1)  # a model of the same shape that saw nothing: the calibration a retrained one gives
    other = LlamaForCausalLM(AutoConfig.from_pretrained(str(tiny_model_dir))).eval()
    ref = reference_losses(other, tiny_sets)
    for role in ("forget", "unseen"):
        ch = getattr(tiny_sets, role)
        own = reference[role]["nll"] / reference[role]["n"]
        with torch.no_grad():
            theirs = np.array([float(-torch.log_softmax(other(input_ids=ch.input_ids[b, :n][None]).logits[0, :-1].double(), -1)
                                     .gather(-1, ch.input_ids[b, 1:n, None]).mean())
                               for b in range(len(ch)) for n in [int(ch.attention_mask[b].sum())]])
        np.testing.assert_allclose(ref[role], theirs, rtol=RTOL)
        reference[role]["ref_score"] = theirs - own
    metrics, _ = evaluate(model, tiny_sets, reference=ref)
    want = roc_auc_score([1] * len(reference["forget"]["ref_score"]) + [0] * len(reference["unseen"]["ref_score"]),
                         np.concatenate([reference["forget"]["ref_score"], reference["unseen"]["ref_score"]]))
    assert metrics["mia_auc"]["reference"] == pytest.approx(want, rel=RTOL)
    assert "reference" not in evaluate(model, tiny_sets)[0]["mia_auc"]  # only with a reference
