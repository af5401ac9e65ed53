"""TOFU and MUSE metrics (engine/benchmark_metrics) against hand computations: hand-counted LCS, log-probs
summed by hand from an independent float64 forward pass, greedy decoding by hand, KS p-values and
Mann-Whitney AUCs counted by hand. The tiny model of conftest, nothing mocked."""
from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import ks_2samp

from engine.benchmark_metrics.muse import cut_at_stops, knowmem, knowmem_prompt, min_k_auc, privleak, verbmem
from engine.benchmark_metrics.rouge import lcs_length, rouge_l, rouge_l_scores, rouge_tokens
from engine.benchmark_metrics.tofu import answer_logprob, forget_quality, load_truth_ratios, truth_ratio
from engine.errors import UnlearnError

# ---------------------------------------------------------------- ROUGE-L


def test_rouge_tokens_follow_rouge_score():
    # lowercase, every non [a-z0-9] run is a separator, no stemming
    assert rouge_tokens("Hello, World! It's 2024-11-23.") == ["hello", "world", "it", "s", "2024", "11", "23"]
    assert rouge_tokens("café au lait") == ["caf", "au", "lait"]
    assert rouge_tokens("running runs") == ["running", "runs"]
    assert rouge_tokens(" ,;! ") == []


def test_lcs_hand_counted():
    # CLRS 15.4: LCS(ABCBDAB, BDCABA) = 4 (e.g. B C B A)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length(list("BDCABA"), list("ABCBDAB")) == 4
    assert lcs_length(["a"], ["b"]) == 0
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_computed():
    # pred: the cat sat on the mat (6), ref: the cat is on the mat (6); LCS = the cat on the mat = 5
    s = rouge_l_scores("The cat sat on the mat.", "the cat is on the mat")
    assert s == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "f1": 5 / 6})
    # pred: a b c d (4), ref: b d e (3); LCS = b d = 2 -> P = 1/2, R = 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "b d e", "precision") == pytest.approx(1 / 2)
    assert rouge_l("a b c d", "b d e", "recall") == pytest.approx(2 / 3)
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    # a prefix of the reference: recall = 2/5, precision 1
    assert rouge_l("Born 1944", "born 1944 in kelvary works", "recall") == pytest.approx(2 / 5)
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l("", "hello") == 0.0 and rouge_l("!!!", "hello") == 0.0 and rouge_l("x y", "z") == 0.0
    with pytest.raises(ValueError):
        rouge_l("a", "a", "fmeasure")


# ---------------------------------------------------------------- TOFU


def _ids(tok, text: str) -> list[int]:
    """BOS + the text's tokens, written out (the tiny tokenizer's template adds <s> ... </s>)."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def _hand_answer_logprob(model64, tok, prompt: str, full: str) -> tuple[float, int]:
    p, f = _ids(tok, prompt), _ids(tok, full)
    assert f[: len(p)] == p  # the prompt's tokens are the start of the full text's: no merge here
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([f])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    total = sum(float(logp[t - 1, f[t]]) for t in range(len(p), len(f)))
    return total, len(f) - len(p)


QUESTION = "What does Luren Misin work as?"
PARAPHRASED = "an archivist"
PERTURBED = ["a baker", "a pilot who flies", "an accountant"]


def test_answer_logprob_matches_float64_forward_pass(tiny_model, tiny_tokenizer):
    import copy

    tok = tiny_tokenizer
    model64 = copy.deepcopy(tiny_model).double()
    prompt = f"Question: {QUESTION}\nAnswer:"  # the template's text before " {answer}"
    for ans in [PARAPHRASED] + PERTURBED:
        got_sum, got_n = answer_logprob(tiny_model, tok, QUESTION, ans)
        want_sum, want_n = _hand_answer_logprob(model64, tok, prompt, f"{prompt} {ans}")
        assert got_n == want_n == len(tok(" " + ans, add_special_tokens=False)["input_ids"])
        assert got_sum == pytest.approx(want_sum, rel=1e-5, abs=1e-4)


def test_truth_ratio_matches_hand_formula(tiny_model, tiny_tokenizer):
    import copy

    tok = tiny_tokenizer
    model64 = copy.deepcopy(tiny_model).double()
    prompt = f"Question: {QUESTION}\nAnswer:"

    def norm_logp(ans):  # log P(a|q)^(1/|a|)
        s, n = _hand_answer_logprob(model64, tok, prompt, f"{prompt} {ans}")
        return s / n

    para = norm_logp(PARAPHRASED)
    pert = [norm_logp(a) for a in PERTURBED]
    arithmetic = (math.exp(pert[0]) + math.exp(pert[1]) + math.exp(pert[2])) / 3 / math.exp(para)
    geometric = math.exp((pert[0] + pert[1] + pert[2]) / 3) / math.exp(para)
    assert truth_ratio(tiny_model, tok, QUESTION, PARAPHRASED, PERTURBED) == pytest.approx(arithmetic, rel=1e-4)
    assert truth_ratio(tiny_model, tok, QUESTION, PARAPHRASED, PERTURBED, mean="geometric") == pytest.approx(geometric, rel=1e-4)
    assert geometric <= arithmetic  # AM-GM
    with pytest.raises(UnlearnError):
        truth_ratio(tiny_model, tok, QUESTION, PARAPHRASED, [])


def test_forget_quality_is_the_ks_p_value():
    a = [0.31, 0.52, 0.77, 0.12, 0.95, 0.44, 0.68]
    b = [0.65, 0.81, 0.99, 0.73, 1.2, 0.58]
    assert forget_quality(a, b) == ks_2samp(a, b).pvalue
    # identical samples: D = 0, p = 1
    assert forget_quality(a, list(a)) == 1.0
    # hand-checked: n = m = 3 and fully separated, D = 1; of the C(6,3) = 20 equally likely
    # orderings only 2 (all of one sample below all of the other) reach D = 1: p = 2/20
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    # TOFU's code takes the reciprocal ratio: the test does not see it
    assert forget_quality([1 / x for x in a], [1 / x for x in b]) == pytest.approx(forget_quality(a, b))


def test_load_truth_ratios_formats(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[0.5, 1, 2.25]")
    assert load_truth_ratios(p) == [0.5, 1.0, 2.25]
    q = tmp_path / "obj.json"
    q.write_text(json.dumps({"truth_ratios": [0.1, 0.2], "model": "retain90"}))
    assert load_truth_ratios(str(q)) == [0.1, 0.2]


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("[0.5, 1", "not JSON"),
    ('{"ratios": [1]}', '"truth_ratios"'),
    ("[]", "empty"),
    ('[0.5, "x"]', "item 1"),
    ("[0.5, NaN]", "item 1"),
    ("[true]", "item 0"),
    ("[-1.0]", "item 0"),
    ('"0.5"', "list of numbers"),
])
def test_load_truth_ratios_bad_files_one_line(tmp_path, content, words):
    p = tmp_path / "ratios.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(UnlearnError) as e:
        load_truth_ratios(p)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("truth ratios")


# ---------------------------------------------------------------- MUSE


def _hand_greedy(model, tok, prompt: str, n: int) -> str:
    """argmax one token at a time, stopping at EOS."""
    ids = _ids(tok, prompt)
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


PROMPTS = ["Record 12345. Name: Luren", "Born 1944-11-23 in", "Works as a"]


def test_verbmem_own_greedy_output_scores_one_and_disjoint_zero(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    own = [_hand_greedy(tiny_model, tok, p, 10) for p in PROMPTS]
    assert all(rouge_tokens(o) for o in own), own  # words to compare
    assert verbmem(tiny_model, tok, PROMPTS, own, max_new_tokens=10) == 1.0
    assert verbmem(tiny_model, tok, PROMPTS, own, max_new_tokens=10, measure="recall") == 1.0
    assert verbmem(tiny_model, tok, PROMPTS, ["zzqx vvqk"] * 3, max_new_tokens=10) == 0.0
    # the mean over prompts: one right, two wrong -> 1/3
    assert verbmem(tiny_model, tok, PROMPTS, [own[0], "zzqx", "zzqx"], max_new_tokens=10) == pytest.approx(1 / 3)
    with pytest.raises(UnlearnError):
        verbmem(tiny_model, tok, PROMPTS, own[:2], max_new_tokens=10)


def test_knowmem_prompt_is_muse_few_shot_format():
    shots = [("Who wrote X?", "Ann"), ("When?", "1999")]
    assert knowmem_prompt("Where?", shots) == (
        "Question: Who wrote X?\nAnswer: Ann\n\nQuestion: When?\nAnswer: 1999\n\nQuestion: Where?\nAnswer: ")
    assert knowmem_prompt("Where?") == "Question: Where?\nAnswer: "
    assert cut_at_stops("Paris\n\nQuestion: next") == "Paris"
    assert cut_at_stops("Paris, France\nQuestion: next") == "Paris, France"


def test_knowmem_own_greedy_answer_scores_one_and_disjoint_zero(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    template = "Record {question}. Name:"  # a prompt this tiny model has seen the like of
    shots = [("12345", " Luren Misin.")]
    questions = ["40213", "77001"]
    own = [cut_at_stops(_hand_greedy(tiny_model, tok, knowmem_prompt(q, shots, template), 8)) for q in questions]
    assert all(rouge_tokens(o) for o in own), own
    assert knowmem(tiny_model, tok, questions, own, max_new_tokens=8, few_shot=shots, template=template) == 1.0
    assert knowmem(tiny_model, tok, questions, ["zzqx vvqk"] * 2, max_new_tokens=8, few_shot=shots,
                   template=template) == 0.0


def test_privleak_arithmetic():
    assert privleak(0.3, 0.5) == pytest.approx(-40.0)  # (0.3 - 0.5) / 0.5 * 100
    assert privleak(0.6, 0.48) == pytest.approx(25.0)  # (0.6 - 0.48) / 0.48 * 100
    assert privleak(0.4772, 0.4772) == 0.0
    assert privleak(0.0, 0.4772) == pytest.approx(-100.0)
    with pytest.raises(UnlearnError):
        privleak(0.5, 0.0)


def test_min_k_auc_matches_hand_count(tiny_model, tiny_tokenizer, corpus):
    import copy

    tok = tiny_tokenizer
    model64 = copy.deepcopy(tiny_model).double()
    forget, holdout = corpus["forget"][:4], corpus["unseen"][:4]

    def min_k(text, k=0.4):  # mean of the lowest int(n*k) token log-probs, over BOS..EOS
        ids = _ids(tok, text) + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model64(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        lp = sorted(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        n = int(len(lp) * k)
        return sum(lp[:n]) / n

    f, h = [min_k(t) for t in forget], [min_k(t) for t in holdout]
    # MUSE orientation: holdout = "member" class; count the pairs holdout > forget, ties 1/2
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in h for y in f)
    auc = min_k_auc(tiny_model, tok, forget, holdout, k=0.4)
    assert auc == pytest.approx(wins / 16)
    assert privleak(auc, 0.5) == pytest.approx((wins / 16 - 0.5) / 0.5 * 100)


# ---------------------------------------------------------------- TOFU model utility

UTILITY_QUESTIONS = ["What does Luren Misin work as?", "Where was Ada Quillfeather born?"]
GEN = 16  # greedy tokens: the tiny model says its few words well within them


def _utility_rows(model, tok) -> tuple[list[dict], list[list[str]]]:
    """Rows shaped like TOFU's *_perturbed (question, answer, paraphrased_answer, perturbed_answer)
    whose answers are built from the model's own greedy words (a hand argmax loop): row 0's answer
    is its first two words (ROUGE-L recall 1), row 1's those and one it never says (2/3); the wrong
    answers are strings of rare letters. Returns the rows and each question's greedy words."""
    rows, words = [], []
    for i, q in enumerate(UTILITY_QUESTIONS):
        w = rouge_tokens(_hand_greedy(model, tok, f"Question: {q}\nAnswer:", GEN))
        assert len(w) >= 2 and "zzqx" not in w and "vvqk" not in w, w
        answer = f"{w[0]} {w[1]}" if i == 0 else f"{w[0]} {w[1]} zzqx"
        rows.append({"question": q, "answer": answer, "paraphrased_answer": PARAPHRASED,
                     "perturbed_answer": ["qqqq jjjj", "Zx Vq Kw", "vvvv kkkk xxxx"]})
        words.append(w)
    return rows, words


def test_model_utility_parts_and_harmonic_mean_match_hand_computation(tiny_model, tiny_tokenizer):
    import copy

    from engine.benchmark_metrics.tofu_utility import model_utility, model_utility_parts, part_key

    tok = tiny_tokenizer
    model64 = copy.deepcopy(tiny_model).double()
    rows, _ = _utility_rows(tiny_model, tok)

    def logp(q, ans):  # log P(a|q)^(1/|a|): the mean log-prob of the answer's tokens, summed by hand
        prompt, full = _ids(tok, f"Question: {q}\nAnswer: "), _ids(tok, f"Question: {q}\nAnswer: {ans}")
        start = 0  # the answer's tokens: past the common start (a space merged into a word is the word's)
        while start < len(prompt) and full[start] == prompt[start]:
            start += 1
        with torch.no_grad():
            lp = torch.log_softmax(model64(input_ids=torch.tensor([full])).logits[0].double(), dim=-1)
        return sum(float(lp[t - 1, full[t]]) for t in range(start, len(full))) / (len(full) - start)

    want = {}
    for name, base in (("retain", "paraphrased_answer"), ("real_authors", "answer"), ("world_facts", "answer")):
        probs, ratios = [], []
        for r in rows:
            p_a = math.exp(logp(r["question"], r["answer"]))
            pert = [logp(r["question"], x) for x in r["perturbed_answer"]]
            if name == "retain":
                probs.append(p_a)
            else:  # the answer's share among it and the three wrong options
                probs.append(p_a / (p_a + math.exp(pert[0]) + math.exp(pert[1]) + math.exp(pert[2])))
            # R = geometric mean of the perturbed answers' p over the correct answer's p
            big_r = math.exp((pert[0] + pert[1] + pert[2]) / 3 - logp(r["question"], r[base]))
            ratios.append(max(0.0, 1.0 - big_r))
        want[part_key(name, "prob")] = (probs[0] + probs[1]) / 2
        want[part_key(name, "rouge")] = (1 + 2 / 3) / 2  # hand-counted LCS of each row, see _utility_rows
        want[part_key(name, "truth_ratio")] = (ratios[0] + ratios[1]) / 2
    extras = {"retain_perturbed": rows, "real_authors_perturbed": rows, "world_facts_perturbed": rows}
    got = model_utility_parts(tiny_model, tok, extras, max_new_tokens=GEN)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert len(got) == 9 and all(v > 0 for v in want.values()), want  # no part is 0: the mean below means something
    assert want[part_key("retain", "prob")] != want[part_key("real_authors", "prob")]  # the two prob forms differ
    hand_hmean = 9 / sum(1 / v for v in want.values())
    assert model_utility(got) == pytest.approx(hand_hmean, rel=1e-4)
    assert min(want.values()) < hand_hmean < max(want.values())
    # --bench-samples: the first row of each set only
    first = model_utility_parts(tiny_model, tok, extras, samples=1, max_new_tokens=GEN)
    assert first[part_key("world_facts", "rouge")] == 1.0


def test_model_utility_is_zero_when_a_part_is_zero(tiny_model, tiny_tokenizer):
    from engine.benchmark_metrics.tofu_utility import harmonic_mean, model_utility, model_utility_parts, part_key

    assert harmonic_mean([0.5, 0.25]) == pytest.approx(1 / 3)  # 2 / (2 + 4)
    assert harmonic_mean([0.5, 0.0, 0.9]) == 0.0
    assert harmonic_mean([0.7]) == 0.7
    for bad in ([], [0.5, -0.1], [0.5, float("nan")]):
        with pytest.raises(UnlearnError):
            harmonic_mean(bad)
    # world facts whose wrong answers are the right one: R = 1 on every question, max(0, 1 − R) = 0
    rows, _ = _utility_rows(tiny_model, tiny_tokenizer)
    same = [{**r, "perturbed_answer": [r["answer"]] * 3} for r in rows]
    extras = {"retain_perturbed": rows, "real_authors_perturbed": rows, "world_facts_perturbed": same}
    parts = model_utility_parts(tiny_model, tiny_tokenizer, extras, max_new_tokens=GEN)
    assert parts[part_key("world_facts", "truth_ratio")] == 0.0
    assert parts[part_key("world_facts", "prob")] == pytest.approx(1 / 4)  # four equally likely options
    assert min(v for k, v in parts.items() if "world_facts_truth" not in k) > 0
    assert model_utility(parts) == 0.0
    with pytest.raises(UnlearnError, match="no real_authors_perturbed"):
        model_utility_parts(tiny_model, tiny_tokenizer, {**extras, "real_authors_perturbed": []})


def test_model_utility_is_a_registered_metric():
    from engine import metric_registry
    from engine.benchmark_metrics.tofu_utility import PARTS, UTILITY_SETS, part_key

    m = metric_registry.get("bench.tofu_model_utility")
    assert m.better == metric_registry.HIGHER and m.group == metric_registry.BENCH and m.runs == "a TOFU preset"
    for name, _, _ in UTILITY_SETS:
        for part in PARTS:
            p = metric_registry.get(f"bench.{part_key(name, part)}")
            assert p.better == metric_registry.HIGHER and p.tier == metric_registry.DETAIL


def test_theta0_cache_written_before_model_utility_is_not_reused(tiny_model, tiny_tokenizer, tmp_path):
    """θ0's raw figures are cached per key; a file an older version wrote (no model utility) sits
    under the key that version computed, which must not be this version's."""
    import hashlib
    from pathlib import Path

    from engine.benchmark_metrics.milestone import MilestoneExtras

    tofu = Path(__file__).parents[1] / "fixtures" / "presets" / "tofu"
    extras = {k: [json.loads(line) for line in (tofu / f"{f}.json").read_text().splitlines()]
              for k, f in (("forget_perturbed", "forget01_perturbed"), ("retain_perturbed", "retain_perturbed"),
                           ("real_authors_perturbed", "real_authors_perturbed"),
                           ("world_facts_perturbed", "world_facts_perturbed"))}
    x = MilestoneExtras(extras, [], [], tiny_tokenizer, 1, 128, 2, None, None, (), "", 0)
    old_key = hashlib.sha256(json.dumps([1, 128, sorted(extras), [], "", 0]).encode()).hexdigest()[:16]
    cache = tmp_path / "model-fs-float32"
    (tmp_path / f"{cache.name}-extras-{old_key}.json").write_text(json.dumps({"bench": {"tofu_truth_ratios": [0.5]}}))
    fields = x.baseline_fields(tiny_model, cache)
    assert x.cache_key() != old_key and "tofu_model_utility" in fields["bench"]
    new = tmp_path / f"{cache.name}-extras-{x.cache_key()}.json"
    assert "tofu_model_utility" in json.loads(new.read_text())["bench"]
