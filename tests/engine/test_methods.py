"""engine.methods: every loss against a direct computation written here, label preparation
(random and adversarial) and the registry.

The references below are deliberately plain: log-softmax in float64, then one gather per
(row, position) pair that predicts something, the label at t read from the logits at t-1.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from engine.config import RunConfig
from engine.data import ForgetSetChunks
from engine.errors import UnlearnError
from engine.methods import get_method, list_methods
from engine.methods.base import IGNORE, PrepareContext, causal_labels, sequence_logprob, token_ce
from engine.methods.forget_terms import AdversarialDescent, GradientAscent, RandomLabelDescent
from engine.methods.retain_terms import RetainDescent, RetainKL
from engine.models import load_model
from engine.run import train_to_milestones

PAPER_METHODS = ["ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general"]
# docs/concepts.md#methods' table: forget term, retain term, retain source
TABLE = {
    "ga": ("ascent", None, None),
    "random_label": ("random", None, None),
    "adversarial": ("adversarial", None, None),
    "ga_gd": ("ascent", "ce", "retain"),
    "ga_kl": ("ascent", "kl", "retain"),
    "ga_gd_general": ("ascent", "ce", "general"),
    "ga_kl_general": ("ascent", "kl", "general"),
}


# ------------------------------------------------------------------ independent references

def predicted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of every label that is predicted: not ignored, and not position 0
    (nothing comes before it)."""
    rows, pos = (labels != IGNORE).nonzero(as_tuple=True)
    keep = pos > 0
    return rows[keep], pos[keep]


def ref_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over predicted tokens of -log softmax(logits[b, t-1])[labels[b, t]]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    rows, pos = predicted_positions(labels)
    return -logp[rows, pos - 1, labels[rows, pos]].mean()


def ref_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over predicted tokens of KL(p0 ‖ p) = Σ_v p0 (log p0 − log p) of the next-token laws."""
    rows, pos = predicted_positions(labels)
    logp = torch.log_softmax(logits.double()[rows, pos - 1], dim=-1)
    logp0 = torch.log_softmax(ref_logits.double()[rows, pos - 1], dim=-1)
    p0 = logp0.exp()
    return (p0 * (logp0 - logp)).sum(-1).mean()


def ref_total(method_id, f_logits, f_labels, r_logits=None, r_labels=None, r_ref_logits=None, weight=1.0):
    forget_kind, retain_kind, _ = TABLE[method_id]
    total = -ref_ce(f_logits, f_labels) if forget_kind == "ascent" else ref_ce(f_logits, f_labels)
    if retain_kind == "ce":
        total = total + weight * ref_ce(r_logits, r_labels)
    elif retain_kind == "kl":
        total = total + weight * ref_kl(r_logits, r_ref_logits, r_labels)
    return total


def ref_adversarial_labels(ref_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """label[b, t] = argmax_{a ≠ y_t} ref_logits[b, t-1, a], y_t = input_ids[b, t]; pads ignored;
    position 0 keeps its plain label (it is never predicted)."""
    out = input_ids.masked_fill(mask == 0, IGNORE).clone()
    for b in range(input_ids.size(0)):
        for t in range(1, input_ids.size(1)):
            if mask[b, t] == 0:
                continue
            scores = ref_logits[b, t - 1].double().clone()
            scores[input_ids[b, t]] = float("-inf")
            out[b, t] = int(scores.argmax())
    return out


def hand_batch(seed: int, batch: int = 3, length: int = 9, vocab: int = 13):
    """Random logits and labels, right-padded rows of different lengths (one unpadded)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g) * 3
    labels = torch.randint(vocab, (batch, length), generator=g)
    lengths = [length, length - 3, 4][:batch]
    for b, n in enumerate(lengths):
        labels[b, n:] = IGNORE
    return logits.requires_grad_(), labels


def full_logits(model, chunks) -> torch.Tensor:
    """Logits of every chunk, each run alone on exactly its real tokens, padded with zeros."""
    out = torch.zeros(*chunks.input_ids.shape, model.config.vocab_size)
    with torch.no_grad():
        for b in range(len(chunks)):
            n = int(chunks.attention_mask[b].sum())
            out[b, :n] = model(input_ids=chunks.input_ids[b : b + 1, :n]).logits[0].float()
    return out


def ctx_for(tokenizer, reference=None, seed=0, batch_size=8):
    return PrepareContext(reference, tokenizer, torch.Generator().manual_seed(seed), torch.device("cpu"),
                          batch_size, contextlib.nullcontext)


# ------------------------------------------------------------------ the base helpers

def two_steps_sharing_the_first(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    """Runs `method_id` to milestones (1, 2) and to (1,) on the tiny model and checks what every method
    must show: the run to (1, 2) passes through exactly the model of the run to (1,) (CPU: bitwise, the
    prefix property), finite losses and metrics, and a model that trains. Returns the longer run."""
    import math

    outs = []
    for milestones in ((1, 2), (1,)):
        cfg = RunConfig(method=method_id, lr=3e-3, milestones=milestones, batch_size=4, seq_len=128)
        outs.append(train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline))
    long, short = outs
    assert not long.diverged and len(long.losses) == 2
    assert long.milestones[0] == short.milestones[0]  # == on floats: bitwise
    assert long.losses[:1] == short.losses
    assert all(math.isfinite(x) for x in long.losses)
    for cell in long.milestones:
        for k in ("ppl_forget", "ppl_retain", "ppl_unseen", "score"):
            assert cell[k] is not None and math.isfinite(cell[k]), (k, cell)
    assert long.milestones[1]["ppl_forget"] != long.milestones[0]["ppl_forget"]  # it trains
    return long


def test_reference_helpers_disagree_with_off_by_one():
    """Guard for the references themselves: reading the label at t from the logits at t
    (no shift) gives another number, so the comparisons below can fail."""
    logits, labels = hand_batch(0)
    rows, pos = predicted_positions(labels)
    unshifted = -torch.log_softmax(logits.double(), -1)[rows, pos, labels[rows, pos]].mean()
    assert not torch.isclose(unshifted, ref_ce(logits, labels))


def test_token_ce_and_sequence_logprob_match_direct_computation():
    logits, labels = hand_batch(1)
    logits = logits.detach()
    torch.testing.assert_close(token_ce(logits, labels).double(), ref_ce(logits, labels), rtol=1e-6, atol=1e-6)
    logp = torch.log_softmax(logits.double(), -1)
    for b in range(labels.size(0)):
        expected = sum(float(logp[b, t - 1, labels[b, t]].detach()) for t in range(1, labels.size(1)) if labels[b, t] != IGNORE)
        assert float(sequence_logprob(logits, labels)[b]) == pytest.approx(expected, rel=1e-5)


def test_causal_labels_ignore_pads_only():
    ids = torch.tensor([[0, 5, 6, 7], [0, 8, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert causal_labels(ids, mask).tolist() == [[0, 5, 6, 7], [0, 8, IGNORE, IGNORE]]


# ------------------------------------------------------------------ total loss of each method

def method_loss(method, f_logits, f_labels, r_logits=None, r_labels=None, r_ref_logits=None):
    """Forget term + weight × retain term, composed as docs/concepts.md#methods defines a method."""
    loss = method.forget.loss(f_logits, {"labels": f_labels})
    if method.retain is not None:
        loss = loss + method.retain_weight * method.retain.loss(r_logits, {"labels": r_labels}, r_ref_logits)
    return loss


@pytest.mark.parametrize("method_id", PAPER_METHODS)
def test_total_loss_on_hand_built_batch(method_id):
    method = get_method(method_id)
    f_logits, f_labels = hand_batch(10)
    r_logits, r_labels = hand_batch(11)
    r_ref = hand_batch(12)[0].detach()
    got = method_loss(method, f_logits, f_labels, r_logits, r_labels, r_ref)
    expected = ref_total(method_id, f_logits, f_labels, r_logits, r_labels, r_ref, method.retain_weight)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # a loss a gradient step can use
    got.backward()
    assert f_logits.grad is not None and torch.isfinite(f_logits.grad).all()
    assert f_logits.grad[0, -1].abs().sum() == 0  # the last position predicts nothing


@pytest.mark.parametrize("method_id", PAPER_METHODS)
def test_pad_logits_do_not_count(method_id):
    """Changing logits or labels at pad positions leaves every term unchanged."""
    method = get_method(method_id)
    f_logits, f_labels = hand_batch(20)
    r_logits, r_labels = hand_batch(21)
    r_ref = hand_batch(22)[0].detach()
    before = method_loss(method, f_logits, f_labels, r_logits, r_labels, r_ref)
    f2, r2, ref2 = f_logits.detach().clone(), r_logits.detach().clone(), r_ref.clone()
    # row 2 has 4 real labels (positions 0..3): logits at 3.. predict pads
    f2[2, 3:] = 100.0
    r2[2, 3:] = -100.0
    ref2[2, 3:] = 50.0
    after = method_loss(method, f2, f_labels, r2, r_labels, ref2)
    torch.testing.assert_close(after, before.detach())


def test_kl_is_zero_against_itself_and_positive_otherwise():
    logits, labels = hand_batch(30)
    logits = logits.detach()
    assert float(RetainKL().loss(logits, {"labels": labels}, logits.detach())) == pytest.approx(0.0, abs=1e-6)
    other = hand_batch(31)[0].detach()
    assert float(RetainKL().loss(logits, {"labels": labels}, other)) > 0.01


@pytest.fixture(scope="module")
def small_sets(tiny_sets):
    """16 chunks in every set, so a batch of 16 at step 1 holds every row exactly once (a
    permutation): the first loss is then a function of the set alone, whatever the order."""
    def first(ch):
        return ch.subset(list(range(16)))
    assert len(tiny_sets.forget) == 16
    return ForgetSetChunks(first(tiny_sets.forget), first(tiny_sets.retain), first(tiny_sets.unseen),
                           first(tiny_sets.general))


def trimmed(chunks):
    width = int(chunks.attention_mask.sum(1).max())
    return chunks.input_ids[:, :width], chunks.attention_mask[:, :width]


@pytest.mark.parametrize("method_id", PAPER_METHODS)
def test_first_training_loss_on_real_model(method_id, tiny_model_dir, tiny_tokenizer, small_sets, baseline):
    """The loss the training loop reports at step 1 (θ = θ0) equals the direct computation
    on the real model, batch = the whole set."""
    method = get_method(method_id)
    theta0 = load_model(str(tiny_model_dir)).eval()
    ids, mask = trimmed(small_sets.forget)
    with torch.no_grad():
        f_logits = theta0(input_ids=ids, attention_mask=mask).logits
    if method_id == "random_label":  # the labels are the method's (checked in their own tests)
        ch = small_sets.forget  # prepared on the stored chunks, as the run does, then trimmed
        f_labels = RandomLabelDescent().prepare(ch.input_ids, ch.attention_mask, ctx_for(tiny_tokenizer, seed=0))["labels"]
        f_labels = f_labels[:, : ids.size(1)]
    elif method_id == "adversarial":
        f_labels = ref_adversarial_labels(full_logits(theta0, small_sets.forget)[:, : ids.size(1)], ids, mask)
    else:
        f_labels = ids.masked_fill(mask == 0, IGNORE)
    r_logits = r_labels = r_ref = None
    if method.retain is not None:
        rch = getattr(small_sets, TABLE[method_id][2])
        rids, rmask = trimmed(rch)
        with torch.no_grad():
            r_logits = r_ref = theta0(input_ids=rids, attention_mask=rmask).logits
        r_labels = rids.masked_fill(rmask == 0, IGNORE)
    expected = float(ref_total(method_id, f_logits, f_labels, r_logits, r_labels, r_ref, method.retain_weight))

    model = load_model(str(tiny_model_dir))
    cfg = RunConfig(method=method_id, lr=1e-3, milestones=(1,), batch_size=16, seq_len=128, seed=0)
    out = train_to_milestones(model, tiny_tokenizer, small_sets, cfg, baseline)
    assert out.losses[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if method.retain is None:  # the sign is part of the method: ascent is below zero, descent above
        assert (out.losses[0] < 0) == (TABLE[method_id][0] == "ascent")


def test_kl_term_on_real_models(tiny_model_dir, tiny_tokenizer, small_sets, baseline):
    """KL(p_θ0 ‖ p_θ) with θ one real ascent step away from θ0."""
    theta0 = load_model(str(tiny_model_dir)).eval()
    cfg = RunConfig(method="ga_kl", lr=1e-2, milestones=(1,), batch_size=16, seq_len=128)
    theta1 = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, small_sets, cfg, baseline).model.eval()
    ids, mask = trimmed(small_sets.retain)
    labels = causal_labels(ids, mask)
    with torch.no_grad():
        logits, ref_logits = theta1(input_ids=ids, attention_mask=mask).logits, theta0(input_ids=ids, attention_mask=mask).logits
    got = float(RetainKL().loss(logits, {"labels": labels}, ref_logits))
    expected = float(ref_kl(logits, ref_logits, labels))
    assert expected > 1e-4
    assert got == pytest.approx(expected, rel=1e-4)
    assert float(RetainDescent().loss(logits, {"labels": labels})) == pytest.approx(float(ref_ce(logits, labels)), rel=1e-5)


# ------------------------------------------------------------------ adversarial labels

class FixedLM(torch.nn.Module):
    """A reference 'model' whose next-token law at position s depends on s only: favourite
    token fav(s), runner-up second(s). It makes the expected adversarial label explicit."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def fav(self, s):
        return (3 * s + 1) % self.vocab

    def second(self, s):
        return (3 * s + 2) % self.vocab

    def forward(self, input_ids, attention_mask=None):
        b, length = input_ids.shape
        logits = torch.zeros(b, length, self.vocab)
        for s in range(length):
            logits[:, s, self.fav(s)] = 10.0
            logits[:, s, self.second(s)] = 5.0
        return SimpleNamespace(logits=logits)


def test_adversarial_label_alignment_with_handmade_reference(tiny_tokenizer):
    vocab = 40
    ref = FixedLM(vocab)
    # row 0: label y_t equals the favourite of position t-1 -> runner-up expected
    # row 1: input x_{t-1} equals the favourite of position t-1 (the study's off-by-one would
    #        exclude it) while y_t does not -> favourite expected; row 1 is right-padded
    length = 8
    row0 = [ref.fav(t - 1) if t > 0 else 0 for t in range(length)]
    row1 = [ref.fav(t) for t in range(length)]
    ids = torch.tensor([row0, row1])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 2
    labels = AdversarialDescent().prepare(ids, mask, ctx_for(tiny_tokenizer, reference=ref, batch_size=1))["labels"]
    expected0 = [0] + [ref.second(t - 1) for t in range(1, length)]
    expected1 = [row1[0]] + [ref.fav(t - 1) for t in range(1, 6)] + [IGNORE, IGNORE]
    assert labels.tolist() == [expected0, expected1]


def test_adversarial_labels_on_real_model(tiny_model_dir, tiny_tokenizer, tiny_sets):
    model = load_model(str(tiny_model_dir)).eval()
    ch = tiny_sets.forget
    ids, mask = ch.input_ids, ch.attention_mask
    # batch_size 5 does not divide 16 rows: the prepare loop's last batch is partial
    labels = AdversarialDescent().prepare(ids, mask, ctx_for(tiny_tokenizer, reference=model, batch_size=5))["labels"]
    logits = full_logits(model, ch)
    rows, pos = predicted_positions(causal_labels(ids, mask))
    assert (labels[rows, pos] != ids[rows, pos]).all(), "an adversarial label equals the true label"
    assert torch.equal(labels, ref_adversarial_labels(logits, ids, mask))
    assert (labels[mask == 0] == IGNORE).all()
    assert torch.equal(labels[:, 0], ids[:, 0])
    # it is not a no-op: the most likely wrong guess is often what θ0 would say anyway
    assert (labels[rows, pos] == logits[rows, pos - 1].argmax(-1)).float().mean() > 0.2


def test_adversarial_reads_theta0_once_and_kl_keeps_a_live_copy():
    paper = [get_method(m) for m in PAPER_METHODS]
    assert {m.id for m in paper if m.forget.prepare_reads_reference} == {"adversarial"}  # in prepare, once
    assert {m.id for m in paper if m.needs_reference_logits} == {"ga_kl", "ga_kl_general"}  # at every step


# ------------------------------------------------------------------ random labels

def random_labels(tokenizer, ids, mask, seed):
    return RandomLabelDescent().prepare(ids, mask, ctx_for(tokenizer, seed=seed))["labels"]


def test_random_labels_spare_special_tokens(tiny_tokenizer, tiny_sets):
    tok = tiny_tokenizer
    ch = tiny_sets.forget
    ids, mask = ch.input_ids.clone(), ch.attention_mask
    # a special token in the middle of a row (mask 1) must keep its label too
    ids[3, 10] = tok.bos_token_id
    ids[4, 20] = tok.pad_token_id
    labels = random_labels(tok, ids, mask, seed=0)
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    is_special = torch.isin(ids, special)
    real = mask == 1
    # pads are ignored
    assert (labels[~real] == IGNORE).all()
    # special input tokens (bos at 0, eos at the end, the two planted ones) keep their label
    assert is_special[real].sum() >= 2 * len(ch) + 2
    assert torch.equal(labels[real & is_special], ids[real & is_special])
    # every other position got a uniformly drawn non-special id of the vocabulary
    drawn = labels[real & ~is_special]
    assert ((drawn >= 0) & (drawn < len(tok))).all()
    assert not torch.isin(drawn, special).any()
    assert (drawn != ids[real & ~is_special]).float().mean() > 0.9
    assert len(drawn.unique()) > 0.6 * (len(tok) - len(special))


def test_random_labels_are_seeded(tiny_tokenizer, tiny_sets):
    ids, mask = tiny_sets.forget.input_ids, tiny_sets.forget.attention_mask
    a = random_labels(tiny_tokenizer, ids, mask, seed=0)
    assert torch.equal(a, random_labels(tiny_tokenizer, ids, mask, seed=0))
    b = random_labels(tiny_tokenizer, ids, mask, seed=1)
    assert not torch.equal(a, b)
    assert torch.equal(a == IGNORE, b == IGNORE)


# ------------------------------------------------------------------ registry

def test_registry_lists_the_seven_paper_methods_first_in_order():
    assert [m.id for m in list_methods()][:7] == PAPER_METHODS


def test_unknown_method_is_a_user_error():
    with pytest.raises(UnlearnError, match="nope"):
        get_method("nope")


@pytest.mark.parametrize("method_id", PAPER_METHODS)
def test_describe_and_composition_match_the_design_table(method_id):
    m = get_method(method_id)
    d = m.describe()
    assert set(d) == {"id", "forget_term", "retain_term", "retain_source", "retain_weight", "forget_weight", "trains",
                      "knobs", "description"}
    assert d["forget_weight"] == 1.0 and d["trains"] == "all parameters"
    assert d["id"] == method_id and d["description"]
    forget_kind, retain_kind, source = TABLE[method_id]
    assert d["retain_source"] == m.retain_source == source
    assert type(m.forget) is {"ascent": GradientAscent,
                               "random": RandomLabelDescent, "adversarial": AdversarialDescent}[forget_kind]
    if retain_kind is None:
        assert m.retain is None and d["retain_term"] is None and d["retain_weight"] is None
    else:
        assert type(m.retain) is {"ce": RetainDescent, "kl": RetainKL}[retain_kind]
        assert d["retain_weight"] == m.retain_weight
        assert d["retain_term"].endswith("; G)" if source == "general" else "; R)")
