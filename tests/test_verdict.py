"""The risk committee's numbers: paired DeLong intervals, verdicts, pooled sketches, health."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from flower_ext.metrics import (
    pooled_sketch_metrics,
    risk_metrics,
    risk_metrics_from_logits,
    score_sketch,
    sketch_rows_per_bin,
)
from flower_ext.verdict import (
    GAINS,
    LOSES,
    MIN_CLASS_ROWS,
    NO_DIFFERENCE,
    auc_interval,
    bank_summary,
    calibration_summary,
    delong,
    holm_rejections,
    paired_auc_comparison,
    score_health,
    verdict_from_interval,
)


def _two_models(n: int, rng: np.random.Generator, mu=(1.0, 0.8), rho=0.6, rate=0.2):
    """Binormal scores of two correlated models: true AUC_k = Phi(mu_k / sqrt(2))."""
    y = (rng.uniform(size=n) < rate).astype(int)
    e1 = rng.normal(size=n)
    e2 = rho * e1 + np.sqrt(1 - rho**2) * rng.normal(size=n)
    return y, mu[0] * y + e1, mu[1] * y + e2


def test_delong_auc_is_sklearns_and_handles_ties():
    rng = np.random.default_rng(1)
    y, a, b = _two_models(500, rng)
    a = np.round(a, 1)  # many ties: midranks count them one half
    aucs, cov = delong(y, a, b)
    assert aucs[0] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert aucs[1] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert cov.shape == (2, 2) and cov[0, 1] > 0  # same rows: correlated AUCs


def test_paired_delong_interval_matches_a_paired_bootstrap():
    """Reference: 2,000 paired bootstrap resamples of the same fixed rows (stratified)."""
    rng = np.random.default_rng(7)
    y, a, b = _two_models(800, rng)
    cmp = paired_auc_comparison(y, a, b)
    assert cmp.diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    boot = np.random.default_rng(11)
    diffs = []
    for _ in range(2000):
        idx = np.concatenate([boot.choice(pos, len(pos)), boot.choice(neg, len(neg))])
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert cmp.se == pytest.approx(np.std(diffs), rel=0.1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert cmp.low == pytest.approx(low, abs=0.01) and cmp.high == pytest.approx(high, abs=0.01)
    # the single-model interval against the bootstrap of one AUC
    auc, lo, hi = auc_interval(y, a)
    assert auc == pytest.approx(roc_auc_score(y, a))
    assert (hi - lo) / 2 / 1.96 == pytest.approx(_boot_se(y, a, boot), rel=0.1)


def _boot_se(y, s, rng, reps=1000):
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    vals = []
    for _ in range(reps):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals.append(roc_auc_score(y[idx], s[idx]))
    return float(np.std(vals))


def test_paired_interval_has_nominal_coverage_in_a_seeded_simulation():
    """400 test sets of 300 rows: the 95% interval covers the true difference ~95% of the time."""
    mu = (1.0, 0.8)
    truth = norm.cdf(mu[0] / np.sqrt(2)) - norm.cdf(mu[1] / np.sqrt(2))
    rng = np.random.default_rng(2024)
    reps, covered = 400, 0
    for _ in range(reps):
        y, a, b = _two_models(300, rng, mu=mu)
        cmp = paired_auc_comparison(y, a, b)
        covered += cmp.low <= truth <= cmp.high
    # binomial sd at 95% over 400 draws is 1.1%: 0.92..0.98 is about +-3 sd
    assert 0.92 <= covered / reps <= 0.98


def test_verdict_words():
    assert verdict_from_interval(0.01, 0.05) == GAINS
    assert verdict_from_interval(-0.05, -0.01) == LOSES
    assert verdict_from_interval(-0.01, 0.02) == NO_DIFFERENCE
    assert verdict_from_interval(None, 0.1) is None
    rng = np.random.default_rng(3)
    y, a, _ = _two_models(2000, rng, mu=(1.5, 0.8))
    noise = rng.normal(size=len(y))
    assert paired_auc_comparison(y, a, noise).verdict == GAINS
    assert paired_auc_comparison(y, noise, a).verdict == LOSES
    same = paired_auc_comparison(y, a, 2 * a + 1)  # same ranking
    assert same.diff == 0 and same.verdict == NO_DIFFERENCE and same.p_value == 1.0


@pytest.mark.parametrize("spread", [0.001, 0.01, 0.03, 0.1, 1.0, 10.0, 100.0, 1000.0])
def test_pooled_auc_from_sketches_within_1e3_of_exact_at_any_spread(spread):
    rng = np.random.default_rng(int(spread * 1000) % 9973)
    ys, scores, sketches = [], [], []
    for n, centre in [(4000, -1.5), (4000, -1.4), (4000, -1.6), (4000, -1.5), (4000, -1.45)]:
        y = (rng.uniform(size=n) < 0.2).astype(int)
        s = spread * (centre + rng.normal(size=n) + 1.0 * y)
        ys.append(y)
        scores.append(s)
        sketches.append(score_sketch(y, s))
    y, s = np.concatenate(ys), np.concatenate(scores)
    auc, ks = pooled_sketch_metrics(sketches)
    fpr, tpr, _ = roc_curve(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert ks == pytest.approx(np.max(tpr - fpr), abs=1e-3)


@pytest.mark.parametrize("spread", [0.001, 1.0, 1000.0])
def test_pooled_sketches_on_small_banks(spread):
    """The default run's sizes (248-1,089 test rows): AUC within 1e-3; KS within the
    statistic's own step (a few minority rows), since a bank's bin holds ~2 rows."""
    rng = np.random.default_rng(5)
    ys, scores, sketches = [], [], []
    for n in (248, 1089, 600, 400, 700):
        y = (rng.uniform(size=n) < 0.2).astype(int)
        s = spread * (rng.normal() * 0.1 - 1.5 + rng.normal(size=n) + y)
        ys.append(y)
        scores.append(s)
        sketches.append(score_sketch(y, s))
    y, s = np.concatenate(ys), np.concatenate(scores)
    auc, ks = pooled_sketch_metrics(sketches)
    fpr, tpr, _ = roc_curve(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert ks == pytest.approx(np.max(tpr - fpr), abs=4.0 / y.sum())


@pytest.mark.parametrize("spread", [0.001, 0.01, 1.0, 1000.0])
@pytest.mark.parametrize("sizes", [(50, 1200, 300), (248, 1089, 600, 400, 700), (60, 80)])
def test_exact_sketches_give_exact_pooled_auc_and_ks_on_small_banks(spread, sizes):
    """sketch-rows-per-bin = 1: pooled AUC and KS equal the exact pooled figures (1e-9)
    for any spread and any bank size, ties included (scores rounded so rows share them)."""
    rng = np.random.default_rng(len(sizes) + int(spread * 1000))
    ys, scores, sketches = [], [], []
    for n in sizes:
        y = (rng.uniform(size=n) < 0.2).astype(int)
        s = spread * (rng.normal() * 0.3 - 1.5 + rng.normal(size=n) + y)
        s = np.round(s / spread, 1) * spread  # many rows share a score, across banks too
        ys.append(y)
        scores.append(s)
        sketches.append(score_sketch(y, s, rows_per_bin=1))
    y, s = np.concatenate(ys), np.concatenate(scores)
    auc, ks = pooled_sketch_metrics(sketches)
    fpr, tpr, _ = roc_curve(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert ks == pytest.approx(np.max(np.abs(tpr - fpr)), abs=1e-9)
    # the default sketch (no cell is one row): AUC within 1e-3 from ~250 test rows a bank;
    # on 60-row banks a cell is a large share of the ~30 defaulters, so only exact is exact
    default = pooled_sketch_metrics(
        [score_sketch(yb, sb) for yb, sb in zip(ys, scores, strict=True)]
    )
    if min(sizes) >= 248:
        assert default[0] == pytest.approx(roc_auc_score(y, s), abs=1e-3)


def test_sketch_rows_per_bin_takes_the_banks_floor_and_refuses_bad_values():
    assert sketch_rows_per_bin(None) == 4
    assert sketch_rows_per_bin(1) == 1
    assert sketch_rows_per_bin(1, 8) == 8  # the bank's node config floor wins
    assert sketch_rows_per_bin(16, 8) == 16
    for bad in (0, -1, 2.5, True, "four"):
        with pytest.raises(ValueError, match="sketch-rows-per-bin"):
            sketch_rows_per_bin(bad)
    with pytest.raises(ValueError, match="sketch-min-rows-per-bin"):
        sketch_rows_per_bin(1, 0)
    y = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.3, 0.7, 0.4])
    edges, neg, pos = score_sketch(y, s, rows_per_bin=1)
    assert np.array_equal(edges, np.unique(s)) and neg[1::2].sum() == pos[1::2].sum() == 0
    edges, _, _ = score_sketch(y, s, rows_per_bin=2)
    assert len(edges) - 1 == 4 and not np.isin(edges, s).any()
    with pytest.raises(ValueError):
        score_sketch(y, s, rows_per_bin=0)


def test_sketch_cells_and_degenerate_scores():
    y = np.array([0, 1, 0, 1, 0, 0])
    edges, neg, pos = score_sketch(y, np.full(6, -2.0))
    assert neg.sum() == 4 and pos.sum() == 2 and len(neg) == 2 * len(edges) - 1
    assert pooled_sketch_metrics([(edges, neg, pos)]) == (0.5, 0.0)
    # a small bank sends no row's own score: about four rows per bin, pooled still close
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=300) < 0.3).astype(int)
    s = rng.normal(size=300) + y
    edges, neg, pos = score_sketch(y, s)
    assert len(edges) - 1 == 300 // 4
    assert not np.isin(edges, s).any()  # edges sit between rows: no cell is one row
    auc, ks = pooled_sketch_metrics([(edges, neg, pos)])
    fpr, tpr, _ = roc_curve(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert ks == pytest.approx(np.max(tpr - fpr), abs=0.02)
    with pytest.raises(ValueError):
        pooled_sketch_metrics([(np.array([0.0, 1.0]), np.array([1.0, -1.0, 0]), np.zeros(3))])


def test_a_diverged_model_is_reported_as_diverged_with_its_exact_auc():
    rng = np.random.default_rng(9)
    y = (rng.uniform(size=1000) < 0.25).astype(int)
    good = rng.normal(size=1000) + y
    logits = -1e19 * (1.0 + 0.1 * good)  # runs off to -1e19, ranking inverted
    exact = roc_auc_score(y, logits)
    assert exact < 0.4
    clipped = risk_metrics(y, 1 / (1 + np.exp(-np.clip(logits, -700, 700))))
    assert clipped.auc == 0.5  # the old artefact: every probability clipped, all tied
    m = risk_metrics_from_logits(y, logits)
    assert m.auc == pytest.approx(exact, abs=1e-12)
    assert m.health.startswith("diverged") and "e+19" in m.health
    assert m.gini == pytest.approx(2 * exact - 1)
    # the pooled figure from sketches keeps it too
    auc, _ = pooled_sketch_metrics([score_sketch(y, logits)])
    assert auc == pytest.approx(exact, abs=1e-3)
    nan = risk_metrics_from_logits(y, np.where(y == 1, np.nan, 0.0))
    assert nan.auc is None and nan.health.startswith("diverged") and nan.undefined_reason
    assert score_health(np.zeros(10)).startswith("degenerate")
    assert score_health(good) == ""


def test_calibration_summary():
    rng = np.random.default_rng(4)
    p = rng.uniform(0.01, 0.6, size=5000)
    y = (rng.uniform(size=5000) < p).astype(int)
    cal = calibration_summary(y, p)
    assert cal.predicted_rate == pytest.approx(p.mean())
    assert cal.observed_rate == pytest.approx(y.mean())
    assert cal.brier == pytest.approx(np.mean((p - y) ** 2))
    assert len(cal.curve_predicted) == 10
    assert np.allclose(cal.curve_predicted, cal.curve_observed, atol=0.05)  # calibrated
    doubled = calibration_summary(y, np.clip(2 * p, 0, 1))
    assert doubled.predicted_rate > 1.5 * doubled.observed_rate
    assert calibration_summary(np.zeros(5, int), np.full(5, 0.1)).curve_predicted == []


def test_holm_matches_the_step_down_rule_and_refuses_bad_p_values():
    # m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05 on the sorted p-values
    assert holm_rejections([0.01, 0.04, 0.016, 0.03]) == [True, False, True, False]
    assert holm_rejections([0.03, 0.04]) == [False, False]  # 0.03 > 0.05 / 2: stop at once
    assert holm_rejections([0.02, 0.04]) == [True, True]
    assert holm_rejections([]) == []
    for bad in ([float("nan")], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="p-values"):
            holm_rejections(bad)
    # Holm never rejects more than the uncorrected per-test rule
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.uniform(0, 0.1, size=int(rng.integers(1, 8)))
        assert sum(holm_rejections(p.tolist())) <= int((p <= 0.05).sum())


def test_an_inverted_model_is_flagged_so_its_ks_is_not_read_as_skill():
    rng = np.random.default_rng(2)
    y = (rng.uniform(size=800) < 0.3).astype(int)
    good = rng.normal(size=800) + 1.5 * y
    inverted = risk_metrics_from_logits(y, -good)
    assert inverted.auc < 0.25 and inverted.ks > 0.4  # a large distance, the wrong way
    assert inverted.health.startswith("inverted ranking: AUC 0.")
    assert risk_metrics_from_logits(y, good).health == ""
    diverged = risk_metrics_from_logits(y, -1e19 * (1.0 + 0.1 * good))
    assert diverged.health.startswith("diverged") and "inverted ranking" in diverged.health


def test_too_few_defaulters_give_no_interval_and_no_verdict():
    """Review: 4 rows gave 'gains' with CI [1, 1] and p = 0; 3 defaulters cover ~75%."""
    y = np.array([0, 0, 1, 1])
    out = bank_summary(y, np.array([0.0, 1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0, 0.0]))
    assert "verdict" not in out and "too few rows for an interval" in out["verdict-unavailable"]
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(MIN_CLASS_ROWS - 1, int), np.zeros(200, int)]
    with pytest.raises(ValueError, match="9 defaulters"):
        paired_auc_comparison(y, rng.normal(size=y.size), rng.normal(size=y.size))
    y[:1] = 1
    y = np.r_[y, 1]  # exactly MIN_CLASS_ROWS defaulters: an interval again
    assert auc_interval(y, rng.normal(size=y.size))[2] > 0


def test_only_a_significantly_inverted_model_is_flagged():
    rng = np.random.default_rng(8)
    y = np.r_[np.ones(12, int), np.zeros(85, int)]
    noise = rng.normal(size=y.size) - 0.05 * y  # AUC a little under 0.5 by chance
    m = risk_metrics_from_logits(y, noise)
    assert m.auc < 0.5 and m.health == ""  # its interval crosses 0.5: noise, not a pathology
    local_inverted = -(rng.normal(size=y.size) + 2.0 * y)
    out = bank_summary(y, rng.normal(size=y.size) + y, local_inverted)
    assert out["local-only-health"].startswith("inverted ranking")


def test_outer_sketch_edges_do_not_give_away_the_extreme_scores():
    """Review: the outer edges sat 1e-9 outside the lowest and highest score, so both rows'
    scores left the bank. Now they sit a hash-drawn 25-100% of the outer bin further out."""
    rng = np.random.default_rng(11)
    shares = []
    for _ in range(20):
        s = rng.normal(size=400)
        y = (rng.uniform(size=400) < 0.2).astype(int)
        edges, _, _ = score_sketch(y, s)
        v = np.sort(s)
        share = (v[0] - edges[0]) / (edges[1] - v[0])
        assert 0.25 - 1e-6 <= share <= 1.0 + 1e-6
        assert v[-1] + 0.25 * (v[-1] - edges[-2]) <= edges[-1] + 1e-9
        shares.append(share)
        assert score_sketch(y, s)[0].tolist() == edges.tolist()  # deterministic for the bank
    assert np.std(shares) > 0.1  # not one fixed offset the server could subtract
