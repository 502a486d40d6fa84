"""Differential privacy for a bank's local training: DP-SGD (Opacus) with a ledger that lasts.

The package splits along its seams; every public name is importable from here:
:mod:`~flower_ext.privacy.accounting` (settings, ledger, ledger file, budget
refusals, server helpers), :mod:`~flower_ext.privacy.mechanisms` (noise sources,
update-level Gaussian mechanism) and :mod:`~flower_ext.privacy.dpsgd` (Opacus
wrapping, training loops).

Two mechanisms, two threats:

* **DP-SGD (sample level)**, :func:`make_private`: every optimizer step clips each
  customer's gradient to ``max_grad_norm`` and adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm``; batches are drawn by Poisson sampling
  (each row independently with probability ``q = batch_size / N``), as the
  analysis of Abadi et al. (CCS 2016) and Mironov et al. (RDP, 2019) assumes.
  *Guarantee:* (epsilon, delta)-DP per bank with respect to adding or removing
  one customer row of that bank's training data, for the model updates the
  bank sends over all rounds (and anything computed from them, e.g. the final
  model), against the server, the other banks and whoever gets the model,
  provided the noise and the batches cannot be predicted (see below). *Not*
  covered: values released in clear next to the updates (the row count, the
  standardisation moments, evaluation metrics on held-out rows: declared
  public in the README), a customer with many rows as a whole (the unit is one
  row), and nothing holds once the budget is reset or the ledger lost.
* **Update level (client level)**, :func:`privatize_update`: the bank clips its
  whole update ``local - global`` to L2 norm ``clip_norm`` and adds
  ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate before it
  leaves the bank (local, no trust in the server). *Guarantee:* per round a
  Gaussian mechanism over the bank's update with neighbouring relation
  "replace the bank's whole contribution by any other" (sensitivity
  ``2 * clip_norm``: two clipped updates can lie ``2C`` apart), so the ledger
  accounts each release at noise multiplier ``noise_multiplier / 2``, composed
  over rounds with sample rate 1. It protects only what the update reveals:
  the bank's row count, its standardisation moments and its evaluation
  metrics are sent in clear and are outside the guarantee (README).

Noise nobody else can predict: unless Opacus's ``secure_mode`` is on (it needs
torchcsprng), every DP-SGD round draws its Gaussian noise *and* its Poisson
batches from a fresh ``torch.Generator`` whose whole Mersenne Twister state (624
words) is filled from the OS CSPRNG (:func:`secure_torch_generator`;
``manual_seed`` would keep only 32 bits of any seed, which can be brute-forced),
and every update-level release draws from a fresh PCG64 seeded with 128 bits
(:func:`secure_numpy_generator`). These never touch the run seed or torch's
global generator, so the server, which knows the run config, cannot replay them,
and no two banks share a stream; the seed still makes everything else (initial
model, splits) reproducible. Opacus warns "Secure RNG turned off" because the
draws themselves are Mersenne Twister / PCG output, not CSPRNG output, and the
floating-point attack on Gaussian sampling (Mironov, CCS 2012) is only mitigated
in ``secure_mode``; the warning is left visible on purpose.

The privacy ledger (:class:`PrivacyLedger`) is what Flower's Opacus example
lacks: it keeps the accountant's full history ``[(noise_multiplier,
sample_rate, steps), ...]`` in ``context.state``, rebuilds an Opacus
accountant from it each round and lets Opacus step it, so the epsilon
reported after round r is the composition over every step the bank has taken,
and a round that would overspend the budget is refused *before* any step.

Grad-sample modes: ``"ew"`` (expanded weights) with :class:`FlatClipDPOptimizer`
is the default, the fastest mode that matches a one-sample-at-a-time reference
on the bank model (``benchmarks/bench_dp_speed.py``); models with an
``nn.Embedding``, whose integer inputs ``ew`` cannot expand, are switched to
``"hooks"``. ``"ew"`` cannot run an empty Poisson batch, which is handled by a
noise-only step (still one accounted step, as in DP-SGD's analysis);
``"hooks"`` and ``"functorch"`` are correct but slower; ``"ghost"`` (fast
gradient clipping) computes wrong gradients when the per-sample loss is not
one value per row (e.g. (B, 1) logits against (B, 1) targets broadcast the
clip coefficients), so the loss it wraps is checked and rejected unless
shaped (B,).
"""

from __future__ import annotations

import logging

# Opacus calls logging.basicConfig() when imported, which adds a handler to the
# root logger and makes every Flower log line print twice; undo just that.
_root_handlers = list(logging.getLogger().handlers)
import opacus  # noqa: E402, F401

for _handler in logging.getLogger().handlers[:]:
    if _handler not in _root_handlers:
        logging.getLogger().removeHandler(_handler)

from .accounting import (  # noqa: E402
    ACCOUNTANTS,
    CLIP_BOUNDS,
    DEFAULT_GRAD_SAMPLE_MODE,
    DELTA_BOUNDS,
    DP_MODES,
    DP_REQUIREMENTS,
    EPSILON_BOUNDS,
    GRAD_SAMPLE_MODES,
    METRIC_KEYS,
    NOISE_BOUNDS,
    PRIVACY_BUDGET_ERROR_CODE,
    PRIVACY_METRIC_KEYS,
    PRIVACY_POLICY_ERROR_CODE,
    SAMPLE_LEDGER_KEY,
    UPDATE_LEDGER_KEY,
    UPDATE_LEDGER_UNIT,
    UPDATE_SENSITIVITY,
    BankDPPolicy,
    DPSGDConfig,
    LedgerFile,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyPolicyViolation,
    UpdateDPConfig,
    bank_privacy,
    budget_refusal,
    is_budget_refusal,
    is_privacy_refusal,
    ledger_file_for,
    policy_refusal,
    privacy_config_from_run_config,
    privacy_train_metrics_aggr_fn,
    round_privacy,
)
from .dpsgd import (  # noqa: E402
    INPUT_KEYS,
    TARGET_KEYS,
    FlatClipDPOptimizer,
    PrivacyReport,
    PrivateTraining,
    check_module,
    default_loss,
    make_private,
    poisson_loader,
    resolve_grad_sample_mode,
    split_batch,
    train_local_private,
    train_private_epochs,
)
from .mechanisms import (  # noqa: E402
    NonFiniteUpdateError,
    privatize_update,
    secure_numpy_generator,
    secure_torch_generator,
)

__all__ = [
    "ACCOUNTANTS",
    "CLIP_BOUNDS",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "DELTA_BOUNDS",
    "DP_MODES",
    "DP_REQUIREMENTS",
    "EPSILON_BOUNDS",
    "GRAD_SAMPLE_MODES",
    "INPUT_KEYS",
    "METRIC_KEYS",
    "NOISE_BOUNDS",
    "PRIVACY_BUDGET_ERROR_CODE",
    "PRIVACY_METRIC_KEYS",
    "PRIVACY_POLICY_ERROR_CODE",
    "SAMPLE_LEDGER_KEY",
    "TARGET_KEYS",
    "UPDATE_LEDGER_KEY",
    "UPDATE_LEDGER_UNIT",
    "UPDATE_SENSITIVITY",
    "BankDPPolicy",
    "DPSGDConfig",
    "FlatClipDPOptimizer",
    "LedgerFile",
    "NonFiniteUpdateError",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "PrivacyLedger",
    "PrivacyPolicyViolation",
    "PrivacyReport",
    "PrivateTraining",
    "UpdateDPConfig",
    "bank_privacy",
    "budget_refusal",
    "check_module",
    "default_loss",
    "is_budget_refusal",
    "is_privacy_refusal",
    "ledger_file_for",
    "make_private",
    "poisson_loader",
    "policy_refusal",
    "privacy_config_from_run_config",
    "privacy_train_metrics_aggr_fn",
    "privatize_update",
    "resolve_grad_sample_mode",
    "round_privacy",
    "secure_numpy_generator",
    "secure_torch_generator",
    "split_batch",
    "train_local_private",
    "train_private_epochs",
]
