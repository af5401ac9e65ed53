"""The update rule (Method.update), GRU and PDU: the default rule is the old single backward bit for
bit; GRU's projection against a float64 hand computation on tiny tensors (conflict or not, global
inner products, its running retain gradient, its sign); PDU's forget loss against float64 and its dual
variable λ over steps by hand; two steps of each on the tiny model with the prefix property; a two-process
GRU run sharded and data parallel; `unlearn methods --json`."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.methods import get_method
from engine.methods.base import SUM, UpdateContext
from engine.methods.gru import RectifiedUpdate
from engine.methods.pdu import LogitMarginFlattening, PrimalDualUpdate
from engine.models import load_model
from engine.run import _deterministic, _Run
from tests.engine.test_methods import hand_batch, predicted_positions, two_steps_sharing_the_first

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")


# ------------------------------------------------------------------ the default rule

def old_step(run: _Run, step: int) -> torch.Tensor:
    """One step exactly as the loop took it before update rules (engine/run.py at b9a0b30)."""
    m = run.method
    fb = run._batch(run.sets.forget, run.forget_extra, run.constants["forget"], run.cfg.seed, step)
    with run.autocast():
        loss = m.forget.forward_loss(run.model, fb, run.reference)
    if m.forget_weight != 1.0:
        loss = m.forget_weight * loss
    if run.retain_chunks is not None:
        rb = run._batch(run.retain_chunks, run.retain_extra, run.constants["retain"], run.cfg.seed + 1, step)
        with run.autocast():
            retain = m.retain.forward_loss(run.model, rb, run.reference)
        loss = loss + (retain if run.retain_weight == 1.0 else run.retain_weight * retain)
    run.accelerator.backward(loss)
    run.accelerator.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


@pytest.mark.parametrize("method_id", ["satimp", "ga_gd[retain_weight=0.5]"])  # w_f = 0.1; w_r = 0.5
def test_the_default_rule_is_the_old_single_backward_bit_for_bit(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets):
    assert get_method(method_id).update is SUM
    cfg = RunConfig(method=method_id, lr=3e-3, milestones=(2,), batch_size=4, seq_len=128).validate()
    with _deterministic(True):
        new = _Run.set_up(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg)
        old = _Run.set_up(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg)
        for step in (1, 2):
            loss, _ = new.step_loss(step)
            new.optimizer_step(loss)
            assert torch.equal(loss.detach(), old_step(old, step).detach())
    for (name, a), b in zip(new.model.named_parameters(), old.model.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ a rule on tiny tensors

class Linear2(torch.nn.Module):
    """Two weight tensors; each loss below is linear in them, so its gradient is a constant we choose."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2))

    def linear(self, ca, cb):
        return (self.a * torch.tensor(ca)).sum() + (self.b * torch.tensor(cb)).sum()


def tiny_ctx(model, forget_weight=1.0, retain_weight=0.0, forget_chunks=4, global_batch=2) -> UpdateContext:
    return UpdateContext(Accelerator(cpu=True), model, list(model.parameters()), forget_weight, retain_weight,
                         False, forget_chunks, global_batch)


def rule_grads(rule, ctx, state, gf, gr):
    """Run the rule's backward on losses whose gradients are gf and gr (each a pair: tensor a, tensor b);
    the gradient it leaves, flattened, in float64."""
    m = ctx.model
    for p in m.parameters():
        p.grad = None
    f, r = m.linear(*gf), m.linear(*gr)
    loss = rule.loss(f, r, ctx, state)
    rule.backward(loss, f, r, ctx, state)
    return torch.cat([m.a.grad, m.b.grad]).double()


def flat(pair):
    return torch.tensor(pair[0] + pair[1], dtype=torch.float64)


def hand_rectified(g, r):
    """float64: g − (⟨g,r⟩/‖r‖²)·r where ⟨g,r⟩ < 0, else g; ⟨·,·⟩ over both tensors at once."""
    dot = float(g @ r)
    return g - dot / float(r @ r) * r if dot < 0 else g


G_F = ([1.0, -2.0, 0.5], [3.0, 1.0])  # the forget gradient (of −CE, say)
G_R1 = ([-1.0, 1.0, 2.0], [-0.5, 4.0])  # ⟨g_f, g_r⟩ = −1 −2 +1 −1.5 +4 = 0.5 > 0 … over both tensors
G_R2 = ([2.0, 1.0, 0.0], [-1.0, -3.0])  # ⟨g_f, g_r⟩ = 2 −2 +0 −3 −3 = −6 < 0: a conflict


def test_gru_projects_only_where_the_forget_gradient_conflicts_with_the_running_retain_gradient():
    model, rule = Linear2(), RectifiedUpdate(gamma=0.8)
    ctx = tiny_ctx(model)
    state = rule.start(ctx)
    # step 1: r = 0.8·g_r1 (r_0 = 0); ⟨g_f, r⟩ > 0 overall although tensor b alone conflicts
    # (3·(−0.5) + 1·4 > 0 ... and tensor a: −1 −2 +1 < 0): global, not per tensor, so g_f is left whole
    r1 = 0.8 * flat(G_R1)
    got = rule_grads(rule, ctx, state, G_F, G_R1)
    assert float(flat(G_F)[:3] @ r1[:3]) < 0 < float(flat(G_F) @ r1)
    assert torch.equal(got, flat(G_F)) and state.projected == 0
    # step 2: r = 0.8·g_r2 + 0.2·r1, and ⟨g_f, r⟩ < 0: the projection
    r2 = 0.8 * flat(G_R2) + 0.2 * r1
    want = hand_rectified(flat(G_F), r2)
    assert float(flat(G_F) @ r2) < 0
    got = rule_grads(rule, ctx, state, G_F, G_R2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert state.projected == 1
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in state.r]).double(), r2, rtol=1e-6, atol=1e-7)
    # a per-tensor projection would have given another step
    per_tensor = torch.cat([hand_rectified(flat(G_F)[:3], r2[:3]), hand_rectified(flat(G_F)[3:], r2[3:])])
    assert not torch.allclose(got, per_tensor, atol=1e-3)


def test_gru_sign_convention_a_rectified_step_lowers_the_forget_loss_and_leaves_retain_alone_to_first_order():
    """γ = 1 (r is this step's retain gradient): a descent step along the rectified gradient lowers the
    (linear) forget loss and leaves the (linear) retain loss exactly where it was; the raw forget
    gradient would have raised it."""
    model, rule = Linear2(), RectifiedUpdate(gamma=1.0)
    ctx = tiny_ctx(model)
    got = rule_grads(rule, ctx, rule.start(ctx), G_F, G_R2)
    g_f, g_r = flat(G_F), flat(G_R2)
    assert float(got @ g_r) == pytest.approx(0.0, abs=1e-6)  # Δ L_r = −η⟨g', g_r⟩ = 0
    assert float(got @ g_f) > 0  # Δ L_f = −η⟨g', g_f⟩ < 0
    assert float(g_f @ g_r) < 0  # while the raw step would raise L_r


def test_gru_with_a_retain_weight_projects_the_whole_objective_gradient():
    """retain_weight w_r: g = w_f·g_f + w_r·g_r, then projected off r (here γ = 1: r = g_r)."""
    model, rule = Linear2(), RectifiedUpdate(gamma=1.0)
    ctx = tiny_ctx(model, forget_weight=2.0, retain_weight=0.25)
    g = 2.0 * flat(G_F) + 0.25 * flat(G_R2)
    got = rule_grads(rule, ctx, rule.start(ctx), G_F, G_R2)
    torch.testing.assert_close(got, hand_rectified(g, flat(G_R2)), rtol=1e-6, atol=1e-6)
    assert float(g @ flat(G_R2)) < 0  # it was a conflict


def test_gru_knobs_and_its_checks():
    m = get_method("gru")
    assert (m.forget.id, m.retain.id, m.retain_source, m.retain_weight) == ("gradient_ascent", "descent", "retain", 0.0)
    assert m.knob_values() == {"gamma": 0.8, "forget_weight": 1.0, "retain_weight": 0.0, "saliency": 0.0}
    v = get_method("gru[gamma=0.5]")
    assert (v.id, v.update.gamma, m.update.gamma) == ("gru[gamma=0.5]", 0.5, 0.8)  # the shared one unchanged
    for bad in ("gru[gamma=0.0]", "gru[gamma=1.5]"):
        with pytest.raises(UnlearnError, match="gamma"):
            get_method(bad)


def test_gru_on_the_real_model_leaves_a_step_orthogonal_to_the_retain_gradient(tiny_model_dir, tiny_tokenizer,
                                                                                tiny_sets):
    """On the tiny model ascent on U conflicts with descent on R (records alike), so the rule projects:
    the gradient it leaves for the optimizer has ⟨g', r⟩ = 0 over all weights, and ⟨g', g_f⟩ > 0."""
    cfg = RunConfig(method="gru[gamma=1.0]", lr=3e-3, milestones=(1,), batch_size=4, seq_len=128).validate()
    with _deterministic(True):
        run = _Run.set_up(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg)
        loss, _ = run.step_loss(1)
        forget, retain = run.step_losses
        g_f = torch.autograd.grad(forget, run.update.params, retain_graph=True)
        run.method.update.backward(loss, forget, retain, run.update, run.update_state)
    got = torch.cat([p.grad.reshape(-1) for p in run.update.params]).double()
    r = torch.cat([t.reshape(-1) for t in run.update_state.r]).double()
    g_f = torch.cat([g.reshape(-1) for g in g_f]).double()
    assert run.update_state.projected == 1 and float(g_f @ r) < 0
    assert abs(float(got @ r)) < 1e-5 * float(got.norm() * r.norm())
    assert float(got @ g_f) > 0
    torch.testing.assert_close(got, hand_rectified(g_f, r), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ PDU

def ref_pdu_forget(logits, labels) -> tuple[float, torch.Tensor]:
    """(mean over predicted tokens of (max z − mean z)², its gradient 2(max − mean)(onehot(argmax) − 1/V)/N), float64."""
    logits = logits.detach().double()
    rows, pos = predicted_positions(labels)
    total, grad = 0.0, torch.zeros_like(logits)
    for b, t in zip(rows.tolist(), pos.tolist()):
        z = logits[b, t - 1]
        gap = float(z.max() - z.mean())
        total += gap ** 2
        d = torch.full_like(z, -1.0 / len(z))
        d[int(z.argmax())] += 1.0
        grad[b, t - 1] += 2 * gap * d
    return total / len(rows), grad / len(rows)


def test_pdu_forget_loss_and_gradient_against_float64_and_its_sign():
    logits, labels = hand_batch(70)
    got = LogitMarginFlattening().loss(logits, {"labels": labels})
    want, want_grad = ref_pdu_forget(logits, labels)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    # a descent step narrows every scored position's top-minus-mean gap; flat logits cost 0
    stepped = logits.detach() - 0.05 * logits.grad
    rows, pos = predicted_positions(labels)
    gap = lambda z: z.max(-1).values - z.mean(-1)  # noqa: E731
    assert (gap(stepped[rows, pos - 1]) < gap(logits.detach()[rows, pos - 1])).all()
    assert float(LogitMarginFlattening().loss(torch.ones_like(logits), {"labels": labels})) == 0.0


def test_pdu_lambda_over_steps_by_hand_with_its_warm_up_and_projection_at_zero():
    """λ_0 = retain_weight; after each step past the warm-up λ ← max(0, λ + η·(L_r − ε)); the step's
    gradient is w_f·∇L_f + λ_k·∇L_r and its reported loss w_f·L_f + λ_k·(L_r − ε)."""
    model = Linear2()
    rule = PrimalDualUpdate(eps=1.0, dual_step=0.5, warmup_epochs=1.0)
    ctx = tiny_ctx(model, forget_weight=2.0, retain_weight=3.0, forget_chunks=4, global_batch=2)  # an epoch: 2 steps
    state = rule.start(ctx)
    assert state.lam == 3.0
    with torch.no_grad():
        model.a.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.b.copy_(torch.tensor([-1.0, 0.5]))
    gf, gr = ([0.5, 0.0, 1.0], [2.0, 0.0]), ([1.0, 1.0, 1.0], [0.0, 2.0])  # L_f = 1.5, L_r = 7.0 here
    lam, history = 3.0, []
    for step in range(1, 5):
        f, r = model.linear(*gf), model.linear(*gr)
        loss = rule.loss(f, r, ctx, state)
        assert float(loss) == pytest.approx(2.0 * float(f) + lam * (float(r) - 1.0), rel=1e-6)
        rule.backward(loss, f, r, ctx, state)
        torch.testing.assert_close(torch.cat([model.a.grad, model.b.grad]).double(),
                                   2.0 * flat(gf) + lam * flat(gr), rtol=1e-6, atol=1e-6)
        if step > 2:  # the warm-up: one pass over U (4 chunks, 2 a step) leaves λ alone for 2 steps
            lam = max(0.0, lam + 0.5 * (float(r) - 1.0))
        assert state.lam == pytest.approx(lam, rel=1e-12)
        history.append(state.lam)
        for p in model.parameters():
            p.grad = None
        gr = ([-2.0, -2.0, -2.0], [0.0, -4.0]) if step == 3 else gr  # L_r = −14 at step 4: λ falls, to 0
    assert history == [3.0, 3.0, 6.0, 0.0] and state.steps == 4


def test_pdu_knobs_and_its_checks():
    m = get_method("pdu")
    assert (m.forget.id, m.retain.id, m.forget_weight, m.retain_weight) == ("logit_margin", "descent", 1.0, 1.0)
    assert m.knob_values() == {"eps": 0.3, "dual_step": 1.0, "warmup_epochs": 5.0, "forget_weight": 1.0,
                               "retain_weight": 1.0, "saliency": 0.0}
    v = get_method("pdu[dual_step=5.0,eps=1.5,retain_weight=100.0]")
    assert (v.update.eps, v.update.dual_step, v.retain_weight, v.id) == (1.5, 5.0, 100.0,
                                                                          "pdu[dual_step=5.0,eps=1.5,retain_weight=100.0]")
    for bad, msg in (("pdu[dual_step=-1.0]", "dual_step must be 0 or more"),
                     ("pdu[warmup_epochs=-1.0]", "warmup_epochs must be 0 or more"), ("pdu[lam=1.0]", "no knob")):
        with pytest.raises(UnlearnError, match=msg):
            get_method(bad)


def test_pdu_lambda_on_the_real_model_over_two_steps(tiny_model_dir, tiny_tokenizer, tiny_sets):
    """Through the loop's own set_up / step_loss / optimizer_step: each step's reported loss is the
    Lagrangian at λ_k and λ moves by η·(L_r − ε) (no warm-up here), read from the run's own state."""
    cfg = RunConfig(method="pdu[warmup_epochs=0.0,eps=0.5,dual_step=2.0]", lr=3e-3, milestones=(2,), batch_size=4,
                    seq_len=128).validate()
    with _deterministic(True):
        run = _Run.set_up(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg)
        lam = 1.0
        for step in (1, 2):
            loss, _ = run.step_loss(step)
            f, r = (float(x.detach()) for x in run.step_losses)
            assert float(loss.detach()) == pytest.approx(f + lam * (r - 0.5), rel=1e-6)
            run.optimizer_step(loss)
            lam = max(0.0, lam + 2.0 * (r - 0.5))
            assert run.update_state.lam == pytest.approx(lam, rel=1e-12)
    assert run.update_state.lam > 1.0  # the tiny model's retain loss is far above 0.5: λ grows


# ------------------------------------------------------------------ on the real (tiny) model

@pytest.mark.parametrize("method_id", ["gru", "gru[retain_weight=1.0]", "pdu[warmup_epochs=0.0]"])
def test_two_steps_with_finite_metrics_and_the_prefix_property(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets,
                                                               baseline):
    """The prefix property, finite figures, a model that trains (test_methods.two_steps_sharing_the_first)."""
    long = two_steps_sharing_the_first(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets, baseline)
    if method_id == "gru":  # the reported loss is the forget loss (w_r = 0): ascent, below zero
        assert all(x < 0 for x in long.losses)


# Two processes: tests/engine/test_process_count.py holds gru and pdu run on one process and on two
# (data parallel: each gradient averaged by the rule itself, DDP's reduction off; --fsdp: the shards'
# inner products summed over the processes) to the same cells; either mistake would part them.


# ------------------------------------------------------------------ the CLI

def test_methods_json_lists_both_with_their_knobs_and_their_update(capsys):
    from tests.studies_helpers import cli_in_process

    p = cli_in_process(capsys, "methods", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["id"]: r for r in json.loads(p.stdout)}
    assert rows["gru"]["knobs"] == {"gamma": 0.8, "forget_weight": 1.0, "retain_weight": 0.0, "saliency": 0.0}
    assert rows["pdu"]["knobs"] == {"eps": 0.3, "dual_step": 1.0, "warmup_epochs": 5.0, "forget_weight": 1.0,
                                    "retain_weight": 1.0, "saliency": 0.0}
    assert "‖r‖²" in rows["gru"]["update"] and "λ ← max(0" in rows["pdu"]["update"]
    assert (rows["pdu"]["retain_term"], rows["pdu"]["retain_source"]) == ("CE(θ; R)", "retain")
    assert "update" not in rows["ga_gd"]  # the default rule: the step is the sum's gradient


def test_the_memory_plan_counts_grus_gradient_buffers(tiny_model_dir):
    """`unlearn plan`: GRU holds r and the retain gradient beside `.grad` (3 gradient-sized buffers at its
    peak); PDU, like every default-rule method, holds none."""
    from engine.plan import Options, figures
    from engine.plan_shape import read_config, shape_of

    shape = shape_of(read_config(str(tiny_model_dir)))
    plan = {m: figures(shape, get_method(m), Options("fp32"), 4, 128) for m in ("ga_gd", "gru", "pdu")}
    assert plan["gru"]["gradients"] == 3 * plan["ga_gd"]["gradients"] > 0
    assert plan["pdu"]["gradients"] == plan["ga_gd"]["gradients"]
    assert {k: v for k, v in plan["gru"].items() if k != "gradients"} == \
        {k: v for k, v in plan["ga_gd"].items() if k != "gradients"}
