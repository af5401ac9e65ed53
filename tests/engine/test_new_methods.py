"""The methods beyond the paper (NPO, SimNPO, WGA, UNDIAL, RMU): each loss against a direct
float64 computation written here, the data they prepare once, what they train, and the prefix
property of every one of them on a real (tiny) model.

The references are deliberately plain loops and gathers, independent of engine.methods.base."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.evaluate import evaluate
from engine.methods import get_method, list_methods
from engine.methods.base import IGNORE, causal_labels
from engine.methods.npo import NPOForget
from engine.methods.rmu import DOWN_PROJ, down_projections, rmu_layer
from engine.methods.simnpo import SimNPOForget
from engine.methods.undial import AdjustedSelfDistillation
from engine.methods.wga import WeightedAscent
from engine.models import load_model
from engine.run import train_to_milestones
from tests.engine.test_methods import ctx_for, hand_batch, predicted_positions, trimmed

# Losses are read as numbers with float() while they still carry their graph (some tests then
# take the gradient): torch's warning about that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

NEW_METHODS = ["npo", "npo_gd", "npo_kl", "rmu", "simnpo", "simnpo_gd", "task_vector", "undial", "wga", "whp"]


# ------------------------------------------------------------------ float64 references

def ref_seq_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log p(y_t), number of predicted tokens) per row, float64, one gather per predicted token
    (differentiable: one test takes its gradient)."""
    logp = torch.log_softmax(logits.double(), -1)
    total = torch.zeros(labels.size(0), dtype=torch.float64)
    count = torch.zeros(labels.size(0), dtype=torch.float64)
    for b, t in zip(*predicted_positions(labels)):
        total[b] += logp[b, t - 1, labels[b, t]]
        count[b] += 1
    return total, count


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_npo(logits, labels, ref_logprob, beta):
    lp, _ = ref_seq_logprob(logits.detach(), labels)
    return -(2 / beta) * sum(log_sigmoid(-beta * (float(a) - float(b))) for a, b in zip(lp, ref_logprob)) / len(lp)


def ref_simnpo(logits, labels, beta, delta):
    lp, n = ref_seq_logprob(logits.detach(), labels)
    return -(2 / beta) * sum(log_sigmoid(-beta * float(a / c) - beta * delta) for a, c in zip(lp, n)) / len(lp)


def ref_wga(logits, labels, beta):
    logp = torch.log_softmax(logits.detach().double(), -1)
    terms = [math.exp(beta * float(logp[b, t - 1, labels[b, t]])) * float(logp[b, t - 1, labels[b, t]])
             for b, t in zip(*predicted_positions(labels))]
    return sum(terms) / len(terms)


def ref_undial(logits, ref_logits, labels, beta):
    logits, out = logits.detach(), []
    for b, t in zip(*predicted_positions(labels)):
        z = ref_logits[b, t - 1].double().clone()
        z[labels[b, t]] -= beta
        logq = torch.log_softmax(z, -1)
        logp = torch.log_softmax(logits[b, t - 1].double(), -1)
        out.append(float((logq.exp() * (logq - logp)).sum()))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_loss_against_float64(beta):
    logits, labels = hand_batch(40)
    ref_logprob = torch.tensor([-20.0, -9.5, -4.0])
    got = NPOForget(beta).loss(logits, {"labels": labels, "ref_logprob": ref_logprob})
    assert float(got.detach()) == pytest.approx(ref_npo(logits, labels, ref_logprob, beta), rel=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_npo_at_the_reference_is_two_over_beta_log_two_with_the_gradient_of_ascent():
    """At θ = θ0 every ratio is 0: L = (2/β)·log 2, and ∇L = ∇ mean_i Σ_t log π(y_i,t), the gradient
    of ascent on the summed log-likelihood (each chunk's weight 2σ(0) = 1)."""
    logits, labels = hand_batch(41)
    lp, _ = ref_seq_logprob(logits.detach(), labels)
    loss = NPOForget(0.1).loss(logits, {"labels": labels, "ref_logprob": lp.float()})
    assert float(loss.detach()) == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    loss.backward()
    npo_grad = logits.grad.clone()
    logits.grad = None
    ascent = sum(ref_seq_logprob(logits, labels)[0]) / len(lp)  # mean over chunks of Σ log p
    ascent.backward()
    torch.testing.assert_close(npo_grad.double(), logits.grad.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_simnpo_loss_against_float64_and_its_sign(delta):
    logits, labels = hand_batch(42)
    got = SimNPOForget(4.5, delta).loss(logits, {"labels": labels})
    assert float(got.detach()) == pytest.approx(ref_simnpo(logits, labels, 4.5, delta), rel=1e-6)
    # the sign convention: making every label less likely lowers the loss (minimizing forgets)
    lower = logits.detach().clone()
    for b, t in zip(*predicted_positions(labels)):
        lower[b, t - 1, labels[b, t]] -= 2.0
    assert float(SimNPOForget(4.5, delta).loss(lower, {"labels": labels})) < float(got)
    # and a larger margin δ asks for more: the loss is higher at the same model
    assert float(SimNPOForget(4.5, delta + 1).loss(logits, {"labels": labels})) > float(got)


def test_wga_loss_against_float64_and_plain_ascent_at_beta_zero():
    logits, labels = hand_batch(43)
    for beta in (1.0, 0.5):
        got = WeightedAscent(beta).loss(logits, {"labels": labels})
        assert float(got.detach()) == pytest.approx(ref_wga(logits, labels, beta), rel=1e-6)
    ga = get_method("ga").forget.loss(logits, {"labels": labels})
    assert float(WeightedAscent(0.0).loss(logits, {"labels": labels})) == pytest.approx(float(ga), rel=1e-6)
    # the weight is detached: the gradient of token t is p_t^β ∇log p_t, not ∇(p_t^β log p_t)
    loss = WeightedAscent(1.0).loss(logits, {"labels": labels})
    loss.backward()
    rows, pos = predicted_positions(labels)
    logp = torch.log_softmax(logits.detach().double(), -1)
    expected = torch.zeros_like(logits, dtype=torch.float64)
    for b, t in zip(rows, pos):
        p = logp[b, t - 1].exp()
        w = float(p[labels[b, t]])
        onehot = torch.zeros_like(p)
        onehot[labels[b, t]] = 1.0
        expected[b, t - 1] += w * (onehot - p) / len(rows)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_undial_loss_against_float64():
    logits, labels = hand_batch(44)
    ref = hand_batch(45)[0].detach()
    for beta in (10.0, 2.0):
        got = AdjustedSelfDistillation(beta).loss(logits, {"labels": labels}, ref)
        assert float(got.detach()) == pytest.approx(ref_undial(logits, ref, labels, beta), rel=1e-6)
    # at θ = θ0 with β = 0 the target is the model itself: nothing to learn
    same = AdjustedSelfDistillation(0.0).loss(ref, {"labels": labels}, ref)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert float(AdjustedSelfDistillation(10.0).loss(ref, {"labels": labels}, ref)) > 0.01


def test_pads_do_not_count_in_the_new_losses():
    logits, labels = hand_batch(46)
    ref = hand_batch(47)[0].detach()
    batch = {"labels": labels, "ref_logprob": torch.tensor([-3.0, -2.0, -1.0])}
    terms = [NPOForget(), SimNPOForget(), WeightedAscent(), AdjustedSelfDistillation()]
    before = [float(t.loss(logits, batch, ref)) for t in terms]
    l2, r2 = logits.detach().clone(), ref.clone()
    l2[2, 3:], r2[2, 3:] = 100.0, -50.0  # row 2 has 4 real labels: logits from 3 on predict pads
    after = [float(t.loss(l2, batch, r2)) for t in terms]
    assert after == pytest.approx(before, rel=1e-6)


# ------------------------------------------------------------------ on the real (tiny) model

def test_npo_cached_reference_logprobs_equal_a_live_reference(tiny_model_dir, tiny_tokenizer, tiny_sets):
    theta0 = load_model(str(tiny_model_dir)).eval()
    ch = tiny_sets.forget
    cached = NPOForget().prepare(ch.input_ids, ch.attention_mask, ctx_for(tiny_tokenizer, reference=theta0, batch_size=5))
    live = []
    for b in range(len(ch)):  # each chunk alone, exactly its real tokens
        n = int(ch.attention_mask[b].sum())
        ids = ch.input_ids[b:b + 1, :n]
        with torch.no_grad():
            logits = theta0(input_ids=ids).logits
        live.append(float(ref_seq_logprob(logits, ids)[0][0]))
    assert cached["ref_logprob"].shape == (len(ch),)
    assert cached["ref_logprob"].tolist() == pytest.approx(live, rel=1e-5)


def test_npo_first_step_loss_is_two_over_beta_log_two(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    """The training loop's first loss (θ = θ0, cached reference): every ratio is 0."""
    cfg = RunConfig(method="npo", lr=1e-3, milestones=(1,), batch_size=4, seq_len=128)
    out = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)
    assert out.losses[0] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)


def test_rmu_loss_against_float64_on_the_model(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    """The first RMU loss: layer-ℓ activations of the forget batch against c·u, float64."""
    model = load_model(str(tiny_model_dir)).eval()
    method = get_method("rmu")
    ctx = ctx_for(tiny_tokenizer, reference=model)
    control = method.forget.constants(ctx)["rmu_control"]
    assert float(control.norm()) == pytest.approx(6.5, rel=1e-6) and (control >= 0).all()
    ids, mask = trimmed(tiny_sets.forget.subset(list(range(4))))
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[rmu_layer(model) + 1]
    diffs = [float(((h[b, t].double() - control.double()) ** 2).mean()) for b, t in zip(*mask.nonzero(as_tuple=True))]
    got = method.forget.forward_loss(model, {"input_ids": ids, "attention_mask": mask, "rmu_control": control})
    assert float(got.detach()) == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    # the retain term against its cache is zero at θ0
    rch = tiny_sets.retain.subset(list(range(4)))
    prepared = method.retain.prepare(rch.input_ids, rch.attention_mask, ctx)
    rids, rmask = trimmed(rch)
    batch = {"input_ids": rids, "attention_mask": rmask, "rmu_frozen": prepared["rmu_frozen"][:, : rids.size(1)]}
    assert float(method.retain.forward_loss(model, batch)) == pytest.approx(0.0, abs=1e-10)


def test_rmu_trains_only_its_down_projections(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = load_model(str(tiny_model_dir))
    names = down_projections(theta0)
    assert names == [f"model.layers.{i}.mlp.down_proj." for i in range(0, rmu_layer(theta0) + 1)]
    cfg = RunConfig(method="rmu", lr=1e-2, milestones=(3,), batch_size=4, seq_len=128)
    out = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)
    before, after = dict(theta0.named_parameters()), dict(out.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(tuple(names)) for n in changed)
    untouched = [n for n in before if not n.startswith(tuple(names))]
    assert untouched and all(torch.equal(before[n], after[n]) for n in untouched)


def test_rmu_finds_names_by_shape_and_refuses_what_it_cannot_find(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    known = down_projections(model)
    model.config.model_type = "llama-like-fork"  # not in the table: found by name, the same modules
    assert down_projections(model) == known

    class Odd(torch.nn.Module):  # no module named like an MLP output projection
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mamba", "num_hidden_layers": 6})()
            self.backbone = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(6)])

    with pytest.raises(UnlearnError, match="rmu: no MLP down-projection names for model type 'mamba'"):
        down_projections(Odd())
    assert {"llama", "mistral", "qwen2", "gpt_neox", "gpt2", "opt"} <= set(DOWN_PROJ)


def test_rmu_names_exist_in_each_family():
    """The resolved names are real parameters of GPT-NeoX, GPT-2, OPT and Qwen2 models built from a
    config, and the generic search agrees with the table on each."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    models = [GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6,
                                              num_attention_heads=2, intermediate_size=32)),
              GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=6, n_head=2)),
              OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                                       ffn_dim=32, word_embed_proj_dim=16)),
              Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=32))]
    for model in models:
        params = {n for n, _ in model.named_parameters()}
        prefixes = down_projections(model)
        assert len(prefixes) == 3 and rmu_layer(model) == 2
        assert all(any(p.startswith(prefix) for p in params) for prefix in prefixes), prefixes
        model.config.model_type = "unknown-" + model.config.model_type
        assert down_projections(model) == prefixes, model.config.model_type


def test_the_new_methods_are_registered_after_the_paper_seven():
    ids = [m.id for m in list_methods()]
    assert ids[:7] == ["ga", "random_label", "adversarial", "ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general"]
    assert set(NEW_METHODS) <= set(ids[7:])
    assert get_method("simnpo_gd").forget_weight == 0.125 and get_method("simnpo_gd").retain_weight == 1.0
    assert get_method("rmu").retain_weight == 100.0
    # a live θ0 copy only where a loss reads θ0's logits at every step
    assert {m.id for m in list_methods() if m.needs_reference_logits} == {"ga_kl", "ga_kl_general", "npo_kl", "undial"}


@pytest.mark.parametrize("method_id", NEW_METHODS)
def test_prefix_property_of_the_new_methods(method_id, tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    """The run to [1, 3] passes through exactly the model of the run to [1] (CPU: bitwise)."""
    outs = []
    for milestones in ((1, 3), (1,)):
        cfg = RunConfig(method=method_id, lr=3e-3, milestones=milestones, batch_size=4, seq_len=128)
        outs.append(train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline))
    long, short = outs
    assert long.milestones[0] == short.milestones[0]  # == on floats: bitwise
    assert long.losses[:1] == short.losses
    assert all(math.isfinite(x) for x in long.losses)
    assert long.milestones[1]["ppl_forget"] != long.milestones[0]["ppl_forget"]  # it trains
    assert all(long.milestones[0][k] is not None for k in ("ppl_forget", "ppl_retain", "ppl_unseen", "score"))


def test_labels_prepared_for_retain_are_plain_next_token_labels(tiny_tokenizer, tiny_sets):
    ch = tiny_sets.retain
    for m in ("npo_gd", "simnpo_gd"):
        got = get_method(m).retain.prepare(ch.input_ids, ch.attention_mask, ctx_for(tiny_tokenizer))
        assert torch.equal(got["labels"], causal_labels(ch.input_ids, ch.attention_mask))
        assert (got["labels"][ch.attention_mask == 0] == IGNORE).all()


@pytest.fixture(scope="module")
def other_families(tiny_tokenizer, tmp_path_factory) -> dict:
    """Untrained GPT-2, GPT-NeoX and Qwen2 models built from a config for the tiny tokenizer, saved
    and loaded back the user's way: architectures other than the demo's Llama."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    v = len(tiny_tokenizer)
    made = {"gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=3, n_head=2, n_positions=256)),
            "gpt_neox": GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=v, hidden_size=32, num_hidden_layers=3,
                                                        num_attention_heads=2, intermediate_size=64,
                                                        max_position_embeddings=256)),
            "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=v, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                  num_key_value_heads=2, intermediate_size=64,
                                                  max_position_embeddings=256))}
    out = {}
    for kind, model in made.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "qwen2"])
def test_every_new_method_runs_on_other_architectures(kind, other_families, tiny_tokenizer, tiny_sets):
    """Each new method, two steps on each family: every metric finite at the first milestone."""
    path = str(other_families[kind])
    baseline = evaluate(load_model(path), tiny_sets)[0]
    for method_id in NEW_METHODS:
        cfg = RunConfig(method=method_id, lr=1e-3, milestones=(1, 2), batch_size=4, seq_len=128)
        out = train_to_milestones(load_model(path), tiny_tokenizer, tiny_sets, cfg, baseline)
        first = out.milestones[0]
        values = [first[k] for k in ("ppl_forget", "ppl_retain", "ppl_unseen", "forget_gap", "retain_drift", "score")]
        values += list(first["mia_auc"].values())
        assert not out.diverged and all(v is not None and math.isfinite(v) for v in values), (method_id, first)


def test_methods_all_lists_what_cannot_run_and_why(capsys):
    from tests.studies_helpers import cli_in_process

    p = cli_in_process(capsys, "methods", "--all", "--json")
    rows = json.loads(p.stdout)
    absent = {r["id"]: r for r in rows if not r["runnable"]}
    assert set(absent) == {"kga", "quark", "serac", "icul", "leace"} and all(r["why"] for r in absent.values())
    assert {r["id"] for r in rows if r["runnable"]} >= set(NEW_METHODS)
    assert not any(not r["runnable"] for r in json.loads(cli_in_process(capsys, "methods", "--json").stdout))
    with pytest.raises(UnlearnError, match="method 'leace' \\(LEACE .*\\) is not runnable here: closed-form"):
        get_method("leace")


def test_task_vector_at_alpha_zero_reports_theta0_exactly(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = dict(load_model(str(tiny_model_dir)).named_parameters())
    cfg = RunConfig(method="task_vector[alpha=0]", lr=1e-2, milestones=(2,), batch_size=4, seq_len=128)
    out = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)
    assert all(torch.equal(theta0[n], p) for n, p in out.model.named_parameters())
    assert out.milestones[0]["ppl_forget"] == pytest.approx(baseline["ppl_forget"], rel=1e-6)


def test_task_vector_reports_the_negated_fine_tune(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    """The reported model is θ0 − α·(θ_s − θ0) of one fine-tuning trajectory θ_s: runs at α = 1 and
    α = 0.5 share their losses, and both give back the same θ_s."""
    theta0 = dict(load_model(str(tiny_model_dir)).named_parameters())
    outs = {}
    for alpha in (1.0, 0.5):
        cfg = RunConfig(method=f"task_vector[alpha={alpha}]", lr=1e-2, milestones=(2,), batch_size=4, seq_len=128)
        outs[alpha] = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)
    assert outs[1.0].losses == outs[0.5].losses  # the trajectory does not depend on α
    moved = 0
    for n, p in outs[1.0].model.named_parameters():
        p_half = dict(outs[0.5].model.named_parameters())[n]
        tuned_from_1 = theta0[n] - (p - theta0[n]) / 1.0
        tuned_from_half = theta0[n] - (p_half - theta0[n]) / 0.5
        torch.testing.assert_close(tuned_from_1, tuned_from_half, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(p, theta0[n]))
    assert moved > 0
    # learning U then subtracting it makes U less likely than under θ0
    assert outs[1.0].milestones[0]["ppl_forget"] > baseline["ppl_forget"]


def test_whp_generic_labels_against_a_direct_computation():
    from engine.methods.whp import generic_labels

    g = torch.Generator().manual_seed(5)
    base, boosted = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(11, (2, 6), generator=g)
    labels[1, 4:] = IGNORE
    for alpha in (1.0, 0.0, 3.0):
        got = generic_labels(base, boosted, labels, alpha)
        for b in range(2):
            for t in range(6):
                if t == 0 or labels[b, t] == IGNORE:
                    assert got[b, t] == labels[b, t]
                    continue
                v = [float(base[b, t - 1, a]) - alpha * max(0.0, float(boosted[b, t - 1, a] - base[b, t - 1, a]))
                     for a in range(11)]
                assert int(got[b, t]) == max(range(11), key=v.__getitem__)
    # α = 0: θ0's own prediction; a token the reinforced model boosts loses its place
    assert torch.equal(generic_labels(base, boosted, labels, 0.0)[0, 1:], base[0, :-1].argmax(-1))


def test_whp_builds_its_reinforced_model_once_and_reuses_it(tiny_model_dir, tiny_tokenizer, tiny_sets, tmp_path):
    from engine.methods.whp import reinforced_model

    theta0 = load_model(str(tiny_model_dir)).eval()
    ctx = ctx_for(tiny_tokenizer, reference=theta0)
    ctx.cache_dir, ctx.cache_key = tmp_path, "tiny-fs"
    ch = tiny_sets.forget
    built = reinforced_model(ch.input_ids, ch.attention_mask, ctx, 3)
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and (saved[0] / "config.json").is_file()
    loaded = reinforced_model(ch.input_ids, ch.attention_mask, ctx, 3)
    assert all(torch.equal(p, q) for p, q in zip(built.parameters(), loaded.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(built.parameters(), theta0.parameters()))  # it did train
    fresh = load_model(str(tiny_model_dir))
    assert all(torch.equal(p, q) for p, q in zip(theta0.parameters(), fresh.parameters()))  # θ0 is left as it was
    reinforced_model(ch.input_ids, ch.attention_mask, ctx, 4)  # another budget: another model
    assert len(list(tmp_path.iterdir())) == 2
