"""DPO, IdkDPO and IdkNLL: each loss and its gradient against a float64 computation written here (plain
loops over the predicted tokens, independent of engine.methods.base), the sign convention, DPO's value
at θ = θ0, the rule that trims a second prepared sequence by its own mask, the two sides of a chunk
(question–answer and plain text), the chosen answer that is never the forget answer, the seeded
refusals, blindness to a prompt's logits, two steps on the tiny model with the prefix property, the
memory plan's count of DPO's sequences and `unlearn methods --json`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.data import Chunks, chunk_texts
from engine.errors import UnlearnError
from engine.methods import get_method
from engine.methods.base import IGNORE
from engine.methods.dpo import DPOForget, IdkDPOForget, prompt_lengths, refusal_token_ids, refusals
from engine.methods.idk_nll import IdkDescent
from engine.models import load_model
from engine.run import _Run
from tests.engine.test_ce_u_satimp import qa_labels, step
from tests.engine.test_methods import ctx_for, hand_batch, predicted_positions, two_steps_sharing_the_first

# Losses are read as numbers with float() while they still carry their graph (some tests then
# take the gradient): torch's warning about that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

METHODS = ["dpo", "idk_dpo", "idk_nll"]
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ float64 references

def seq_logprob64(logits, labels) -> list[float]:
    """Σ_t log p(y_t) per row, float64, one (row, position) at a time."""
    logp = torch.log_softmax(logits.detach().double(), -1)
    out = [0.0] * labels.size(0)
    rows, pos = predicted_positions(labels)
    for b, t in zip(rows.tolist(), pos.tolist()):
        out[b] += float(logp[b, t - 1, labels[b, t]])
    return out


def grad_logprob64(logits, labels, b) -> torch.Tensor:
    """∂ log π(row b) / ∂ logits: onehot(y_t) − p_t at every position t−1 that predicts a label of row b."""
    p = torch.softmax(logits.detach().double(), -1)
    g = torch.zeros_like(p)
    rows, pos = predicted_positions(labels)
    for r, t in zip(rows.tolist(), pos.tolist()):
        if r == b:
            g[b, t - 1] -= p[b, t - 1]
            g[b, t - 1, labels[b, t]] += 1.0
    return g


def ref_dpo(logits, rejected, chosen, ref_r, ref_c, beta) -> tuple[float, torch.Tensor]:
    """(−(2/β)·mean log σ(β·m_i), ∂/∂logits), m_i = (lp_c − ref_c) − (lp_r − ref_r); logits hold the B
    rejected rows then the B chosen rows. ∂L/∂m_i = −(2/B)·σ(−β·m_i)."""
    n = rejected.size(0)
    width = logits.size(1)

    def wide(labels):
        return torch.cat([labels, torch.full((n, width - labels.size(1)), IGNORE)], 1)

    lr, lc = wide(rejected), wide(chosen)
    lp_r = seq_logprob64(logits[:n], lr)
    lp_c = seq_logprob64(logits[n:], lc)
    total, grad = 0.0, torch.zeros(logits.shape, dtype=torch.float64)
    for i in range(n):
        m = (lp_c[i] - float(ref_c[i])) - (lp_r[i] - float(ref_r[i]))
        total += -(2.0 / beta) * -math.log1p(math.exp(-beta * m))  # log σ(x) = −log(1 + e^−x)
        w = -(2.0 / n) / (1.0 + math.exp(beta * m))  # −(2/B)·σ(−βm)
        grad[n + i] += w * grad_logprob64(logits[n:], lc, i)[i]
        grad[i] -= w * grad_logprob64(logits[:n], lr, i)[i]
    return total / n, grad


def ref_nll(logits, labels) -> tuple[float, torch.Tensor]:
    """(−mean_t log p(y_t), ∂/∂logits = (p − onehot)/N)."""
    rows, pos = predicted_positions(labels)
    p = torch.softmax(logits.detach().double(), -1)
    total, grad = 0.0, torch.zeros_like(p)
    for b, t in zip(rows.tolist(), pos.tolist()):
        total -= math.log(float(p[b, t - 1, labels[b, t]]))
        grad[b, t - 1] += p[b, t - 1]
        grad[b, t - 1, labels[b, t]] -= 1.0
    return total / len(rows), grad / len(rows)


def pair_batch(seed: int, beta_scale: float = 1.0):
    """A hand-built DPO batch: 3 rejected rows of width 9 and 3 chosen rows of width 7 (right-padded,
    different lengths), their stacked logits [6, 9, 13] (padding logits random: they must not count), and
    reference log-probs near the rows' own."""
    logits, rejected = hand_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    chosen = torch.randint(13, (3, 7), generator=g)
    for b, n in enumerate([7, 5, 3]):
        chosen[b, n:] = IGNORE
    stacked = torch.randn(6, 9, 13, generator=g) * 3
    stacked[:3] = logits.detach()
    ref_r = torch.tensor(seq_logprob64(logits, rejected)).float() + torch.randn(3, generator=g) * beta_scale
    ref_c = torch.tensor(seq_logprob64(stacked[3:, :7], chosen)).float() + torch.randn(3, generator=g) * beta_scale
    batch = {"input_ids": rejected.clamp(min=0), "attention_mask": (rejected != IGNORE).long(), "labels": rejected,
             "chosen_input_ids": chosen.clamp(min=0), "chosen_attention_mask": (chosen != IGNORE).long(),
             "chosen_labels": chosen, "ref_logprob": ref_r, "chosen_ref_logprob": ref_c}
    return stacked.requires_grad_(), batch


# ------------------------------------------------------------------ the losses

@pytest.mark.parametrize("beta", [0.1, 1.0, 0.01])
def test_dpo_loss_and_gradient_against_float64_and_its_sign(beta):
    logits, batch = pair_batch(70)
    got = DPOForget(beta).loss(logits, batch)
    want, want_grad = ref_dpo(logits, batch["labels"], batch["chosen_labels"], batch["ref_logprob"],
                              batch["chosen_ref_logprob"], beta)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    # the sign: a descent step raises every chosen sequence's log-prob and lowers every rejected one's
    moved = step(logits, logits.grad, lr=0.05)
    wide = torch.full((3, 9), IGNORE)
    wide[:, :7] = batch["chosen_labels"]
    before_r, after_r = seq_logprob64(logits[:3], batch["labels"]), seq_logprob64(moved[:3], batch["labels"])
    before_c, after_c = seq_logprob64(logits[3:], wide), seq_logprob64(moved[3:], wide)
    assert all(a < b for a, b in zip(after_r, before_r)) and all(a > b for a, b in zip(after_c, before_c))


def test_dpo_at_theta0_is_2_over_beta_log_2_with_half_weights():
    """With π_θ = π_θ0 (reference log-probs = the rows' own) the margin is 0: L = (2/β)·log 2 and the
    gradient is that of −(1/B)·Σ(log π(c_i) − log π(r_i))."""
    logits, batch = pair_batch(71, beta_scale=0.0)
    for beta in (0.1, 0.5):
        logits.grad = None
        got = DPOForget(beta).loss(logits, batch)
        assert float(got) == pytest.approx(2.0 / beta * math.log(2.0), rel=1e-6)
        got.backward()
        _, want_grad = ref_dpo(logits, batch["labels"], batch["chosen_labels"], batch["ref_logprob"],
                               batch["chosen_ref_logprob"], beta)
        torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    # at margin 0 every pair pushes with weight 2σ(0) = 1: the gradient is independent of β
    assert float(want_grad[4].abs().sum()) > 0


def test_idk_nll_loss_and_gradient_against_float64_and_its_sign():
    logits, labels = hand_batch(72)
    batch = {"labels": hand_batch(73)[1], "chosen_labels": labels}  # the rejected labels are not read
    got = IdkDescent().loss(logits, batch)
    want, want_grad = ref_nll(logits, labels)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    # the sign: a descent step raises the refusal's likelihood, every token of it
    before, after = seq_logprob64(logits, labels), seq_logprob64(step(logits, logits.grad), labels)
    assert all(a > b for a, b in zip(after, before))
    assert float(got) > 0  # an NLL: bounded below by 0, nothing to run away with


def test_knobs_weights_and_errors():
    for mid in ("dpo", "idk_dpo"):
        m = get_method(mid)
        assert (m.forget_weight, m.retain_weight, m.retain_source, m.retain.id) == (1.0, 1.0, "retain", "descent")
        assert m.knob_values() == {"beta": 0.1, "forget_weight": 1.0, "retain_weight": 1.0, "saliency": 0.0}
        v = get_method(f"{mid}[beta=0.5]")
        assert (v.forget.beta, type(v.forget), v.id) == (0.5, type(m.forget), f"{mid}[beta=0.5]")
        for bad in ("0.0", "-1.0"):
            with pytest.raises(UnlearnError, match=f"^{mid}: beta must be above 0, not") as e:
                get_method(f"{mid}[beta={bad}]")
            assert "\n" not in str(e.value)
    m = get_method("idk_nll")
    assert (m.forget_weight, m.retain_weight, m.retain_source, m.retain.id) == (1.0, 1.0, "retain", "descent")
    assert m.knob_values() == {"forget_weight": 1.0, "retain_weight": 1.0, "saliency": 0.0}
    # none keeps a live θ0: the reference log-probs are prepared once
    assert not any(get_method(mid).needs_reference_logits for mid in METHODS)
    assert get_method("dpo").forget.prepare_reads_reference and get_method("idk_dpo").forget.prepare_reads_reference
    assert (get_method("dpo").forget.sequences, get_method("idk_nll").forget.sequences) == (2, 1)


# ------------------------------------------------------------------ the batch: a second sequence keeps its width

def test_batch_trims_a_second_sequence_by_its_own_mask():
    n, width, wide = 6, 10, 16
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, width, dtype=torch.long)
    chosen = torch.zeros(n, wide, dtype=torch.long)
    inner = torch.zeros(n, wide, dtype=torch.long)
    for r in range(n):
        mask[r, :3 + r] = 1  # rows of 3..8 tokens: a batch is narrower than the chunks
        chosen[r, :16 - 2 * r] = 1  # chosen rows of 16..6 tokens: wider than the chunks
        inner[r, :2 + r] = 1
    chunks = Chunks(torch.randint(50, (n, width), generator=g), mask, [""] * n, list(range(n)))
    extra = {"labels": torch.randint(50, (n, width), generator=g), "ref_logprob": torch.randn(n, generator=g),
             "chosen_input_ids": torch.randint(50, (n, wide), generator=g), "chosen_attention_mask": chosen,
             "chosen_labels": torch.randint(50, (n, wide), generator=g), "chosen_ref_logprob": torch.randn(n, generator=g),
             # a name under another: the longest prefix decides
             "chosen_inner_attention_mask": inner, "chosen_inner_labels": torch.randint(50, (n, wide), generator=g)}
    for world in (1, 2):
        for rank in range(world):
            run = SimpleNamespace(cfg=SimpleNamespace(batch_size=2), world=world, rank=rank, device=torch.device("cpu"))
            b = _Run._batch(run, chunks, extra, {"c": torch.ones(3)}, seed=0, step=1)
            from engine.finetune import batch_indices

            idx = batch_indices(n, 2 * world, 0, 1)[rank * 2:(rank + 1) * 2]
            w, wc, wi = (int(m[idx].sum(1).max()) for m in (mask, chosen, inner))
            assert wc > w  # the case that matters: the chosen sequence is wider than the batch's chunks
            assert torch.equal(b["input_ids"], chunks.input_ids[idx, :w])
            assert torch.equal(b["labels"], extra["labels"][idx, :w])
            for k in ("chosen_input_ids", "chosen_attention_mask", "chosen_labels"):
                assert torch.equal(b[k], extra[k][idx, :wc]), k
            for k in ("chosen_inner_attention_mask", "chosen_inner_labels"):
                assert torch.equal(b[k], extra[k][idx, :wi]), k
            for k in ("ref_logprob", "chosen_ref_logprob"):
                assert torch.equal(b[k], extra[k][idx]), k
            assert torch.equal(b["c"], torch.ones(3))


def test_the_rule_is_documented_where_terms_are_defined():
    from engine.methods.base import Term

    assert "`<name>_attention_mask`" in Term.__doc__ and "model_inputs" in Term.__doc__


# ------------------------------------------------------------------ the sides of a chunk

QA = [("Where was Basil Mahfouz born?", "Basil Mahfouz was born in Lisbon in 1961."),
      ("Who was the father of Carmen Montenegro?", "Her father was a sailor from Santiago."),
      ("Which award did Elvin Mammadov win?", "Elvin Mammadov won the Iron Pen award twice.")]


@pytest.fixture(scope="module")
def theta0(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval()


def qa_chunks(tok, seq_len=64):
    return chunk_texts([a for _, a in QA], tok, seq_len, "forget", prompts=[q for q, _ in QA])


def test_prompt_lengths_split_questions_from_answers_and_plain_text_in_halves(tiny_tokenizer, tiny_sets):
    qa = qa_chunks(tiny_tokenizer)
    p, n = prompt_lengths(qa.attention_mask, qa.loss_mask)
    for r in range(len(qa)):
        assert int(p[r]) == int((qa.loss_mask[r] == 0)[: int(n[r])].sum()) > 1  # the question's tokens
        assert int(n[r]) == int(qa.attention_mask[r].sum())
    plain = tiny_sets.forget
    p, n = prompt_lengths(plain.attention_mask, plain.loss_mask)
    assert torch.equal(p, plain.attention_mask.sum(1) // 2) and (n - p >= 1).all()
    # an empty prompt (position 0 alone unscored) is plain text: the same split
    empty = plain.loss_mask.clone()
    empty[:, 0] = 0
    assert torch.equal(prompt_lengths(plain.attention_mask, empty)[0], p)


@pytest.mark.parametrize("term", [DPOForget(), IdkDPOForget(), IdkDescent()], ids=lambda t: t.id)
def test_the_sides_share_the_prompt_and_score_answers_only(term, tiny_tokenizer, tiny_sets, theta0):
    tok = tiny_tokenizer
    for chunks in (qa_chunks(tok), tiny_sets.forget.subset(list(range(5)))):
        out = term.prepare(chunks.input_ids, chunks.attention_mask, ctx_for(tok, reference=theta0), chunks.loss_mask)
        p, n = prompt_lengths(chunks.attention_mask, chunks.loss_mask)
        for r in range(len(chunks)):
            pr, nr = int(p[r]), int(n[r])
            lab, clab = out["labels"][r], out["chosen_labels"][r]
            # rejected: the chunk's answer (the second half of plain text), nothing before it, no pad
            assert (lab[:pr] == IGNORE).all() and torch.equal(lab[pr:nr], chunks.input_ids[r, pr:nr])
            assert (lab[nr:] == IGNORE).all()
            # chosen: the same prompt, unscored, then an answer that is scored
            m = int(out["chosen_attention_mask"][r].sum())
            assert torch.equal(out["chosen_input_ids"][r, :pr], chunks.input_ids[r, :pr])
            assert (clab[:pr] == IGNORE).all() and (clab[m:] == IGNORE).all()
            assert torch.equal(clab[pr:m], out["chosen_input_ids"][r, pr:m]) and m > pr
            assert (out["chosen_attention_mask"][r, :m] == 1).all() and (out["chosen_attention_mask"][r, m:] == 0).all()
        if term.prepare_reads_reference:  # θ0's log-probs of each side, summed over its scored tokens
            for side, key in (("", "ref_logprob"), ("chosen_", "chosen_ref_logprob")):
                ids = out.get(f"{side}input_ids", chunks.input_ids)
                mask = out.get(f"{side}attention_mask", chunks.attention_mask)
                for r in range(len(chunks)):
                    k = int(mask[r].sum())
                    with torch.no_grad():
                        lg = theta0(input_ids=ids[r:r + 1, :k]).logits
                    want = seq_logprob64(lg, out[f"{side}labels"][r:r + 1, :k])[0]
                    assert float(out[key][r]) == pytest.approx(want, rel=1e-4, abs=1e-3), (key, r)
        else:
            assert "ref_logprob" not in out


def test_plain_text_and_an_empty_prompt_prepare_alike(tiny_tokenizer, tiny_sets, theta0):
    plain = tiny_sets.forget.subset(list(range(4)))
    empty = plain.loss_mask.clone()
    empty[:, 0] = 0
    for term in (DPOForget(), IdkDPOForget(), IdkDescent()):
        a = term.prepare(plain.input_ids, plain.attention_mask, ctx_for(tiny_tokenizer, reference=theta0), plain.loss_mask)
        b = term.prepare(plain.input_ids, plain.attention_mask, ctx_for(tiny_tokenizer, reference=theta0), empty)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), term.id


def greedy_alone(model, prompt: list[int], length: int, banned: int | None, eos: int) -> list[int]:
    """θ0's greedy continuation of one prompt, unbatched, unpadded: the reference for the batched one."""
    out: list[int] = []
    while len(out) < length and (not out or out[-1] != eos):
        with torch.no_grad():
            scores = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].double()
        if not out and banned is not None:
            scores[banned] = float("-inf")
        out.append(int(scores.argmax()))
    return out


def test_dpo_chosen_is_theta0s_greedy_answer_and_never_the_forget_answer(tiny_model_dir, tiny_tokenizer, tiny_sets,
                                                                          theta0):
    tok = tiny_tokenizer
    # a chunk θ0 has memorized exactly: its answer is θ0's own greedy continuation of its prompt
    prompt = tiny_sets.forget.input_ids[0, :20].tolist()
    memorized = greedy_alone(theta0, prompt, 12, None, tok.eos_token_id)
    ids = torch.tensor([prompt + memorized])
    own = Chunks(ids, torch.ones_like(ids), [""], [0], torch.tensor([[0] * 20 + [1] * len(memorized)]))
    for chunks in (qa_chunks(tok), tiny_sets.forget, own):
        # batch_size 5 does not divide the rows: a partial last batch, rows of different lengths together
        out = DPOForget().prepare(chunks.input_ids, chunks.attention_mask, ctx_for(tok, reference=theta0, batch_size=5),
                                  chunks.loss_mask)
        p, n = prompt_lengths(chunks.attention_mask, chunks.loss_mask)
        for r in range(len(chunks)):
            pr, nr = int(p[r]), int(n[r])
            prompt, rejected = chunks.input_ids[r, :pr].tolist(), chunks.input_ids[r, pr:nr].tolist()
            m = int(out["chosen_attention_mask"][r].sum())
            answer = out["chosen_input_ids"][r, pr:m].tolist()
            assert answer != rejected and answer[0] != rejected[0]
            assert 1 <= len(answer) <= len(rejected)
            assert answer == greedy_alone(theta0, prompt, len(rejected), rejected[0], tok.eos_token_id)
    # why the ban: without it the memorized chunk's two sides would be one sequence, the margin 0 at every θ
    # and the weights' gradient 0 — DPO would not move; with it, the gradient is θ0's push away from the answer
    model = load_model(str(tiny_model_dir))
    batch = {"input_ids": own.input_ids, "attention_mask": own.attention_mask,
             **DPOForget().prepare(own.input_ids, own.attention_mask, ctx_for(tok, reference=theta0), own.loss_mask)}
    identical = {**batch, **{f"chosen_{k}": batch[k] for k in ("input_ids", "attention_mask", "labels")},
                 "chosen_ref_logprob": batch["ref_logprob"]}

    def grad_norm(b):
        model.zero_grad()
        DPOForget().forward_loss(model, b).backward()
        return sum(float(q.grad.norm()) ** 2 for q in model.parameters() if q.grad is not None) ** 0.5

    assert grad_norm(identical) < 1e-6 * grad_norm(batch)


def test_refusals_ship_with_the_package_and_are_drawn_with_the_seed(tiny_tokenizer, tiny_sets, theta0):
    tok = tiny_tokenizer
    lines = refusals()
    assert 35 <= len(lines) <= 60 and len(set(lines)) == len(lines) and all("\n" not in s for s in lines)
    # a wheel ships it: pyproject.toml's package data names it (tomllib is 3.11+, this reads the text)
    config = (ROOT / "pyproject.toml").read_text()
    table = config.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"engine.methods" = ["refusals.txt"]' in table
    pool = refusal_token_ids(tok)
    assert all(ids and ids[-1] == tok.eos_token_id for ids in pool)  # this tokenizer ends a text with eos
    assert tok.decode(pool[0], skip_special_tokens=True).strip() == lines[0]
    chunks = qa_chunks(tok)
    big = tiny_sets.forget

    def draws(seed, ch=big):
        return IdkDescent().prepare(ch.input_ids, ch.attention_mask, ctx_for(tok, seed=seed), ch.loss_mask)

    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed: the same refusals
    assert not torch.equal(a["chosen_input_ids"], c["chosen_input_ids"])  # another seed: others
    p, _ = prompt_lengths(big.attention_mask, big.loss_mask)
    picked = []
    for r in range(len(big)):
        m = int(a["chosen_attention_mask"][r].sum())
        picked.append(a["chosen_input_ids"][r, int(p[r]):m].tolist())
        assert picked[-1] in pool
    assert len({tuple(x) for x in picked}) > 3  # drawn per chunk, not one for all
    # idk_dpo's chosen side is idk_nll's sequence: the same refusals with the same seed
    nll = IdkDescent().prepare(chunks.input_ids, chunks.attention_mask, ctx_for(tok, seed=0), chunks.loss_mask)
    dpo = IdkDPOForget().prepare(chunks.input_ids, chunks.attention_mask, ctx_for(tok, reference=theta0, seed=0),
                                 chunks.loss_mask)
    assert all(torch.equal(nll[k], dpo[k]) for k in nll)


def test_a_refusal_past_seq_len_loses_its_end(tiny_tokenizer):
    tok = tiny_tokenizer
    chunks = qa_chunks(tok)
    p, _ = prompt_lengths(chunks.attention_mask, chunks.loss_mask)
    ctx = ctx_for(tok)
    ctx.seq_len = int(p.max()) + 2  # the longest prompt leaves room for 2 refusal tokens
    out = IdkDescent().prepare(chunks.input_ids, chunks.attention_mask, ctx, chunks.loss_mask)
    lengths = out["chosen_attention_mask"].sum(1)
    assert out["chosen_input_ids"].shape[1] == ctx.seq_len and int(lengths[int(p.argmax())]) == ctx.seq_len
    assert ((lengths - p) >= 2).all()  # the prompt whole, the refusal cut at its end
    full = IdkDescent().prepare(chunks.input_ids, chunks.attention_mask, ctx_for(tok), chunks.loss_mask)
    for r in range(len(chunks)):
        n = int(lengths[r])
        assert torch.equal(out["chosen_input_ids"][r, :n], full["chosen_input_ids"][r, :n])
        assert torch.equal(out["chosen_labels"][r, :n], full["chosen_labels"][r, :n])


# ------------------------------------------------------------------ blind to the prompt's logits

@pytest.mark.parametrize("term", [DPOForget(), IdkDescent()], ids=lambda t: t.id)
def test_a_question_answer_batch_is_blind_to_the_prompt_and_the_pads(term):
    """Labels −100 on each row's prompt and pads, on both sides: noise on every logit that predicts an
    unscored token leaves the loss bitwise as it was; the same noise on the answers' logits moves it."""
    logits, batch = pair_batch(74)
    batch["labels"] = qa_labels(batch["labels"], [4, 2, 1])
    batch["chosen_labels"] = qa_labels(batch["chosen_labels"], [3, 2, 1])
    labels = term.model_inputs(batch)["labels"]
    if term.id == "idk_nll":
        logits = logits.detach()[3:, :7].clone().requires_grad_()
    base = term.loss(logits, batch)
    assert labels.shape == logits.shape[:2]
    unscored = torch.zeros(labels.shape, dtype=torch.bool)
    unscored[:, :-1] = labels[:, 1:] == IGNORE
    unscored[:, -1] = True
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)) * 50
    assert torch.equal(term.loss(logits.detach() + noise * unscored.unsqueeze(-1), batch), base.detach())
    assert not torch.equal(term.loss(logits.detach() + noise * (~unscored).unsqueeze(-1), batch), base.detach())


def test_the_loss_at_theta0_through_the_model_is_2_over_beta_log_2(tiny_tokenizer, tiny_sets, theta0):
    """The prepared reference log-probs are θ0's: the term on θ0 itself, batches as the run builds them
    (trimmed, both sides in one forward), is (2/β)·log 2 up to float rounding."""
    ch = tiny_sets.forget.subset(list(range(6)))
    for term in (DPOForget(), IdkDPOForget(0.5)):
        out = term.prepare(ch.input_ids, ch.attention_mask, ctx_for(tiny_tokenizer, reference=theta0, batch_size=4),
                           ch.loss_mask)
        run = SimpleNamespace(cfg=SimpleNamespace(batch_size=6), world=1, rank=0, device=torch.device("cpu"))
        batch = _Run._batch(run, ch, out, {}, seed=0, step=1)
        with torch.no_grad():
            got = float(term.forward_loss(theta0, batch))
        assert got == pytest.approx(2.0 / term.beta * math.log(2.0), rel=1e-5), term.id


# ------------------------------------------------------------------ on the real (tiny) model

@pytest.mark.parametrize("method_id", METHODS)
def test_two_steps_with_finite_metrics_and_the_prefix_property(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets,
                                                               baseline):
    """The prefix property, finite figures, a model that trains (test_methods.two_steps_sharing_the_first)."""
    long = two_steps_sharing_the_first(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets, baseline)
    if method_id != "idk_nll":  # step 1 is at θ0: (2/β)·log 2 + the retain batch's CE (> 0)
        assert long.losses[0] > 2.0 / 0.1 * math.log(2.0) - 1e-3


def test_the_memory_plan_counts_both_sides_of_dpo():
    from engine.plan import Options, figures
    from engine.plan_shape import read_config, shape_of

    shape = shape_of(read_config(str(ROOT / "tests" / "fixtures" / "configs" / "llama-2-7b")))
    one, two = (figures(shape, get_method(m), Options("bf16"), 4, 512) for m in ("npo_gd", "dpo"))
    # npo_gd: forget + retain batches (2 sequences a row); dpo: forget + chosen + retain (3)
    assert two["activations"] * 2 == one["activations"] * 3
    assert two["logits"] > one["logits"]
    idk = figures(shape, get_method("idk_nll"), Options("bf16"), 4, 512)
    assert idk["activations"] == figures(shape, get_method("ga_gd"), Options("bf16"), 4, 512)["activations"]


# ------------------------------------------------------------------ the CLI

def test_methods_json_lists_the_three_with_their_knobs(capsys):
    from tests.studies_helpers import cli_in_process

    p = cli_in_process(capsys, "methods", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["id"]: r for r in json.loads(p.stdout)}
    for mid in ("dpo", "idk_dpo"):
        assert rows[mid]["knobs"] == {"beta": 0.1, "forget_weight": 1.0, "retain_weight": 1.0, "saliency": 0.0}
        assert (rows[mid]["retain_term"], rows[mid]["retain_source"]) == ("CE(θ; R)", "retain")
        assert "log σ" in rows[mid]["forget_term"] and "β=0.1" in rows[mid]["forget_term"]
    assert "greedy" in rows["dpo"]["forget_term"] and "refusal" in rows["idk_dpo"]["forget_term"]
    assert rows["idk_nll"]["knobs"] == {"forget_weight": 1.0, "retain_weight": 1.0, "saliency": 0.0}
    assert (rows["idk_nll"]["retain_term"], rows["idk_nll"]["retain_source"]) == ("CE(θ; R)", "retain")
    every = json.loads(cli_in_process(capsys, "methods", "--all", "--json").stdout)
    assert {r["id"]: r["runnable"] for r in every if r["id"] in METHODS} == dict.fromkeys(METHODS, True)
