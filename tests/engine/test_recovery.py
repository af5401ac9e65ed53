"""engine.recovery: the attacks that test whether forgetting holds. Quantization against a float64
reference and its error bound, the recovery formula, relearning on the original model (nothing to
recover) and on an unlearned one, and the run loop: attacks never change the training."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from engine.config import RunConfig, RunSettings, parse_attacks
from engine.data import ForgetSetChunks
from engine.errors import UnlearnError
from engine.evaluate import evaluate
from engine.models import load_model
from engine.recovery import (
    RELEARN_FRACTION,
    attack_milestone,
    attack_robustness,
    quantize_rtn,
    quantized_copy,
    quantized_layers,
    recovery,
    relearned_copy,
)
from engine.run import train_to_milestones
from tests.studies_helpers import cli_in_process


def ref_quantize(w: torch.Tensor, bits: int, channel_dim: int) -> torch.Tensor:
    """Per channel, in float64: scale = max|w| / (2^(b−1) − 1), q = clamp(round(w / scale))."""
    qmax = 2 ** (bits - 1) - 1
    w = w.double().movedim(channel_dim, 0)
    out = torch.empty_like(w)
    for c in range(w.size(0)):
        scale = float(w[c].abs().max()) / qmax or 1.0
        out[c] = torch.clamp(torch.round(w[c] / scale), -qmax - 1, qmax) * scale
    return out.movedim(0, channel_dim)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("channel_dim", [0, 1])
def test_quantization_matches_float64_and_its_error_bound(bits, channel_dim):
    g = torch.Generator().manual_seed(bits + channel_dim)
    w = torch.randn(7, 5, generator=g) * torch.logspace(-2, 1, 7).unsqueeze(1)
    w[3] = 0.0  # an all-zero row stays zero
    got = quantize_rtn(w, bits, channel_dim)
    torch.testing.assert_close(got.double(), ref_quantize(w, bits, channel_dim), rtol=1e-6, atol=1e-7)
    scale = w.abs().amax(dim=1 - channel_dim, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((got - w).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(quantize_rtn(got, bits, channel_dim), got)  # a fixed point
    levels = [len(torch.unique(got.movedim(channel_dim, 0)[c])) for c in range(got.size(channel_dim))]
    assert max(levels) <= 2 ** bits


def test_quantized_copy_leaves_the_model_and_its_output_embedding_alone(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    before = {n: p.clone() for n, p in model.named_parameters()}
    q = quantized_copy(model, 4)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the original is untouched
    names = {n for n, _, _ in quantized_layers(q)}
    assert names and "lm_head" not in names
    qp = dict(q.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], qp[n])}
    assert changed and changed <= {f"{n}.weight" for n in names}
    assert torch.equal(qp["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # tied to lm_head


def test_recovery_formula():
    # forgot: ppl_U 1.2 -> 12 (log 10 above θ0); the attack brings it to 2.4: log 5 of log 10 back
    assert recovery(12.0, 2.4, 1.2, 0.1) == pytest.approx(math.log(5) / math.log(10))
    assert recovery(12.0, 12.0, 1.2, 0.1) == 0.0
    assert recovery(12.0, 1.2, 1.2, 0.1) == pytest.approx(1.0)
    assert recovery(12.0, 24.0, 1.2, 0.1) < 0  # the attack made it forget more: reported as measured
    assert recovery(1.25, 1.0, 1.2, 0.1) is None  # within the tolerance of θ0: nothing to recover
    assert recovery(12.0, math.inf, 1.2, 0.1) is None and recovery(None, 2.0, 1.2, 0.1) is None


def test_attack_robustness_by_hand():
    # held: 1 − 0.2 = 0.8 against relearning, 1 − 0.5 = 0.5 against quantization (quant4, the stronger)
    assert attack_robustness({"relearn": 0.2, "quant4": 0.5, "quant8": 0.1}) == pytest.approx(2 * 0.8 * 0.5 / 1.3)
    assert attack_robustness({"relearn": 0.0, "quant8": 0.0}) == 1.0  # neither brings anything back
    assert attack_robustness({"relearn": 1.3, "quant4": 0.5}) == 0.0  # relearning undid it all (and more)
    assert attack_robustness({"relearn": -0.4, "quant4": -0.1}) == 1.0  # made it forget more: held whole
    assert attack_robustness({"relearn": 1.0, "quant4": 1.0}) == 0.0
    assert attack_robustness({"relearn": 0.2}) is None and attack_robustness({"quant4": 0.2, "quant8": 0.1}) is None
    assert attack_robustness({"relearn": None, "quant4": 0.2}) is None  # nothing forgotten: nothing to hold


def test_parse_attacks_and_the_setting():
    assert parse_attacks(" quant4, relearn,quant4 ") == ("relearn", "quant4")
    assert parse_attacks("") == ()
    with pytest.raises(UnlearnError, match="unknown attack 'int4'"):
        parse_attacks("int4")
    s = RunSettings(attacks="quant8,relearn").validate()
    flags = s.to_flags()
    assert s.attacks == "relearn,quant8" and flags[flags.index("--attacks") + 1] == "relearn,quant8"
    assert "--attacks" not in RunSettings().validate().to_flags()


def attack_all(model, sets, metrics, baseline, lr=3e-3):
    return attack_milestone(model, sets, ("relearn", "quant4", "quant8"), metrics, baseline, lr=lr, batch_size=4,
                            seed=0, eval_batch_size=8, min_k=0.2, tol_forget=0.1)[0]


def test_on_the_original_model_there_is_nothing_to_recover(tiny_model_dir, tiny_sets, baseline):
    """θ0 itself (a model that memorized U) forgot nothing: every recovery is None, the attacks still ran."""
    fields = attack_all(load_model(str(tiny_model_dir)), tiny_sets, baseline, baseline)
    assert fields["relearn_recovery"] is None and fields["quant4_recovery"] is None and fields["quant8_recovery"] is None
    assert set(fields["attacks"]) == {"relearn", "quant4", "quant8"}
    assert all(math.isfinite(m["ppl_forget"]) for m in fields["attacks"].values())


def test_relearning_learns_its_slice_and_leaves_the_model_alone(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    cfg = RunConfig(method="ga", lr=3e-3, milestones=(4,), batch_size=4, seq_len=128)
    model = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline).model.eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    relearned = relearned_copy(model, tiny_sets, 3e-3, 4, 0, torch.device("cpu"), contextlib.nullcontext)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # the slice it saw (10 % of U, seeded) became more likely: the attack did train on U
    n = len(tiny_sets.forget)
    take = torch.randperm(n, generator=torch.Generator().manual_seed(7919))[: max(1, round(RELEARN_FRACTION * n))]
    part = tiny_sets.forget.subset(take.tolist())
    only = ForgetSetChunks(part, part, part, None)
    assert evaluate(relearned, only)[0]["ppl_forget"] < evaluate(model, only)[0]["ppl_forget"]


def test_an_unlearned_model_reports_each_recovery(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    cfg = RunConfig(method="ga", lr=3e-3, milestones=(4,), batch_size=4, seq_len=128)
    out = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)
    cell = out.milestones[0]
    assert cell["ppl_forget"] > 1.5 * baseline["ppl_forget"]  # it did forget
    fields = attack_all(out.model.eval(), tiny_sets, cell, baseline)
    for name in ("relearn", "quant4", "quant8"):
        r = fields[f"{name}_recovery"]
        expected = recovery(cell["ppl_forget"], fields["attacks"][name]["ppl_forget"], baseline["ppl_forget"], 0.1)
        assert r == pytest.approx(expected) and math.isfinite(r)
    # 8 bits stay closer to the unlearned model than 4 bits
    gap = {b: abs(math.log(fields["attacks"][f"quant{b}"]["ppl_forget"]) - math.log(cell["ppl_forget"])) for b in (4, 8)}
    assert gap[8] < gap[4]
    # the one robustness figure, from the relearn and the stronger quantization recovery
    worst_quant = max(fields["quant4_recovery"], fields["quant8_recovery"])
    held = [min(1, max(0, 1 - r)) for r in (fields["relearn_recovery"], worst_quant)]
    assert fields["attack_robustness"] == pytest.approx(2 * held[0] * held[1] / (held[0] + held[1]) if sum(held) else 0.0)


def test_attacks_never_change_the_training(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    """With attacks at every milestone the run's losses and cells are bitwise those of the run
    without, and the prefix property holds."""
    def run(milestones, attacks):
        cfg = RunConfig(method="ga_gd", lr=3e-3, milestones=milestones, batch_size=4, seq_len=128, attacks=attacks)
        return train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)

    with_attacks, without, short = run((1, 3), "relearn,quant4"), run((1, 3), ""), run((1,), "relearn,quant4")
    assert with_attacks.losses == without.losses
    plain = [{k: v for k, v in c.items() if k not in ("attacks", "attack_robustness") and not k.endswith("_recovery")}
             for c in with_attacks.milestones]
    assert plain == without.milestones
    assert short.milestones[0] == with_attacks.milestones[0] and short.losses == with_attacks.losses[:1]
    assert "relearn_recovery" in with_attacks.milestones[1] and "quant8_recovery" not in with_attacks.milestones[1]


def test_unlearn_run_reports_both_recoveries(tiny_model_dir, forget_set_files, capsys):
    f = forget_set_files
    p = cli_in_process(capsys, "run", "--model", tiny_model_dir, "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], "--method", "ga", "--lr", "3e-3", "--steps", "2", "--seq-len", "128",
                       "--attacks", "relearn,quant4", "--json")
    assert p.returncode == 0, p.stderr
    cell = json.loads(p.stdout)["milestones"][0]
    assert {"relearn_recovery", "quant4_recovery"} <= set(cell) and set(cell["attacks"]) == {"relearn", "quant4"}
