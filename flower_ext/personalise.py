"""Personalisation: each bank ends the federation with its own model.

The federated (global) model is one model for every bank; with non-IID banks (other
default rates, other customer segments, the same feature meaning other risk) one bank
may do better with a model adapted to its own book. Two cheap adaptations, run at the
bank after the last round on its own rows only:

- **fine-tuning** (:func:`finetune`): a few epochs of local SGD starting from the final
  global model, with early stopping on the bank's validation rows. This is "FedAvg +
  local fine-tuning", the strong simple baseline of Yu, Bagdasaryan and Shmatikov,
  "Salvaging Federated Learning by Local Adaptation" (arXiv:2002.04758, 2020): the
  global model is a good starting point, a short local adaptation fits the bank's own
  distribution, and early stopping keeps it from forgetting what the federation
  learned. Epoch 0 (the global model itself) is a candidate, so on the validation rows
  the fine-tuned model is never worse than the global one.
- **intercept correction** (:func:`intercept_offset`, :func:`apply_intercept_offset`):
  only the output bias moves, by the one offset ``b`` that makes the model's mean
  predicted default rate on the bank's training rows equal their observed rate. This is
  the prior (label-shift) correction of Saerens, Latinne and Decaestecker, "Adjusting
  the Outputs of a Classifier to New a Priori Probabilities: A Simple Procedure",
  Neural Computation 14(1), 2002, in its one-parameter logit form: a model trained on
  a pooled default rate of 10% used by a bank whose book defaults at 3% is shifted
  down in log-odds. ``b`` minimises the bank's training log-loss over the offset (the
  log-loss's derivative in ``b`` is ``sum(sigmoid(z + b) - y)``, so the optimum
  matches the rates exactly); a shift of every log-odds by one constant leaves the
  ranking, hence the AUC, unchanged. It fixes calibration, never discrimination.

``finetune+intercept`` fine-tunes, then corrects the intercept of the fine-tuned
model on the training rows.

A third adaptation keeps the best of both worlds instead of moving one model:

- **model interpolation** (``mix``; :func:`choose_mix_weight`, :func:`mix_logits`): the
  bank holds two models, the federated one (the global model, or with ``finetune+mix``
  its fine-tuned copy) and its local-only model, and scores a customer with the weighted
  log-odds ``alpha * z_federated + (1 - alpha) * z_local + b``. ``alpha`` in
  :data:`MIX_GRID` (0, 0.1, ..., 1) is chosen on the bank's validation rows, ``b``
  recentres the mixture on them (the Saerens offset above). This is the "model
  interpolation" of Mansour, Mohri, Ro and Theertha Suresh, "Three Approaches for
  Personalization with Applications to Federated Learning" (arXiv:2002.10619, 2020,
  section 5; APFL, Deng, Kamani and Mahdavi, arXiv:2003.13461, 2020, learns the same
  mixture during training): ``alpha = 1`` is the federated model, ``alpha = 0`` the
  local-only one, and between them a bank whose book differs from the pool (concept
  shift) gets the federation's signal on what its own rows cannot teach and its own
  signal on what the pool gets wrong. Mixing log-odds (not probabilities) keeps the
  mixture a logistic score; both endpoints are candidates, so on the validation rows
  the mixture is never worse than either model.

Everything here is pure (models, arrays, configs in; numbers out) and runs without
Flower; the bank app (``apps/bank_risk/bank_risk/personalisation.py``) moves the
messages. What leaves the bank is only a summary (:func:`personalisation_summary`):
AUCs, paired DeLong intervals (:mod:`flower_ext.verdict`), calibration figures.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score
from torch import nn

from .training import TrainConfig, predict_logits, train_local
from .verdict import paired_auc_comparison, score_health, sigmoid

#: Run-config values of ``personalisation``.
PERSONALISATION_MODES = (
    "off",
    "finetune",
    "intercept",
    "finetune+intercept",
    "mix",
    "finetune+mix",
)
#: The mixture weights ``alpha`` tried on a bank's validation rows (``mix`` modes).
MIX_GRID = tuple(i / 10 for i in range(11))
#: Defaults of ``personalisation-epochs`` and ``personalisation-patience``.
DEFAULT_EPOCHS = 5
DEFAULT_PATIENCE = 2


@dataclass(frozen=True)
class PersonalisationConfig:
    """Run config ``personalisation``, ``personalisation-epochs``,
    ``personalisation-learning-rate`` (0 = the run's ``learning-rate``) and
    ``personalisation-patience`` (epochs without a better validation loss before
    fine-tuning stops)."""

    mode: str = "off"
    epochs: int = DEFAULT_EPOCHS
    learning_rate: float = 0.0
    patience: int = DEFAULT_PATIENCE

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def finetune(self) -> bool:
        return "finetune" in self.mode

    @property
    def intercept(self) -> bool:
        return "intercept" in self.mode

    @property
    def mix(self) -> bool:
        """The personalised model mixes the federated and the local-only model."""
        return self.mode.endswith("mix")

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, object]) -> PersonalisationConfig:
        """Typed and checked; ``ValueError`` naming the key for a bad value."""
        mode = str(cfg.get("personalisation", "off") or "off").strip().lower()
        if mode in ("none", "false", "no"):
            mode = "off"
        mode = {"intercept+finetune": "finetune+intercept", "mix+finetune": "finetune+mix"}.get(
            mode, mode
        )
        if mode not in PERSONALISATION_MODES:
            raise ValueError(
                f"personalisation must be one of {PERSONALISATION_MODES}, got "
                f"{cfg.get('personalisation')!r}"
            )
        epochs = _whole(cfg, "personalisation-epochs", DEFAULT_EPOCHS)
        patience = _whole(cfg, "personalisation-patience", DEFAULT_PATIENCE)
        raw_lr = cfg.get("personalisation-learning-rate", 0.0)
        if isinstance(raw_lr, bool):
            raise ValueError(f"personalisation-learning-rate must be a number, got {raw_lr!r}")
        try:
            lr = float(raw_lr)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(
                f"personalisation-learning-rate must be a number, got {raw_lr!r}"
            ) from None
        if not np.isfinite(lr) or lr < 0:
            raise ValueError(
                f"personalisation-learning-rate must be >= 0 (0 = learning-rate), got {raw_lr!r}"
            )
        if epochs < 1 and "finetune" in mode:
            raise ValueError(f"personalisation-epochs must be >= 1, got {epochs}")
        if epochs < 0:
            raise ValueError(f"personalisation-epochs must be >= 0, got {epochs}")
        if patience < 1:
            raise ValueError(f"personalisation-patience must be >= 1, got {patience}")
        return cls(mode=mode, epochs=epochs, learning_rate=lr, patience=patience)


def _whole(cfg: Mapping[str, object], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a whole number, got {value!r}") from None


# ----------------------------------------------------------------- intercept correction
def log_loss_of_logits(y: NDArray[np.integer], logits: NDArray[np.floating]) -> float:
    """Mean binary log-loss from log-odds, stable for any magnitude."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - t * z)) if z.size else float("nan")


def intercept_offset(
    logits: NDArray[np.floating],
    y: NDArray[np.integer],
    tol: float = 1e-12,
    max_iter: int = 200,
) -> float:
    """The offset ``b`` with ``mean(sigmoid(logits + b)) == mean(y)``.

    ``f(b) = mean(sigmoid(z + b)) - mean(y)`` is the derivative of the mean log-loss in
    ``b``; it increases strictly (``f'(b) = mean(p (1 - p)) > 0``), so the root is the
    unique minimiser of the log-loss over the offset (Saerens et al. 2002, logit form).
    Safeguarded Newton: Newton steps inside the bracket
    ``[logit(rate) - max z, logit(rate) - min z]`` (where ``f`` is <= 0 and >= 0),
    bisection where a Newton step leaves it. Converges to ``|f| <= tol``.

    Raises ``ValueError`` for rows of one class only (no finite offset exists) or
    non-finite log-odds.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    if z.shape != t.shape or z.size == 0:
        raise ValueError("intercept_offset needs one log-odds per labelled row")
    if not np.isfinite(z).all():
        raise ValueError("intercept_offset needs finite log-odds (a diverged model?)")
    rate = float(t.mean())
    if not 0.0 < rate < 1.0:
        raise ValueError(
            f"intercept_offset needs rows of both classes (observed default rate {rate:g})"
        )
    target = float(np.log(rate) - np.log1p(-rate))
    lo, hi = target - float(z.max()), target - float(z.min())
    b = float(np.clip(0.0, lo, hi))  # no shift, if the model is calibrated already
    for _ in range(max_iter):
        p = sigmoid(z + b)
        f = float(p.mean()) - rate
        if abs(f) <= tol:
            return b
        if f > 0:
            hi = b
        else:
            lo = b
        slope = float(np.mean(p * (1.0 - p)))
        step = b - f / slope if slope > 0 else float("nan")
        b = step if np.isfinite(step) and lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(b)):
            return b
    return b


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (the log-odds layer of :class:`CreditRiskModel`)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None or last.bias is None or last.out_features != 1:
        raise ValueError("the model has no single-output linear layer with a bias")
    return last


def apply_intercept_offset(model: nn.Module, offset: float) -> nn.Module:
    """Add ``offset`` to the output bias, in place: every log-odds moves by ``offset``."""
    layer = output_layer(model)
    with_grad = layer.bias.requires_grad
    layer.bias.requires_grad_(False)
    layer.bias.add_(float(offset))
    layer.bias.requires_grad_(with_grad)
    return model


def calibrate_intercept(model: nn.Module, x: NDArray[np.floating], y: NDArray[np.integer]) -> float:
    """Fit the intercept offset on ``(x, y)`` and apply it to ``model``; returns the offset."""
    offset = intercept_offset(predict_logits(model, x), y)
    apply_intercept_offset(model, offset)
    return offset


# ---------------------------------------------------------------- model interpolation
def mix_logits(
    federated: NDArray[np.floating], local: NDArray[np.floating], alpha: float, offset: float = 0.0
) -> NDArray[np.float64]:
    """``alpha * federated + (1 - alpha) * local + offset``, row by row.

    ``federated`` and ``local`` are two models' log-odds on the same ``n`` rows (shape
    ``(n,)``), ``alpha`` in [0, 1] (1 = the federated model), ``offset`` in log-odds.
    Raises ``ValueError`` for other shapes or an ``alpha`` outside [0, 1].
    """
    f = np.asarray(federated, dtype=np.float64).reshape(-1)
    g = np.asarray(local, dtype=np.float64).reshape(-1)
    if f.shape != g.shape:
        raise ValueError(f"mix_logits needs log-odds of the same rows, got {f.shape} and {g.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix weight alpha must be in [0, 1], got {alpha!r}")
    return alpha * f + (1.0 - alpha) * g + float(offset)


@dataclass(frozen=True)
class MixChoice:
    """The mixture a bank keeps: its weight ``alpha`` (1 = the federated model), its
    recentring ``offset`` (log-odds), and the validation log-loss (nats per row) of the
    kept mixture and of the two endpoints, each after its own offset (NaN: no
    validation rows of both classes, ``note`` says so)."""

    alpha: float
    offset: float
    val_loss: float
    val_loss_federated: float
    val_loss_local: float
    note: str = ""


def _recentred_loss(z: NDArray[np.float64], y: NDArray[np.integer]) -> tuple[float, float]:
    """``(offset, log-loss)`` of ``z`` after its Saerens offset on ``y``; ``(0, inf)`` when
    no finite offset exists (non-finite log-odds)."""
    try:
        b = intercept_offset(z, y)
    except ValueError:
        return 0.0, float("inf")
    return b, log_loss_of_logits(y, z + b)


def choose_mix_weight(
    federated_val: NDArray[np.floating],
    local_val: NDArray[np.floating],
    y_val: NDArray[np.integer],
    grid: tuple[float, ...] = MIX_GRID,
) -> MixChoice:
    """The ``alpha`` of ``grid`` whose mixture has the lowest validation log-loss.

    Each candidate ``z(alpha) = mix_logits(federated_val, local_val, alpha)`` is first
    recentred by its own intercept offset on the validation rows (:func:`intercept_offset`:
    its mean predicted default rate equals theirs), so the choice rewards ranking and
    spread, not which model happens to be calibrated to this bank's default rate (the
    local-only model always is; the global one is not under label shift). The model
    interpolation of Mansour et al. 2020 (module docstring) with the loss minimised over
    a grid. Ties go to the larger ``alpha`` (the federated model: more rows behind it).

    Shapes: three arrays of ``n`` validation rows. Without rows of both classes there
    is nothing to choose on: ``alpha = 1``, offset 0, NaN losses, and a ``note``.
    Raises ``ValueError`` for an empty grid or a weight outside [0, 1].
    """
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"the mix grid needs weights in [0, 1], got {grid!r}")
    y = np.asarray(y_val).reshape(-1)
    if len(np.unique(y)) < 2:
        nan = float("nan")
        why = "no validation rows of both classes: alpha = 1 (the federated model)"
        return MixChoice(1.0, 0.0, nan, nan, nan, note=why)
    fitted = {a: _recentred_loss(mix_logits(federated_val, local_val, a), y) for a in sorted(grid)}
    best = min(sorted(grid, reverse=True), key=lambda a: fitted[a][1])  # ties: larger alpha
    _, at_one = _recentred_loss(mix_logits(federated_val, local_val, 1.0), y)
    _, at_zero = _recentred_loss(mix_logits(federated_val, local_val, 0.0), y)
    return MixChoice(
        alpha=float(best),
        offset=float(fitted[best][0]),
        val_loss=float(fitted[best][1]),
        val_loss_federated=float(at_one),
        val_loss_local=float(at_zero),
    )


# -------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FineTuneResult:
    """What fine-tuning did: epochs run, the epoch kept (0 = the model it started from),
    and the validation log-loss before and at the kept epoch (NaN without validation rows)."""

    epochs_run: int
    best_epoch: int
    initial_val_loss: float
    best_val_loss: float
    early_stopped: bool


def finetune(
    model: nn.Module,
    x_train: NDArray[np.floating],
    y_train: NDArray[np.integer],
    x_val: NDArray[np.floating],
    y_val: NDArray[np.integer],
    cfg: TrainConfig,
    max_epochs: int = DEFAULT_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
) -> FineTuneResult:
    """Local SGD from ``model``'s weights (in place), one epoch at a time, keeping the epoch
    with the lowest validation log-loss (epoch 0, the starting model, included).

    ``cfg`` is :class:`~flower_ext.training.TrainConfig` (learning rate, batch size,
    momentum, proximal term, seed); each epoch is one :func:`~flower_ext.training.train_local`
    call with seed ``cfg.seed * 1000 + epoch``. Stops after ``patience`` epochs without
    a better validation loss. Without validation rows (or with one class only there)
    it runs all ``max_epochs`` and keeps the last epoch.
    """
    has_val = len(y_val) > 0
    best_loss = log_loss_of_logits(y_val, predict_logits(model, x_val)) if has_val else np.nan
    initial = best_loss
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    epoch, stopped = 0, False
    for epoch in range(1, max_epochs + 1):
        train_local(model, x_train, y_train, replace(cfg, epochs=1, seed=cfg.seed * 1000 + epoch))
        if not has_val:
            best_epoch = epoch
            continue
        logits = predict_logits(model, x_val)
        loss = log_loss_of_logits(y_val, logits) if np.isfinite(logits).all() else np.inf
        if loss < best_loss:
            best_loss, best_epoch, best_state = loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            stopped = True
            break
    if has_val:
        model.load_state_dict(best_state)
    return FineTuneResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        initial_val_loss=float(initial),
        best_val_loss=float(best_loss),
        early_stopped=stopped,
    )


@dataclass(frozen=True)
class PersonalisedModel:
    """The bank's own model and how it was made (it stays at the bank)."""

    model: nn.Module
    mode: str
    finetune: FineTuneResult | None
    intercept_offset: float | None
    #: Why a step was skipped (e.g. one class only in the training rows), else "".
    note: str = ""


def personalise(
    global_model: nn.Module,
    x_train: NDArray[np.floating],
    y_train: NDArray[np.integer],
    x_val: NDArray[np.floating],
    y_val: NDArray[np.integer],
    config: PersonalisationConfig,
    train_cfg: TrainConfig,
) -> PersonalisedModel:
    """A personalised copy of ``global_model`` (left untouched) for one bank's rows.

    ``train_cfg`` is the run's training configuration; fine-tuning uses its batch size,
    momentum and seed with ``config.learning_rate`` (when > 0) and no proximal term.
    """
    if not config.enabled:
        raise ValueError("personalisation is off")
    model = copy.deepcopy(global_model)
    tuned: FineTuneResult | None = None
    offset: float | None = None
    note = ""
    if config.finetune:
        cfg = replace(
            train_cfg,
            proximal_mu=0.0,
            learning_rate=config.learning_rate or train_cfg.learning_rate,
        )
        tuned = finetune(model, x_train, y_train, x_val, y_val, cfg, config.epochs, config.patience)
    if config.intercept:
        try:
            offset = calibrate_intercept(model, x_train, y_train)
        except ValueError as err:  # one class only, or a diverged model: leave the bias
            note = f"intercept not corrected: {err}"
    return PersonalisedModel(model, config.mode, tuned, offset, note)


# ---------------------------------------------------------------------- the summary
def _comparison(
    prefix: str, y: NDArray[np.integer], a: NDArray[np.float64], b: NDArray[np.float64],
    level: float,
) -> dict[str, Any]:  # fmt: skip
    try:
        cmp = paired_auc_comparison(y, a, b, level)
    except ValueError as err:
        return {f"{prefix}-unavailable": str(err)}
    return {
        f"{prefix}-diff": cmp.diff,
        f"{prefix}-ci-low": cmp.low,
        f"{prefix}-ci-high": cmp.high,
        f"{prefix}-p-value": cmp.p_value,
        f"{prefix}-verdict": cmp.verdict,
    }


def personalisation_summary(
    y_test: NDArray[np.integer],
    global_logits: NDArray[np.floating],
    personal_logits: NDArray[np.floating],
    local_logits: NDArray[np.floating] | None = None,
    level: float = 0.95,
    bayes_logits: NDArray[np.floating] | None = None,
) -> dict[str, Any]:
    """What a bank sends about its personalised model: scalars and short words only.

    On the bank's own test rows: the AUC of the global, personalised and (when given)
    local-only model; the paired DeLong difference personalised - global
    (``vs-global-*``) and personalised - local-only (``vs-local-*``) with their ``level``
    intervals, p-values and verdicts; calibration (observed default rate, each model's
    mean predicted rate and Brier score). No row-level value, no curve.

    ``bayes_logits`` (synthetic banks only, shape ``(n_test,)``: the generator's true risk,
    :func:`flower_ext.data.scenarios.bayes_logit`) adds the yardstick of what any
    personalised model could show: ``auc-bayes`` and the same paired comparisons of that
    score against the global (``bayes-vs-global-*``) and the local-only model
    (``bayes-vs-local-*``). Ranking only: it gets no rate and no Brier score.
    """
    y = np.asarray(y_test).astype(np.int64)
    models = {"global": global_logits, "personalised": personal_logits}
    if local_logits is not None:
        models["local-only"] = local_logits
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in models.items()}
    out: dict[str, Any] = {"num-examples": len(y), "observed-rate": float(np.mean(y))}
    both = len(np.unique(y)) == 2
    for name, z in scores.items():
        health = score_health(z)
        if health:
            out[f"{name}-health"] = health
        finite = np.isfinite(z).all()
        if both and finite:
            out[f"auc-{name}"] = float(roc_auc_score(y, z))
        if finite:
            prob = sigmoid(z)
            out[f"predicted-rate-{name}"] = float(prob.mean())
            out[f"brier-{name}"] = float(np.mean((prob - y) ** 2))
    if not both:
        out["unavailable"] = "the test rows hold one class only: no AUC"
        return out
    out.update(_comparison("vs-global", y, scores["personalised"], scores["global"], level))
    if "local-only" in scores:
        out.update(_comparison("vs-local", y, scores["personalised"], scores["local-only"], level))
    if bayes_logits is not None:
        bayes = np.asarray(bayes_logits, dtype=np.float64)
        if bayes.shape != y.shape or not np.isfinite(bayes).all():
            raise ValueError(
                f"bayes_logits must be {y.shape[0]} finite log-odds, one per test row; "
                f"got shape {bayes.shape}"
            )
        out["auc-bayes"] = float(roc_auc_score(y, bayes))
        out.update(_comparison("bayes-vs-global", y, bayes, scores["global"], level))
        if "local-only" in scores:
            out.update(_comparison("bayes-vs-local", y, bayes, scores["local-only"], level))
    return {k: v for k, v in out.items() if not (isinstance(v, float) and not np.isfinite(v))}


def beats_both(row: Mapping[str, Any]) -> bool:
    """Whether the personalised model beats both the global and the local-only model with
    a significant gain: both paired 95% intervals' lower bounds above 0."""
    low_g, low_l = row.get("vs-global-ci-low"), row.get("vs-local-ci-low")
    return (
        isinstance(low_g, (int, float))
        and isinstance(low_l, (int, float))
        and low_g > 0
        and low_l > 0
    )
