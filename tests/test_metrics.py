"""Credit-risk metrics against scikit-learn, incl. the pooled-histogram AUC/KS."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score, roc_curve

from flower_ext.metrics import metrics_from_histograms, risk_metrics, score_histograms


def _data(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.2).astype(int)
    logits = rng.normal(size=n) + 1.2 * y - 1.5
    return y, logits, 1 / (1 + np.exp(-logits))


def test_risk_metrics_match_sklearn():
    y, _, p = _data()
    m = risk_metrics(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    assert m.auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m.ks == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert m.log_loss == pytest.approx(log_loss(y, p), rel=1e-9)
    assert m.accuracy == pytest.approx(accuracy_score(y, p >= 0.5))


def test_single_class_gives_null_auc_with_reason():
    m = risk_metrics(np.zeros(50, dtype=int), np.full(50, 0.1))
    assert m.auc is None and m.ks is None
    assert "only non-defaults" in m.undefined_reason
    assert m.accuracy == 1.0


def test_pooled_histograms_match_exact_pooled_metrics():
    banks = [_data(n, s) for n, s in [(1500, 1), (3000, 2), (800, 3)]]
    neg = sum(score_histograms(y, lg)[0] for y, lg, _ in banks)
    pos = sum(score_histograms(y, lg)[1] for y, lg, _ in banks)
    auc, ks = metrics_from_histograms(neg, pos)
    y_all = np.concatenate([b[0] for b in banks])
    p_all = np.concatenate([b[2] for b in banks])
    fpr, tpr, _ = roc_curve(y_all, p_all)
    assert auc == pytest.approx(roc_auc_score(y_all, p_all), abs=1e-3)
    assert ks == pytest.approx(np.max(tpr - fpr), abs=5e-3)
    assert metrics_from_histograms(neg, np.zeros_like(pos)) == (None, None)
