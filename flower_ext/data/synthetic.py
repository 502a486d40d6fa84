"""A synthetic multi-bank credit-default generator that needs no download.

Each bank serves a customer *segment* (first-tier city professionals, lower-tier
markets, heavy credit-card users, ...). Segments differ in income, limits,
utilisation, delinquency history and so on; the probability of default is one
shared, partly non-linear function of those features plus noise that no feature
explains. So banks differ in their feature distributions and default rates
(covariate and label-prior shift, the non-IID that stalls FedAvg) while one
model can still serve them all, and no model can reach AUC 1.0.

``heterogeneity`` in [0, 1] sets how strongly a bank's customers come from its
own segment: 0 draws every customer from the pooled mix of all segments (IID
banks), 1 draws them all from the bank's segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

LABEL_COLUMN = "default"

FEATURES: tuple[str, ...] = (
    "age",
    "monthly_income",
    "credit_limit",
    "utilisation",
    "num_cards",
    "months_on_book",
    "delinquencies_12m",
    "max_days_past_due",
    "debt_to_income",
    "inquiries_6m",
    "employment_years",
    "city_tier",
)


@dataclass(frozen=True)
class Segment:
    """Distribution parameters of one customer segment."""

    name: str
    age_mean: float
    age_sd: float
    log_income_mean: float  # log of monthly income
    log_income_sd: float
    limit_to_income: float  # credit limit as a multiple of monthly income
    utilisation_a: float  # Beta(a, b) utilisation
    utilisation_b: float
    cards_mean: float
    book_months_mean: float
    delinquency_rate: float  # Poisson mean of delinquencies in 12 months
    dti_mean: float
    inquiries_mean: float
    city_tier: int


SEGMENTS: tuple[Segment, ...] = (
    Segment("tier1-city", 35, 7, 9.4, 0.45, 2.5, 1.6, 5.0, 2.2, 60, 0.12, 0.28, 0.8, 1),
    Segment("lower-tier-markets", 42, 12, 8.3, 0.50, 1.2, 2.4, 3.2, 1.2, 40, 0.35, 0.36, 1.0, 3),
    Segment("credit-card-heavy", 31, 8, 8.9, 0.50, 3.5, 3.2, 2.6, 5.0, 36, 0.25, 0.40, 1.8, 2),
    Segment("suburban-salaried", 45, 9, 9.0, 0.35, 2.0, 1.8, 4.0, 2.0, 96, 0.15, 0.30, 0.6, 2),
    Segment("young-digital", 25, 4, 8.6, 0.55, 1.5, 2.4, 3.0, 1.6, 12, 0.30, 0.25, 1.8, 1),
    Segment("sme-owners", 44, 9, 9.1, 0.85, 2.2, 2.2, 3.2, 2.6, 70, 0.30, 0.55, 1.2, 2),
)


def bank_segment(bank_id: int) -> Segment:
    return SEGMENTS[bank_id % len(SEGMENTS)]


def bank_name(bank_id: int) -> str:
    return f"bank-{bank_id}-{bank_segment(bank_id).name}"


def bank_size(bank_id: int, rows_per_bank: int, seed: int) -> int:
    """Rows of bank ``bank_id``: log-normal around ``rows_per_bank`` (quantity skew)."""
    rng = np.random.default_rng([seed, 7919, bank_id])
    return int(max(200, round(rows_per_bank * float(np.exp(rng.normal(0.0, 0.5))))))


def _draw_segment(seg: Segment, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    age = np.clip(rng.normal(seg.age_mean, seg.age_sd, n), 19, 80)
    income = np.exp(rng.normal(seg.log_income_mean, seg.log_income_sd, n))
    limit = income * seg.limit_to_income * np.exp(rng.normal(0, 0.35, n))
    utilisation = rng.beta(seg.utilisation_a, seg.utilisation_b, n)
    cards = 1 + rng.poisson(max(seg.cards_mean - 1, 0.1), n)
    book = np.clip(rng.gamma(2.0, seg.book_months_mean / 2.0, n), 1, 360)
    # Delinquency history is over-dispersed: a minority of customers carry most of it.
    frailty = rng.gamma(0.7, 1 / 0.7, n)
    delinquencies = rng.poisson(seg.delinquency_rate * frailty)
    dpd = np.where(
        delinquencies > 0, np.minimum(30 * delinquencies * rng.uniform(0.5, 1.5, n), 180), 0
    )
    dti = np.clip(rng.normal(seg.dti_mean, 0.12, n) + 0.25 * utilisation, 0.0, 1.5)
    inquiries = rng.poisson(seg.inquiries_mean * (0.6 + utilisation), n)
    employment = np.clip(age - 18 - rng.exponential(4, n), 0, None) * rng.uniform(0.2, 0.9, n)
    tier = np.full(n, seg.city_tier, dtype=float)
    return {
        "age": age,
        "monthly_income": income,
        "credit_limit": limit,
        "utilisation": utilisation,
        "num_cards": cards.astype(float),
        "months_on_book": book,
        "delinquencies_12m": delinquencies.astype(float),
        "max_days_past_due": dpd,
        "debt_to_income": dti,
        "inquiries_6m": inquiries.astype(float),
        "employment_years": employment,
        "city_tier": tier,
    }


def default_logit(f: dict[str, np.ndarray]) -> np.ndarray:
    """The shared risk function (before the unexplained noise).

    Non-linear on purpose: utilisation matters mostly above ~70%, delinquency
    matters more for thin files, and income's effect saturates, so an MLP has
    something to learn beyond a logistic regression.
    """
    util = f["utilisation"]
    thin_file = 1.0 / (1.0 + f["months_on_book"] / 24.0)
    return (
        -3.35
        + 2.4 * np.maximum(util - 0.7, 0.0) / 0.3
        + 0.8 * util
        + 0.55 * np.log1p(f["delinquencies_12m"]) * (1.0 + 1.5 * thin_file)
        + 0.012 * f["max_days_past_due"]
        + 1.2 * np.maximum(f["debt_to_income"] - 0.45, 0.0) / 0.2
        - 0.5 * np.tanh((np.log(f["monthly_income"]) - 8.8) / 0.5)
        + 0.18 * f["inquiries_6m"]
        - 0.015 * (f["age"] - 40.0) * (f["age"] < 40)
        + 0.15 * (f["city_tier"] - 2.0)
        + 0.12 * np.maximum(f["num_cards"] - 4.0, 0.0)
    )


def generate_bank(
    bank_id: int,
    num_banks: int,
    *,
    rows_per_bank: int = 2000,
    heterogeneity: float = 0.8,
    seed: int = 42,
    noise: float = 0.8,
) -> pd.DataFrame:
    """The customers of one bank, with the label column ``default``.

    Deterministic in ``(seed, bank_id, num_banks, heterogeneity, rows_per_bank)``,
    so a client can generate its own bank and the simulation's server can
    generate the same pooled data for the centralized baseline.
    """
    if not 0.0 <= heterogeneity <= 1.0:
        raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    if not 0 <= bank_id < num_banks:
        raise ValueError(f"bank_id must be in [0, {num_banks}), got {bank_id}")
    rng = np.random.default_rng([seed, bank_id])
    n = bank_size(bank_id, rows_per_bank, seed)
    segment_ids = segment_mix(bank_id, num_banks, n, heterogeneity, rng)
    columns = draw_customers(segment_ids, rng)
    logit = default_logit(columns) + rng.normal(0.0, noise, n)
    label = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return to_frame(columns, label)


def segment_mix(
    bank_id: int, num_banks: int, n: int, own_share: float, rng: np.random.Generator
) -> np.ndarray:
    """Segment index of each of a bank's ``n`` customers.

    The bank's own segment with probability ``own_share``, otherwise the pooled mix of
    the segments the federation's banks serve (``own_share`` 0: IID banks).
    """
    own = bank_id % len(SEGMENTS)
    federation_segments = sorted({b % len(SEGMENTS) for b in range(num_banks)})
    pooled = rng.choice(federation_segments, size=n)
    return np.where(rng.uniform(size=n) < own_share, own, pooled)


def draw_customers(
    segment_ids: np.ndarray,
    rng: np.random.Generator,
    segments: tuple[Segment, ...] = SEGMENTS,
) -> dict[str, np.ndarray]:
    """Feature columns of customers whose segments are ``segment_ids`` (indices into
    ``segments``), drawn segment by segment in index order."""
    n = len(segment_ids)
    columns: dict[str, np.ndarray] = {name: np.empty(n) for name in FEATURES}
    for s in np.unique(segment_ids):
        rows = segment_ids == s
        drawn = _draw_segment(segments[s], int(rows.sum()), rng)
        for name in FEATURES:
            columns[name][rows] = drawn[name]
    return columns


def to_frame(columns: dict[str, np.ndarray], label: np.ndarray) -> pd.DataFrame:
    """A bank's table: the features (income and limit rounded as a bank stores them) and
    the label column."""
    frame = pd.DataFrame(columns)
    frame["monthly_income"] = frame["monthly_income"].round(0)
    frame["credit_limit"] = (frame["credit_limit"] / 100).round(0) * 100
    frame[LABEL_COLUMN] = label
    return frame


def generate_federation(
    num_banks: int,
    *,
    rows_per_bank: int = 2000,
    heterogeneity: float = 0.8,
    seed: int = 42,
) -> dict[str, pd.DataFrame]:
    """All banks, keyed by :func:`bank_name`."""
    return {
        bank_name(b): generate_bank(
            b, num_banks, rows_per_bank=rows_per_bank, heterogeneity=heterogeneity, seed=seed
        )
        for b in range(num_banks)
    }
