"""engine.verdict: the bands come from the target's own noise, the MIA part from an AUC interval."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.evaluate import roc_auc
from engine.verdict import FORGET_FLOOR, UTILITY_FLOOR, auc_interval, bands, forget_noise, log_ppl_half_width, target


def _docs(n, rng, mean=2.0, spread=0.5, tokens=20):
    nll = rng.normal(mean, spread, n).clip(0.1) * tokens
    return nll, np.full(n, tokens, dtype=float)


def test_the_forget_noise_shrinks_with_more_documents_and_is_seeded():
    rng = np.random.default_rng(0)
    nll, tok = _docs(200, rng)
    few = forget_noise(nll[:20], tok[:20], None, 20)
    many = forget_noise(nll, tok, None, 200)
    assert many < few
    assert forget_noise(nll[:20], tok[:20], None, 20) == few  # the same data, the same band
    assert forget_noise(nll[:20], tok[:20], None, 5) > few  # a smaller forget set is noisier
    # about 2 × 1.96 × σ(mean of n docs) for two samples of n: σ = 0.5 nats, n = 200
    assert many == pytest.approx(1.96 * math.sqrt(2) * 0.5 / math.sqrt(200), rel=0.25)


def test_documents_resample_together():
    """Chunks of one document are one draw: 10 documents cut into 5 chunks each are 10 samples, not 50."""
    rng = np.random.default_rng(1)
    nll, tok = _docs(10, rng)
    chunked_nll, chunked_tok = np.repeat(nll / 5, 5), np.repeat(tok / 5, 5)
    docs = [i for i in range(10) for _ in range(5)]
    assert log_ppl_half_width(chunked_nll, chunked_tok, docs) == pytest.approx(log_ppl_half_width(nll, tok, None))
    assert log_ppl_half_width(chunked_nll, chunked_tok, None) < log_ppl_half_width(nll, tok, None)


def test_the_auc_interval_holds_one_half_for_exchangeable_scores_and_not_for_remembered_ones():
    rng = np.random.default_rng(2)
    unseen = rng.normal(0, 1, 60)
    same = rng.normal(0, 1, 60)
    lo, hi = auc_interval(same, unseen)
    assert lo < roc_auc(same, unseen) < hi and lo <= 0.5 <= hi
    remembered = rng.normal(1.3, 1, 60)  # AUC about 0.8: a model fine-tuned a few epochs on U
    lo, hi = auc_interval(remembered, unseen)
    assert 0.5 < lo < roc_auc(remembered, unseen) < hi
    lo, hi = auc_interval(-remembered, unseen)  # over-unlearned: far below 0.5 is no pass either
    assert hi < 0.5
    assert auc_interval(np.array([1.0]), unseen) == (None, None)


def test_bands_are_the_largest_of_floor_noise_and_spread_unless_a_tolerance_is_given():
    base = {"ppl_unseen": 20.0, "noise": {"forget": 0.05, "utility": 0.2}}
    b = bands(base)
    assert b["forget"]["band"] == FORGET_FLOOR and b["utility"]["band"] == 0.2
    assert bands(base, target_spread=0.3)["forget"]["band"] == 0.3
    assert bands({**base, "noise": {"forget": 0.4, "utility": None}})["forget"]["band"] == 0.4
    assert bands({**base, "noise": {"forget": 0.4, "utility": None}})["utility"]["band"] == UTILITY_FLOOR
    given = bands(base, tol_forget=0.01, tol_retain=0.02, target_spread=0.3)
    assert given["forget"]["band"] == pytest.approx(math.log1p(0.01)) and given["forget"]["source"] == "tolerance"
    assert given["utility"]["band"] == pytest.approx(math.log1p(0.02))
    t = target(base, target_spread=0.3)
    assert t["value"] == pytest.approx(math.log(20.0)) and t["band"] == 0.3 and t["spread"] == 0.3
