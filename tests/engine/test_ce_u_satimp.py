"""CE-U and SatImp: each loss against a direct float64 computation written here (plain loops over the
predicted tokens, independent of engine.methods.base), their sign convention, their blindness to a
prompt's logits, two steps on the tiny model with the prefix property, and `unlearn methods --json`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.errors import UnlearnError
from engine.methods import get_method
from engine.methods.base import IGNORE
from engine.methods.ce_u import CrossEntropyUnlearning, skip_first_predicted
from engine.methods.satimp import SaturationImportanceAscent
from engine.models import load_model
from tests.engine.test_methods import ctx_for, hand_batch, predicted_positions, two_steps_sharing_the_first

# Losses are read as numbers with float() while they still carry their graph (some tests then
# take the gradient): torch's warning about that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

METHODS = ["ce_u", "satimp"]


# ------------------------------------------------------------------ float64 references

def ref_ce_u(logits, labels) -> tuple[float, torch.Tensor]:
    """(−mean_t Σ_v q_t(v) log p_t(v), ∂/∂logits = (p_t − q_t)/N), q_t = p_t with y_t removed, renormalized."""
    logits = logits.detach().double()
    rows, pos = predicted_positions(labels)
    total, grad = 0.0, torch.zeros_like(logits)
    for b, t in zip(rows.tolist(), pos.tolist()):
        p = torch.softmax(logits[b, t - 1], -1)
        q = p.clone()
        q[labels[b, t]] = 0.0
        q = q / q.sum()
        total -= float((q * torch.log(p)).sum())
        grad[b, t - 1] += p - q
    return total / len(rows), grad / len(rows)


def ref_satimp(logits, labels, beta1, beta2) -> tuple[float, torch.Tensor]:
    """(mean_t p^β1 (1−p)^β2 log p, its gradient with the weight held constant: w (onehot − p)/N)."""
    logits = logits.detach().double()
    rows, pos = predicted_positions(labels)
    total, grad = 0.0, torch.zeros_like(logits)
    for b, t in zip(rows.tolist(), pos.tolist()):
        p = torch.softmax(logits[b, t - 1], -1)
        py = float(p[labels[b, t]])
        w = py ** beta1 * (1.0 - py) ** beta2
        total += w * math.log(py)
        onehot = torch.zeros_like(p)
        onehot[labels[b, t]] = 1.0
        grad[b, t - 1] += w * (onehot - p)
    return total / len(rows), grad / len(rows)


def label_logprobs(logits, labels) -> torch.Tensor:
    """log p(y_t) at every predicted token, float64."""
    rows, pos = predicted_positions(labels)
    logp = torch.log_softmax(logits.detach().double(), -1)
    return logp[rows, pos - 1, labels[rows, pos]]


def step(logits, grad, lr=0.5):
    """One plain descent step on the logits, in float64 (so that tiny pushes are not rounded away)."""
    return logits.detach().double() - lr * grad.double()


def qa_labels(labels, prompt_lengths):
    """`labels` with each row's first k positions ignored: a question–answer chunk's prompt."""
    out = labels.clone()
    for b, k in enumerate(prompt_lengths):
        out[b, :k] = IGNORE
    return out


# ------------------------------------------------------------------ the losses

def test_ce_u_loss_and_gradient_against_float64_and_its_sign():
    logits, labels = hand_batch(60)
    got = CrossEntropyUnlearning().loss(logits, {"labels": labels})
    want, want_grad = ref_ce_u(logits, labels)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    # the sign convention: a descent step lowers the likelihood of every forget token
    before, after = label_logprobs(logits, labels), label_logprobs(step(logits, logits.grad), labels)
    assert (after < before).all()
    # the target is detached: the gradient is p − q, not that of a loss whose target moves with θ
    assert logits.grad.abs().sum() > 0


def test_ce_u_push_fades_on_a_forgotten_token_where_ascent_pushes_on():
    """The push on a forgotten token's logit (p(y) ≈ e^-31) is p(y) ≈ 0; ascent's is 1 − p(y) ≈ 1."""
    labels = torch.tensor([[IGNORE, 0]])
    forgotten = torch.tensor([[[-30.0, 1.0, 2.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    CrossEntropyUnlearning().loss(forgotten, {"labels": labels}).backward()
    assert 0 < float(forgotten.grad[0, 0, 0]) < 1e-12
    forgotten.grad = None
    get_method("ga").forget.loss(forgotten, {"labels": labels}).backward()
    assert float(forgotten.grad[0, 0, 0]) == pytest.approx(1.0, rel=1e-6)


def test_ce_u_skips_the_first_predicted_tokens_of_each_row():
    _, labels = hand_batch(61)
    qa = qa_labels(labels, [3, 1, 0])
    got = skip_first_predicted(qa, 1)
    want = qa.clone()
    for b in range(len(qa)):
        first = next(t for t in range(1, qa.size(1)) if qa[b, t] != IGNORE)
        want[b, first] = IGNORE
    assert torch.equal(got, want)
    assert torch.equal(skip_first_predicted(qa, 0), qa)
    # position 0 is never predicted, so it is never what is skipped: a plain row and the same row
    # with its position 0 hidden (an empty prompt) lose the same token
    hidden = labels.clone()
    hidden[:, 0] = IGNORE
    assert torch.equal(skip_first_predicted(labels, 2)[:, 1:], skip_first_predicted(hidden, 2)[:, 1:])


@pytest.mark.parametrize("beta1, beta2", [(5.0, 1.0), (1.0, 0.0), (2.0, 3.0)])
def test_satimp_loss_and_gradient_against_float64_and_its_sign(beta1, beta2):
    logits, labels = hand_batch(62)
    logits = (logits.detach() / 3).requires_grad_()  # probabilities away from 0, so the p^5 weights are not all tiny
    got = SaturationImportanceAscent(beta1, beta2).loss(logits, {"labels": labels})
    want, want_grad = ref_satimp(logits, labels, beta1, beta2)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    # the weights are detached: the gradient of token t is w_t ∇log p_t, not ∇(w_t log p_t)
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-4, atol=1e-9)
    # a descent step lowers the likelihood of every forget token (some weights p^β1 are tiny: only not up)
    before, after = label_logprobs(logits, labels), label_logprobs(step(logits, logits.grad, lr=50.0), labels)
    assert (after <= before).all() and after.sum() < before.sum()


def test_satimp_at_zero_betas_is_ascent_and_at_beta2_zero_is_wga():
    logits, labels = hand_batch(63)
    batch = {"labels": labels}
    ga = get_method("ga").forget.loss(logits, batch)
    assert float(SaturationImportanceAscent(0.0, 0.0).loss(logits, batch)) == pytest.approx(float(ga), rel=1e-6)
    wga = get_method("wga[beta=2.0]").forget.loss(logits, batch)
    assert float(SaturationImportanceAscent(2.0, 0.0).loss(logits, batch)) == pytest.approx(float(wga), rel=1e-6)


def test_satimp_is_its_forget_term_at_0_1_plus_descent_on_retain():
    m = get_method("satimp")
    assert (m.forget_weight, m.retain_weight, m.retain_source, m.retain.id) == (0.1, 1.0, "retain", "descent")
    assert m.knob_values() == {"beta1": 5.0, "beta2": 1.0, "forget_weight": 0.1, "retain_weight": 1.0, "saliency": 0.0}
    assert get_method("ce_u").retain is None
    assert get_method("ce_u").knob_values() == {"ignore_first_n": 1.0, "forget_weight": 1.0, "saliency": 0.0}
    v = get_method("satimp[beta1=2.0,beta2=0.5]")
    assert (v.forget.beta1, v.forget.beta2, v.id) == (2.0, 0.5, "satimp[beta1=2.0,beta2=0.5]")
    assert get_method("ce_u[ignore_first_n=0.0]").forget.ignore_first_n == 0
    for bad, msg in (("ce_u[ignore_first_n=0.5]", "whole number"), ("ce_u[ignore_first_n=-1.0]", "whole number"),
                     ("satimp[beta1=-1.0]", "beta1 must be 0 or more"), ("satimp[beta2=-0.5]", "beta2 must be 0 or more")):
        with pytest.raises(UnlearnError, match=msg):
            get_method(bad)


@pytest.mark.parametrize("term", [CrossEntropyUnlearning(), SaturationImportanceAscent()], ids=lambda t: t.id)
def test_a_question_answer_batch_is_blind_to_the_prompt_and_the_pads(term):
    """Labels −100 on each row's prompt (and pads): noise on every logit that predicts a prompt or pad
    token leaves the loss bitwise as it was; the same noise on the answer's logits moves it."""
    logits, labels = hand_batch(64)
    labels = qa_labels(labels, [4, 2, 1])
    base = term.loss(logits, {"labels": labels})
    unscored = torch.zeros(labels.shape, dtype=torch.bool)
    unscored[:, :-1] = labels[:, 1:] == IGNORE
    unscored[:, -1] = True  # the last position predicts nothing
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=logits.dtype) * 50
    prompt_moved = logits.detach() + noise * unscored.unsqueeze(-1)
    answer_moved = logits.detach() + noise * (~unscored).unsqueeze(-1)
    assert torch.equal(term.loss(prompt_moved, {"labels": labels}), base.detach())
    assert not torch.equal(term.loss(answer_moved, {"labels": labels}), base.detach())
    # and the float64 references agree on the QA batch
    ref = ref_ce_u if term.id == "ce_u" else (lambda lg, lb: ref_satimp(lg, lb, term.beta1, term.beta2))
    assert float(base) == pytest.approx(ref(logits, labels)[0], rel=1e-6)


def test_ce_u_prepares_answer_labels_without_the_first_answer_token(tiny_model_dir, tiny_tokenizer):
    """On a real QA chunk: the prompt and the first answer token are ignored, the rest of the answer
    is labelled; the plain chunk of the same tokens and its empty-prompt QA chunk get the same labels."""
    from engine.data import chunk_texts

    tok = tiny_tokenizer
    answers = ["Basil Mahfouz was born in Lisbon in 1961.", "Her father was a sailor from Santiago."]
    qa = chunk_texts(answers, tok, 64, "forget", prompts=["Where was Basil Mahfouz born?", "Who was her father?"])
    term = CrossEntropyUnlearning()
    got = term.prepare(qa.input_ids, qa.attention_mask, ctx_for(tok), qa.loss_mask)["labels"]
    for r in range(len(qa)):
        scored = qa.loss_mask[r].nonzero().squeeze(-1).tolist()
        assert scored and (got[r, : scored[0] + 1] == IGNORE).all()
        assert torch.equal(got[r, scored[1:]], qa.input_ids[r, scored[1:]])
    plain = chunk_texts(answers, tok, 64, "forget")
    empty = chunk_texts(answers, tok, 64, "forget", prompts=["", ""])
    a = term.prepare(plain.input_ids, plain.attention_mask, ctx_for(tok), plain.loss_mask)["labels"]
    b = term.prepare(empty.input_ids, empty.attention_mask, ctx_for(tok), empty.loss_mask)["labels"]
    assert torch.equal(a[:, 1:], b[:, 1:])
    # the loss on θ0's logits is finite and blind to the prompt's logits
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=qa.input_ids, attention_mask=qa.attention_mask).logits.float()
    unscored = torch.zeros(got.shape, dtype=torch.bool)
    unscored[:, :-1] = got[:, 1:] == IGNORE
    moved = logits + 40.0 * unscored.unsqueeze(-1) * torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    assert math.isfinite(float(term.loss(logits, {"labels": got})))
    assert torch.equal(term.loss(moved, {"labels": got}), term.loss(logits, {"labels": got}))


# ------------------------------------------------------------------ on the real (tiny) model

@pytest.mark.parametrize("method_id", METHODS)
def test_two_steps_with_finite_metrics_and_the_prefix_property(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets,
                                                               baseline):
    """The prefix property, finite figures, a model that trains (test_methods.two_steps_sharing_the_first)."""
    two_steps_sharing_the_first(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets, baseline)


# ------------------------------------------------------------------ the CLI

def test_methods_json_lists_both_with_their_knobs(capsys):
    from tests.studies_helpers import cli_in_process

    p = cli_in_process(capsys, "methods", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["id"]: r for r in json.loads(p.stdout)}
    assert rows["ce_u"]["knobs"] == {"ignore_first_n": 1.0, "forget_weight": 1.0, "saliency": 0.0}
    assert rows["ce_u"]["retain_term"] is None and "−∞" in rows["ce_u"]["forget_term"]
    assert rows["satimp"]["knobs"] == {"beta1": 5.0, "beta2": 1.0, "forget_weight": 0.1, "retain_weight": 1.0,
                                       "saliency": 0.0}
    assert (rows["satimp"]["retain_term"], rows["satimp"]["retain_source"]) == ("CE(θ; R)", "retain")
    every = json.loads(cli_in_process(capsys, "methods", "--all", "--json").stdout)
    assert {r["id"]: r["runnable"] for r in every if r["id"] in METHODS} == {"ce_u": True, "satimp": True}
