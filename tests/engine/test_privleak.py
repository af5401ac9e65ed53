"""privleak on any forget set: MUSE's (AUC − AUC_retrained) / AUC_retrained × 100, from the run's own
membership attack (--privleak-attack) against a retrained model's AUC given with --retrained-auc; and
the figures a run's milestone carries that issue 22's outside check reads (exact_memorization,
extraction_strength, mia_auc.reference, with θ0 or --reference-model as the reference)."""
from __future__ import annotations

import json

import pytest

from tests.studies_helpers import assert_one_line_error, cli_in_process


def _run(capsys, model, f, *extra):
    return cli_in_process(capsys, "run", "--model", model, "--forget", f["forget"], "--retain", f["retain"],
                          "--unseen", f["unseen"], "--method", "ga", "--lr", "3e-3", "--steps", "2", "--seq-len", "128",
                          *extra, "--json")


def test_privleak_is_the_chosen_attacks_auc_against_the_retrained_one(tiny_model_dir, forget_set_files, capsys):
    p = _run(capsys, tiny_model_dir, forget_set_files, "--retrained-auc", "0.4", "--privleak-attack", "loss")
    assert p.returncode == 0, p.stderr
    cell = json.loads(p.stdout)["milestones"][0]
    assert cell["privleak"] == pytest.approx((cell["mia_auc"]["loss"] - 0.4) / 0.4 * 100)
    # and every run's milestone has open-unlearning's memorization figures
    for path in ("exact_memorization", "extraction_strength"):
        assert set(cell[path]) == {"forget", "retain_eval", "unseen"} and 0 <= cell[path]["forget"] <= 1
    plain = json.loads(_run(capsys, tiny_model_dir, forget_set_files).stdout)["milestones"][0]
    assert "privleak" not in plain  # only with a retrained model's AUC to compare with
    # the reference attack in every run: θ0 by default; the same model named with --reference-model
    # (loaded through from_pretrained) gives the same figure
    assert 0 <= plain["mia_auc"]["reference"] <= 1
    named = _run(capsys, tiny_model_dir, forget_set_files, "--reference-model", str(tiny_model_dir))
    assert json.loads(named.stdout)["milestones"][0]["mia_auc"]["reference"] == plain["mia_auc"]["reference"]


@pytest.mark.parametrize("args, needle", [
    (["--retrained-auc", "1.5"], "--retrained-auc must be an AUC in (0, 1]"),
    (["--retrained-auc", "0.5", "--privleak-attack", "gradnorm"], "--privleak-attack must be one of loss, zlib"),
])
def test_bad_privleak_settings_are_one_line(tiny_model_dir, forget_set_files, capsys, args, needle):
    assert_one_line_error(_run(capsys, tiny_model_dir, forget_set_files, *args), needle)
