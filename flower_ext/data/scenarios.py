"""Named non-IID scenarios for the synthetic banks: where federated training really struggles.

The bundled generator (:mod:`flower_ext.data.synthetic`, scenario ``"segments"``) gives banks
different customer segments but one shared risk function and similar sizes; FedAvg barely
notices it. The scenarios here each switch on one documented source of difficulty, and
``"hard"`` switches on all of them. A run picks one with the run-config key ``scenario``.

=================  ==========================================================================
scenario           what differs between banks, and why it is hard
=================  ==========================================================================
``segments``       today's generator, unchanged (``heterogeneity`` sets the own-segment share)
``feature-shift``  covariate shift: every customer comes from the bank's own segment, and the
                   segments' differences are exaggerated (x2: income, age, limits, utilisation,
                   delinquency, debt-to-income, ...). Banks see different regions of the
                   feature space, so each local update fits a different part of the
                   non-linear risk surface and the updates pull the global model apart.
``label-shift``    prior (label) shift: the same customer mix and the same feature -> risk
                   function everywhere, but each bank's default rate is resampled to a target
                   from 3% (bank 0) to 25% (last bank), log-spaced. Local training drags the
                   intercept towards the bank's own rate every round, so the global model's
                   calibration oscillates; the low-default bank has few positives to learn from.
``concept-shift``  concept shift: the same customer mix everywhere, but the bank's book
                   changes what a feature means (:data:`BOOK_RISK`): utilisation is strongly
                   risky in a card-heavy book and not at all in an SME book (a used working
                   capital line is normal), debt-to-income matters most for SME and suburban
                   salaried books, delinquency most in lower-tier markets. The banks' optima
                   conflict, so one global model cannot be best for all banks: this is where
                   personalisation should pay.
``unequal-sizes``  quantity skew: today's segments (``heterogeneity``) with bank sizes
                   log-spaced so the largest bank has 20x the rows of the smallest. The large
                   bank dominates the weighted average; the small banks' segments are served
                   worst.
``hard``           the headline: feature shift + label shift + concept shift + 20x sizes
                   together. Bank 0 is a large prime bank (3% defaults), the last a small
                   subprime lender (25%).
=================  ==========================================================================

The x2 spread of ``feature-shift`` and ``hard`` leaves the low-risk segments with few risk
drivers (tier1-city's delinquency rate falls to its 0.02 floor, its utilisation to 9%), so
those banks are hard to rank for *any* model: the generator's own risk function
(:func:`bayes_logit`) scores AUC 0.55 at bank 0 of both and 0.62 at bank 3 of
``feature-shift`` (5 banks, ``rows-per-bank`` 2000, seed 42), against 0.71-0.88 elsewhere.
A low worst-bank AUC there is mostly that bank's own unpredictability, not federation.

Every scenario is deterministic in ``(seed, bank_id, num_banks, rows_per_bank)`` (and
``heterogeneity`` where it is used), so each client generates its own bank and the
simulation's server regenerates the same pooled rows for the centralized ceiling. The
pieces (segments, customer draws, the shared risk function) are the synthetic generator's.

A scenario never degrades silently: when ``rows_per_bank`` is too small for its 20:1 sizes
(no bank under :data:`MIN_BANK_ROWS` rows) or its 3%..25% default rates (at least
:data:`MIN_CLASS_ROWS` rows of each class in every bank), generating a bank raises a
``ValueError`` naming ``rows-per-bank``, the scenario and :func:`min_rows_per_bank`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd

from .synthetic import (
    FEATURES,
    LABEL_COLUMN,
    SEGMENTS,
    Segment,
    bank_name,
    bank_segment,
    bank_size,
    default_logit,
    draw_customers,
    generate_bank,
    segment_mix,
    to_frame,
)

#: Run-config key that picks the scenario.
SCENARIO_KEY = "scenario"
#: Fewest rows of each class a scenario gives a bank (so its test split has an AUC).
MIN_CLASS_ROWS = 40
#: Fewest rows of any bank: the floor of :func:`~flower_ext.data.synthetic.bank_size`,
#: kept by :func:`scenario_sizes` too.
MIN_BANK_ROWS = 200


@dataclass(frozen=True)
class BookRisk:
    """How a bank's book changes the shared risk function: log-odds added per unit.

    Each term is centred near the population's typical value, so a book changes what a
    feature *means* (its slope) more than the bank's overall default rate.
    """

    #: per 0.25 of utilisation above 0.5
    utilisation: float = 0.0
    #: per 0.15 of debt-to-income above 0.4
    debt_to_income: float = 0.0
    #: per unit of log(1 + delinquencies in 12 months) above 0.2
    delinquency: float = 0.0
    #: per inquiry in 6 months above 1
    inquiries: float = 0.0

    def adjustment(self, f: dict[str, np.ndarray]) -> np.ndarray:
        return (
            self.utilisation * (f["utilisation"] - 0.5) / 0.25
            + self.debt_to_income * (f["debt_to_income"] - 0.4) / 0.15
            + self.delinquency * (np.log1p(f["delinquencies_12m"]) - 0.2)
            + self.inquiries * (f["inquiries_6m"] - 1.0)
        )


#: The book of a bank serving each segment (concept shift). The shared function already
#: adds about +0.8 log-odds from utilisation 0.25 to 0.75 (and much more above 0.7): a
#: card-heavy book adds +3.2 on top, an SME book -3.2, which reverses the slope.
BOOK_RISK: dict[str, BookRisk] = {
    "tier1-city": BookRisk(utilisation=0.4, inquiries=-0.3),
    "lower-tier-markets": BookRisk(utilisation=-0.8, delinquency=1.2),
    "credit-card-heavy": BookRisk(utilisation=1.6, debt_to_income=-0.4),
    "suburban-salaried": BookRisk(debt_to_income=0.8),
    "young-digital": BookRisk(utilisation=0.8, inquiries=0.4),
    "sme-owners": BookRisk(utilisation=-1.6, debt_to_income=1.0),
}


@dataclass(frozen=True)
class Scenario:
    """How the banks of a federation differ (see the module docstring's table).

    Parameters
    ----------
    name, hard_because :
        The run-config value and a one-line statement of the difficulty.
    own_segment_share :
        Share of a bank's customers from its own segment (the rest from the pooled mix);
        ``None``: the run config's ``heterogeneity``.
    segment_spread :
        1 keeps the segments; > 1 exaggerates each segment's distance from the segments'
        average (:func:`spread_segments`): stronger covariate shift.
    default_rates :
        ``(lowest, highest)``: each bank's rows are resampled by class to a default rate
        log-spaced from the first bank's ``lowest`` to the last bank's ``highest``
        (label shift; ``P(x | y)`` stays the bank's own). ``None``: the risk function decides.
    concept_strength :
        0: one shared risk function; > 0: each bank's :data:`BOOK_RISK` adjustment, times this.
    size_ratio :
        1: today's log-normal bank sizes; > 1: sizes log-spaced from bank 0 (largest) to the
        last bank, the largest ``size_ratio`` times the smallest, ``rows_per_bank`` on average.
    """

    name: str
    hard_because: str
    own_segment_share: float | None = None
    segment_spread: float = 1.0
    default_rates: tuple[float, float] | None = None
    concept_strength: float = 0.0
    size_ratio: float = 1.0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "segments",
            "today's generator: segment mix by heterogeneity, one shared risk function",
        ),
        Scenario(
            "feature-shift",
            "disjoint, exaggerated segments: banks see different regions of the features",
            own_segment_share=1.0,
            segment_spread=2.0,
        ),
        Scenario(
            "label-shift",
            "same customers and risk function, default rates from 3% to 25%",
            own_segment_share=0.0,
            default_rates=(0.03, 0.25),
        ),
        Scenario(
            "concept-shift",
            "same customers, book-specific meaning of utilisation, DTI, delinquency",
            own_segment_share=0.0,
            concept_strength=1.0,
        ),
        Scenario(
            "unequal-sizes",
            "today's segments, the largest bank 20x the smallest",
            size_ratio=20.0,
        ),
        Scenario(
            "hard",
            "feature + label + concept shift and 20x sizes together",
            own_segment_share=1.0,
            segment_spread=2.0,
            default_rates=(0.03, 0.25),
            concept_strength=1.0,
            size_ratio=20.0,
        ),
    )
}

#: Scenario names, in the order the benchmark shows them.
SCENARIO_NAMES: tuple[str, ...] = tuple(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; a :class:`ValueError` naming the key and the choices."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"{SCENARIO_KEY} must be one of {SCENARIO_NAMES}, got {name!r}") from None


# --- the pieces ------------------------------------------------------------------------

#: Segment fields that :func:`spread_segments` moves, with the floor and ceiling that keep
#: the distributions valid.
_SPREAD_LIMITS: dict[str, tuple[float, float]] = {
    "age_mean": (22.0, 70.0),
    "log_income_mean": (7.0, 11.0),
    "limit_to_income": (0.3, 8.0),
    "cards_mean": (1.0, 10.0),
    "book_months_mean": (3.0, 240.0),
    "delinquency_rate": (0.02, 1.5),
    "dti_mean": (0.05, 1.0),
    "inquiries_mean": (0.1, 5.0),
}


def spread_segments(factor: float, segments: tuple[Segment, ...] = SEGMENTS) -> tuple[Segment, ...]:
    """The segments with their differences scaled by ``factor`` around their average.

    Means, rates and ratios (:data:`_SPREAD_LIMITS`) move to ``avg + factor * (x - avg)``,
    clipped to valid values; utilisation's Beta mean moves the same way (its concentration
    ``a + b`` kept). Spreads, names and city tiers stay. ``factor`` 1 returns them unchanged.
    """
    if factor == 1.0:
        return segments
    if factor < 0:
        raise ValueError(f"segment spread must be >= 0, got {factor}")
    names = [f.name for f in fields(Segment) if f.name in _SPREAD_LIMITS]
    avg = {n: float(np.mean([getattr(s, n) for s in segments])) for n in names}
    util_means = [s.utilisation_a / (s.utilisation_a + s.utilisation_b) for s in segments]
    util_avg = float(np.mean(util_means))
    out = []
    for seg, util_mean in zip(segments, util_means, strict=True):
        moved = {
            n: float(np.clip(avg[n] + factor * (getattr(seg, n) - avg[n]), *_SPREAD_LIMITS[n]))
            for n in names
        }
        total = seg.utilisation_a + seg.utilisation_b
        mean = float(np.clip(util_avg + factor * (util_mean - util_avg), 0.08, 0.92))
        out.append(
            replace(seg, utilisation_a=mean * total, utilisation_b=(1 - mean) * total, **moved)
        )
    return tuple(out)


def scenario_sizes(scenario: Scenario, num_banks: int, rows_per_bank: int, seed: int) -> list[int]:
    """Rows of each bank: the generator's log-normal sizes, or log-spaced by ``size_ratio``."""
    if scenario.size_ratio == 1.0 or num_banks == 1:
        return [bank_size(b, rows_per_bank, seed) for b in range(num_banks)]
    return [int(max(MIN_BANK_ROWS, s)) for s in _spaced_sizes(scenario, num_banks, rows_per_bank)]


def _spaced_sizes(scenario: Scenario, num_banks: int, rows_per_bank: int) -> list[int]:
    """The ``size_ratio`` sizes before the :data:`MIN_BANK_ROWS` floor."""
    weights = scenario.size_ratio ** (-np.arange(num_banks) / (num_banks - 1))
    sizes = rows_per_bank * num_banks * weights / weights.sum()
    return [round(s) for s in sizes]


def _class_rows(rate: float, n: int) -> tuple[int, int]:
    """Defaults and non-defaults of ``n`` rows resampled to ``rate`` (before any floor)."""
    positives = round(rate * n)
    return positives, n - positives


def keeps_heterogeneity(
    scenario: str | Scenario, num_banks: int, rows_per_bank: int, seed: int = 42
) -> bool:
    """Whether ``scenario`` keeps what makes it hard at ``rows_per_bank``: its banks'
    ``size_ratio`` untouched by the :data:`MIN_BANK_ROWS` floor, and every bank's target
    default rate reached with at least :data:`MIN_CLASS_ROWS` rows of each class."""
    spec = get_scenario(scenario) if isinstance(scenario, str) else scenario
    spaced = spec.size_ratio != 1.0 and num_banks > 1
    if spaced and min(_spaced_sizes(spec, num_banks, rows_per_bank)) < MIN_BANK_ROWS:
        return False
    rates = scenario_default_rates(spec, num_banks)
    if rates is None:
        return True
    sizes = scenario_sizes(spec, num_banks, rows_per_bank, seed)
    return all(
        min(_class_rows(rate, n)) >= MIN_CLASS_ROWS for rate, n in zip(rates, sizes, strict=True)
    )


def min_rows_per_bank(scenario: str | Scenario, num_banks: int, seed: int = 42) -> int:
    """The smallest ``rows_per_bank`` at which ``scenario`` keeps its heterogeneity
    (:func:`keeps_heterogeneity`; bank sizes, and so the answer, can depend on ``seed``)."""
    spec = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if keeps_heterogeneity(spec, num_banks, 1, seed):
        return 1
    low, high = 1, 2  # keeps_heterogeneity(low) is False; grow high until it is True
    while not keeps_heterogeneity(spec, num_banks, high, seed):
        low, high = high, high * 2
        if high > 1 << 40:
            raise ValueError(f"scenario {spec.name!r} has no workable rows-per-bank")
    while high - low > 1:  # more rows never shrink a bank, so the answer is monotone
        mid = (low + high) // 2
        low, high = (low, mid) if keeps_heterogeneity(spec, num_banks, mid, seed) else (mid, high)
    return high


def check_rows_per_bank(
    scenario: str | Scenario, num_banks: int, rows_per_bank: int, seed: int = 42
) -> None:
    """``ValueError`` naming ``rows-per-bank``, the scenario and the smallest workable
    value when ``scenario`` would lose its heterogeneity at ``rows_per_bank``."""
    spec = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if keeps_heterogeneity(spec, num_banks, rows_per_bank, seed):
        return
    need = min_rows_per_bank(spec, num_banks, seed)
    what = []
    if spec.size_ratio != 1.0 and num_banks > 1:
        what.append(f"{spec.size_ratio:g}:1 bank sizes (no bank under {MIN_BANK_ROWS} rows)")
    if spec.default_rates is not None:
        low, high = spec.default_rates
        what.append(
            f"default rates {low:.0%} to {high:.0%} (at least {MIN_CLASS_ROWS} rows of each "
            "class per bank)"
        )
    raise ValueError(
        f"rows-per-bank = {rows_per_bank} is too small for scenario {spec.name!r} with "
        f"{num_banks} bank{'s' if num_banks != 1 else ''} (seed {seed}): it would lose its "
        f"{' and '.join(what)}; use rows-per-bank >= {need}"
    )


def scenario_default_rates(scenario: Scenario, num_banks: int) -> list[float] | None:
    """Each bank's target default rate (label shift), or None when the risk function decides."""
    if scenario.default_rates is None:
        return None
    low, high = scenario.default_rates
    if num_banks == 1:
        return [float(np.sqrt(low * high))]
    return [float(low * (high / low) ** (b / (num_banks - 1))) for b in range(num_banks)]


def bayes_logit(
    scenario: str | Scenario, bank_id: int, columns: Mapping[str, np.ndarray]
) -> np.ndarray:
    """The generator's own risk log-odds of bank ``bank_id``'s customers, before the noise
    no feature explains: shape ``(n,)`` for ``columns`` of ``n`` rows (the
    :data:`~flower_ext.data.synthetic.FEATURES`, raw units as in the bank's table).

    Within one bank this is the Bayes-optimal ranking (the Neyman-Pearson lemma: ranking by
    the likelihood ratio gives the highest ROC curve, hence AUC): ``P(default | x)`` is the
    noise-averaged logistic of this score, increasing in it, and the label-shift resampling
    multiplies the bank's odds by one constant. So its AUC on a bank's rows is the most any
    model can *expect* there (on a finite test set another model can still out-score it by
    chance). The benchmark's "reachable" banks are those where this score beats both the
    global and the local-only model significantly: a yardstick of the room for
    personalisation, not a cap (a paired test's power also depends on how closely the two
    scores move together). It is not calibrated (the noise and the resampling move the rate);
    use it for ranking only. On a bank's table it is evaluated on the stored values (income
    rounded to a unit, limits to 100; float32 in :class:`~flower_ext.data.banks.BankData`),
    a rounding the labels never saw. Synthetic banks only: real data has no known risk
    function.

    Raises ``ValueError`` naming a missing feature or an unknown scenario.
    """
    spec = get_scenario(scenario) if isinstance(scenario, str) else scenario
    missing = [f for f in FEATURES if f not in columns]
    if missing:
        raise ValueError(f"bayes_logit needs the generator's features; missing {missing}")
    raw = {f: np.asarray(columns[f], dtype=np.float64) for f in FEATURES}
    return _risk_logit(spec, bank_id, raw)


def _risk_logit(scenario: Scenario, bank_id: int, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    logit = default_logit(dict(columns))
    if scenario.concept_strength:
        book = BOOK_RISK[bank_segment(bank_id).name]
        logit = logit + scenario.concept_strength * book.adjustment(columns)
    return logit


def _draw_labelled(
    scenario: Scenario,
    bank_id: int,
    num_banks: int,
    n: int,
    own_share: float,
    segments: tuple[Segment, ...],
    rng: np.random.Generator,
    noise: float,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    segment_ids = segment_mix(bank_id, num_banks, n, own_share, rng)
    columns = draw_customers(segment_ids, rng, segments)
    logit = _risk_logit(scenario, bank_id, columns) + rng.normal(0.0, noise, n)
    label = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return columns, label


def _resample_to_rate(
    draw: Callable[[int], tuple[dict[str, np.ndarray], np.ndarray]],
    n: int,
    rate: float,
    rng: np.random.Generator,
    max_draws: int = 200,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``n`` rows with ``round(rate * n)`` defaults, taken from fresh draws of the bank's
    customers (``draw(size)``): the label prior moves, ``P(x | y)`` does not."""
    positives = min(max(round(rate * n), MIN_CLASS_ROWS), n - MIN_CLASS_ROWS)
    negatives = n - positives
    chunks: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
    have = np.zeros(2, dtype=np.int64)
    for _ in range(max_draws):
        columns, label = draw(max(n, 2000))
        chunks.append((columns, label))
        have += np.bincount(label, minlength=2)
        if have[1] >= positives and have[0] >= negatives:
            break
    else:
        raise ValueError(
            f"could not draw {positives} defaults and {negatives} non-defaults "
            f"in {max_draws} draws (default rate target {rate:.3f})"
        )
    pool = {f: np.concatenate([c[f] for c, _ in chunks]) for f in FEATURES}
    labels = np.concatenate([lab for _, lab in chunks])
    pos = rng.choice(np.flatnonzero(labels == 1), size=positives, replace=False)
    neg = rng.choice(np.flatnonzero(labels == 0), size=negatives, replace=False)
    rows = rng.permutation(np.concatenate([pos, neg]))
    return {f: pool[f][rows] for f in FEATURES}, labels[rows]


# --- the generator ---------------------------------------------------------------------


def generate_scenario_bank(
    scenario: str | Scenario,
    bank_id: int,
    num_banks: int,
    *,
    rows_per_bank: int = 2000,
    heterogeneity: float = 0.8,
    seed: int = 42,
    noise: float = 0.8,
) -> pd.DataFrame:
    """The customers of one bank under ``scenario``, with the label column ``default``.

    ``"segments"`` is exactly :func:`~flower_ext.data.synthetic.generate_bank`. The others
    draw from their own random stream (seeded by ``seed``, ``bank_id`` and the scenario's
    name), so scenarios never share rows by accident. ``heterogeneity`` is used only by
    scenarios whose ``own_segment_share`` is None (``segments``, ``unequal-sizes``).
    """
    spec = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if not 0 <= bank_id < num_banks:
        raise ValueError(f"bank_id must be in [0, {num_banks}), got {bank_id}")
    if not 0.0 <= heterogeneity <= 1.0:
        raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    if spec.name == "segments":
        return generate_bank(
            bank_id,
            num_banks,
            rows_per_bank=rows_per_bank,
            heterogeneity=heterogeneity,
            seed=seed,
            noise=noise,
        )
    check_rows_per_bank(spec, num_banks, rows_per_bank, seed)
    rng = np.random.default_rng([seed, bank_id, zlib.crc32(spec.name.encode())])
    n = scenario_sizes(spec, num_banks, rows_per_bank, seed)[bank_id]
    own = heterogeneity if spec.own_segment_share is None else spec.own_segment_share
    segments = spread_segments(spec.segment_spread)

    def draw(size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return _draw_labelled(spec, bank_id, num_banks, size, own, segments, rng, noise)

    rates = scenario_default_rates(spec, num_banks)
    if rates is None:
        columns, label = draw(n)
    else:
        columns, label = _resample_to_rate(draw, n, rates[bank_id], rng)
    return to_frame(columns, label)


def generate_scenario_federation(
    scenario: str | Scenario,
    num_banks: int,
    *,
    rows_per_bank: int = 2000,
    heterogeneity: float = 0.8,
    seed: int = 42,
) -> dict[str, pd.DataFrame]:
    """All banks of ``scenario``, keyed by :func:`~flower_ext.data.synthetic.bank_name`."""
    return {
        bank_name(b): generate_scenario_bank(
            scenario,
            b,
            num_banks,
            rows_per_bank=rows_per_bank,
            heterogeneity=heterogeneity,
            seed=seed,
        )
        for b in range(num_banks)
    }


#: Features :func:`heterogeneity_table` reports the per-bank mean of.
SUMMARY_FEATURES = ("utilisation", "monthly_income", "debt_to_income", "delinquencies_12m")


def heterogeneity_table(
    banks: dict[str, pd.DataFrame], label_column: str = LABEL_COLUMN
) -> list[dict[str, object]]:
    """Per bank: rows, default rate and the mean of the :data:`SUMMARY_FEATURES` it has."""
    table = []
    for name, frame in banks.items():
        row: dict[str, object] = {
            "bank": name,
            "rows": len(frame),
            "default_rate": float(frame[label_column].mean()),
        }
        for feature in SUMMARY_FEATURES:
            if feature in frame.columns:
                row[f"mean_{feature}"] = float(frame[feature].mean())
        table.append(row)
    return table


__all__ = [
    "BOOK_RISK",
    "MIN_BANK_ROWS",
    "MIN_CLASS_ROWS",
    "SCENARIOS",
    "SCENARIO_KEY",
    "SCENARIO_NAMES",
    "BookRisk",
    "Scenario",
    "bayes_logit",
    "check_rows_per_bank",
    "generate_scenario_bank",
    "generate_scenario_federation",
    "get_scenario",
    "heterogeneity_table",
    "keeps_heterogeneity",
    "min_rows_per_bank",
    "scenario_default_rates",
    "scenario_sizes",
    "spread_segments",
]
