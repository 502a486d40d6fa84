"""DP-SGD with Opacus on the user's own model, optimizer, loader and loss.

See :mod:`flower_ext.privacy` for the guarantee and the grad-sample modes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..training import TrainConfig, make_loader
from .accounting import (
    DEFAULT_GRAD_SAMPLE_MODE,
    SAMPLE_LEDGER_KEY,
    DPSGDConfig,
    LedgerFile,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    _epsilon,
)
from .mechanisms import secure_torch_generator

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- DP-SGD
@dataclass
class PrivacyReport:
    """What a round of private training spent; ``as_metrics()`` goes in the reply."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    total_steps: int
    accountant: str
    unit: str = "sample"

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.total_steps,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _GhostLossGuard:
    """Wraps Opacus's ghost-clipping loss: per-sample losses must be shaped (B,).

    With (B, 1) logits and (B, 1) targets the per-sample loss is (B, 1) and
    Opacus multiplies it by (B,) clip coefficients, broadcasting to (B, B): the
    gradients are silently wrong. We refuse that shape with a clear message.
    """

    def __init__(self, dp_loss: Callable[..., Any]) -> None:
        self.dp_loss = dp_loss

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.dp_loss(*args, **kwargs)
        per_sample = out.loss_per_sample
        if per_sample.dim() != 1:
            raise PrivacyConfigError(
                "ghost clipping needs one loss per row, shape (B,); got "
                f"{tuple(per_sample.shape)}. Flatten logits and targets (e.g. "
                "logits.reshape(-1), y.reshape(-1)) or use grad_sample_mode='hooks'"
            )
        return out


@dataclass
class PrivateTraining:
    """The private counterparts of the user's model, optimizer and loader (+ accounting).

    Train with :attr:`module`, :attr:`optimizer` and :attr:`data_loader` as
    usual (or :func:`train_private_epochs`), evaluate inside
    :meth:`evaluating`, then call :meth:`finish` to write the steps taken into
    the ledger and get the :class:`PrivacyReport`.
    """

    module: nn.Module
    optimizer: Any  # opacus DPOptimizer
    data_loader: DataLoader
    criterion: Callable[..., Any] | None
    ledger: PrivacyLedger
    accountant: IAccountant
    config: DPSGDConfig
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    planned_epsilon: float
    original_module: nn.Module
    mode: str = DEFAULT_GRAD_SAMPLE_MODE
    planned_steps: int = 0
    ledger_file: LedgerFile | None = None
    default_criterion: bool = True
    _finished: bool = False

    @property
    def grad_sample_mode(self) -> str:
        """The per-sample-gradient mode in use (``"ew"`` may have become ``"hooks"``)."""
        return self.mode

    def epsilon(self) -> float:
        """Epsilon including the steps taken so far this round."""
        return _epsilon(self.ledger.accountant, self.accountant.history, self.config.delta)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """Eval mode, no grad, per-sample hooks off; training state restored after."""
        was_training = self.module.training
        hooks_off = getattr(self.module, "disable_hooks", None)
        hooks_on = getattr(self.module, "enable_hooks", None)
        self.module.eval()
        if hooks_off is not None:
            hooks_off()
        try:
            with torch.no_grad():
                yield self.original_module
        finally:
            if hooks_on is not None:
                hooks_on()
            self.module.train(was_training)

    def finish(self) -> PrivacyReport:
        """Record the round's steps in the ledger, detach Opacus from the user's model."""
        steps_before = self.ledger.total_steps
        if not self._finished:
            self.ledger.absorb(self.accountant)
            self.ledger.rounds += 1
            self._finished = True
            if self.ledger_file is not None:  # the file holds the reservation (and others')
                taken = self.ledger.total_steps - steps_before
                settled = self.ledger_file.settle(
                    taken - self.planned_steps,
                    noise_multiplier=self.noise_multiplier,
                    sample_rate=self.sample_rate,
                    accountant=self.ledger.accountant,
                    unit=self.ledger.unit,
                )
                self.ledger.history, self.ledger.rounds = settled.history, settled.rounds
                self.ledger.delta = settled.delta
                steps_before = self.ledger.total_steps - taken
            cleanup = getattr(self.module, "_close", None) or getattr(
                self.module, "remove_hooks", None
            )
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup()
            for p in self.original_module.parameters():
                for attr in ("grad_sample", "_current_grad_sample", "_forward_counter"):
                    if hasattr(p, attr):
                        with contextlib.suppress(AttributeError):
                            delattr(p, attr)
        total = self.ledger.total_steps
        return PrivacyReport(  # at the strictest delta the ledger has charged at
            epsilon=self.ledger.epsilon(self.config.delta),
            delta=self.ledger.strictest_delta(self.config.delta),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=total - steps_before,
            total_steps=total,
            accountant=self.ledger.accountant,
        )


def check_module(module: nn.Module, fix: bool = False) -> nn.Module:
    """Opacus's ModuleValidator: a clear error for layers DP-SGD cannot handle.

    With ``fix=True`` the model is repaired by ``ModuleValidator.fix`` (e.g.
    BatchNorm -> GroupNorm) and the fixed model returned. That changes its
    architecture: build the optimizer from the fixed model, and have the server
    and every bank use the same fixed definition (``make_private`` only
    validates, it never swaps the model under the user's optimizer).
    """
    errors = ModuleValidator.validate(module, strict=False)
    if not errors:
        return module
    if fix:
        fixed = ModuleValidator.fix(module)
        remaining = ModuleValidator.validate(fixed, strict=False)
        if not remaining:
            return fixed
        errors = remaining
    listed = "; ".join(str(e) for e in errors)
    raise PrivacyConfigError(
        f"the model cannot be trained with DP-SGD as is: {listed}. Per-sample gradients "
        "need layers that never mix samples of a batch (no BatchNorm; use GroupNorm or "
        "LayerNorm), or pass fix_module=True to use opacus ModuleValidator.fix (then the "
        "server and every bank must use the fixed model)"
    )


def poisson_loader(
    dataset: TensorDataset, sample_rate: float, generator: torch.Generator | None = None
) -> DataLoader:
    """Poisson-sampled batches of a TensorDataset fetched with one indexing op per batch.

    Same sampler as Opacus's ``DPDataLoader`` (``UniformWithReplacementSampler``,
    ``1/q`` batches per epoch, each row in each batch with probability ``q``;
    an empty batch comes out as tensors of shape (0, ...)), without its
    per-row ``__getitem__`` + collate cost.
    """
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator
    )
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def resolve_grad_sample_mode(module: nn.Module, mode: str) -> str:
    """``mode``, except ``"ew"`` becomes ``"hooks"`` for models with embeddings.

    PyTorch's expanded weights need a float input with a batch dimension; an
    ``nn.Embedding`` fed a 1-D index column fails with "Expanded Weights needs
    an input with a batch size", where Opacus's hooks work.
    """
    if mode == "ew" and any(
        isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in module.modules()
    ):
        logger.info("DP-SGD: the model has an embedding, so per-sample gradients use 'hooks'")
        return "hooks"
    return mode


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    config: DPSGDConfig,
    ledger: PrivacyLedger,
    criterion: Callable[..., Any] | None = None,
    noise_generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
    ledger_file: LedgerFile | None = None,
    note: Mapping[str, Any] | None = None,
) -> PrivateTraining:
    """Make one round of a client's local training DP-SGD, charged to ``ledger``.

    Like ``opacus.PrivacyEngine.make_private`` (it calls it), on the user's own
    model, optimizer and loader, with these differences: the accountant starts
    from the ledger's history (cumulative epsilon across rounds); the round is
    refused with :class:`PrivacyBudgetExhausted` *before* any step when its
    planned steps (``local_epochs x 1/q``) would push epsilon past the budget;
    the noise and the Poisson batches come from generators seeded from the OS
    CSPRNG (unpredictable by the server, independent of any seed); and the
    model is checked (:func:`check_module`) with a clear error.

    The sample rate is ``1 / len(data_loader)`` (``batch_size / N``), as in Opacus.
    A ``TensorDataset`` gets :func:`poisson_loader`, others Opacus's
    ``DPDataLoader``. Parameters are trained in place: ``module`` keeps the
    result after :meth:`PrivateTraining.finish`.

    Parameters
    ----------
    module, optimizer, data_loader
        The user's own model, optimizer and (non-private) loader.
    config : DPSGDConfig
    ledger : PrivacyLedger
        The bank's ledger; updated in place by :meth:`PrivateTraining.finish`.
    criterion : callable, optional
        The loss, needed only by ``grad_sample_mode="ghost"`` (default binary
        log-loss on logits).
    noise_generator, sampling_generator : torch.Generator, optional
        Only for tests that must reproduce a run: a generator anyone can
        seed voids the guarantee against whoever knows the seed. Default: a
        fresh :func:`secure_torch_generator` each (Opacus's own secure RNG
        with ``config.secure_mode``).
    ledger_file : LedgerFile, optional
        The ledger on disk: the round is reserved in it under its lock before
        any step, and the ledger is replaced by the file's (which also holds
        other runs' charges).
    note : mapping, optional
        Added to the file's ``runs`` entry for this round (run id, round).

    Raises
    ------
    PrivacyBudgetExhausted
        Before any step, if the round would exceed the budget.
    PrivacyConfigError
        For a model, loader or setting DP-SGD cannot use.
    """
    if config.accountant != ledger.accountant:
        raise PrivacyConfigError(
            f"config accountant '{config.accountant}' differs from the ledger's "
            f"'{ledger.accountant}'"
        )
    if config.secure_mode and (noise_generator is not None or sampling_generator is not None):
        raise PrivacyConfigError("secure_mode draws from Opacus's own CSPRNG: pass no generator")
    check_module(module)  # a clear error; fixing changes the model, see check_module
    mode = resolve_grad_sample_mode(module, config.grad_sample_mode)
    steps_per_epoch = len(data_loader)
    if steps_per_epoch < 1:
        raise PrivacyConfigError("the data loader is empty")
    sample_rate = 1.0 / steps_per_epoch
    sigma = config.noise_for(sample_rate, steps_per_epoch)
    planned = config.local_epochs * steps_per_epoch
    # Opacus warns "Secure RNG turned off" without secure_mode: left visible on purpose,
    # since our generators are CSPRNG-seeded but their draws are not CSPRNG output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        try:
            engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        except ImportError as err:
            raise PrivacyConfigError(
                f"secure_mode needs torchcsprng ({err}); without secure_mode flower-ext "
                "already draws noise and batches from CSPRNG-seeded generators"
            ) from err
    if ledger_file is not None:  # charged on disk, under the lock, before any step
        before, _ = ledger_file.reserve(
            ledger,
            budget=config.budget,
            delta=config.delta,
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=planned,
            note=note,
        )
        ledger.history, ledger.rounds, ledger.delta = before.history, before.rounds, before.delta
    projected = ledger.check_budget(config.budget, config.delta, sigma, sample_rate, planned)
    ledger.delta = ledger.strictest_delta(config.delta)  # the round is charged at it
    if not config.secure_mode:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else None
        if noise_generator is None:
            noise_generator = secure_torch_generator(device)
        if sampling_generator is None:
            sampling_generator = secure_torch_generator()

    engine.accountant = ledger.make_accountant()
    loss = criterion if criterion is not None else nn.BCEWithLogitsLoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        out = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            criterion=loss,
            noise_multiplier=sigma,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            noise_generator=noise_generator,
        )
    if mode == "ghost":
        wrapped, dp_optimizer, dp_criterion, dp_loader = out
        dp_criterion = _GhostLossGuard(dp_criterion)
    else:
        wrapped, dp_optimizer, dp_loader = out
        dp_criterion = criterion
    if config.fused_clipping and type(dp_optimizer) is DPOptimizer and not config.secure_mode:
        dp_optimizer.__class__ = FlatClipDPOptimizer  # same state, fewer kernel launches
    _guard_reserved_steps(dp_optimizer, engine.accountant, ledger.total_steps, planned)
    if not config.secure_mode:
        if isinstance(data_loader.dataset, TensorDataset):
            dp_loader = poisson_loader(data_loader.dataset, sample_rate, sampling_generator)
        else:  # Opacus's DPDataLoader would sample from the loader's (seeded) generator
            dp_loader.batch_sampler.generator = sampling_generator  # type: ignore[union-attr]
    return PrivateTraining(
        module=wrapped,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        criterion=dp_criterion,
        ledger=ledger,
        accountant=engine.accountant,
        config=config,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        planned_epsilon=projected,
        original_module=module,
        mode=mode,
        planned_steps=planned,
        ledger_file=ledger_file,
        default_criterion=criterion is None,
    )


def _accounted_steps(accountant: IAccountant) -> int:
    return int(sum(h[2] for h in accountant.history))


def _guard_reserved_steps(
    optimizer: DPOptimizer, accountant: IAccountant, steps_before: int, planned: int
) -> None:
    """Make ``optimizer`` refuse any step beyond the ``planned`` ones the round reserved.

    The budget was checked (and, with a ledger file, charged) for ``planned``
    steps; one more would spend what was never checked. Every step goes through
    ``pre_step`` (``optimizer.step()`` calls it), which is where Opacus clips,
    noises and accounts, so the guard sits in front of it.
    """
    inner = optimizer.pre_step

    def pre_step(closure: Callable[[], float] | None = None) -> bool:
        taken = _accounted_steps(accountant) - steps_before
        if taken >= planned:
            raise PrivacyBudgetExhausted(
                f"DP-SGD: this round reserved {planned} steps (local_epochs x 1/q) and has "
                f"taken {taken}; one more step would spend privacy budget that was never "
                "checked. Train for the configured local_epochs, or make a new round with "
                "make_private",
                math.nan,
                math.nan,
                math.nan,
            )
        return inner(closure)

    optimizer.pre_step = pre_step  # type: ignore[method-assign]


class FlatClipDPOptimizer(DPOptimizer):
    """Opacus's flat-clipping ``DPOptimizer`` with clipping and noise done in one pass each.

    Same maths as the parent: per-sample norms over all parameters, clip factor
    ``min(1, C / (norm + 1e-6))``, clipped sum, then ``N(0, (sigma C)^2)`` noise.
    The parent loops over parameter tensors (about 25 small ops per step for the
    bank MLP); here the per-sample gradients are concatenated into one (B, D)
    matrix, clipped and summed with one matrix-vector product, and the noise is
    drawn in one call. On small models, where per-op overhead dominates, this
    is what brings DP-SGD under 2x plain training (benchmarks/bench_dp_speed.py).
    Checked against a one-sample-at-a-time reference in tests/test_privacy.py.
    Not used with secure_mode (Opacus's secure noise path is kept intact).
    """

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        batch = samples[0].shape[0] if samples else 0
        if batch == 0:
            super().clip_and_accumulate()
            return
        flat = torch.cat([g.reshape(batch, -1) for g in samples], dim=1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        summed = factor.to(flat.dtype) @ flat
        offset = 0
        for p in self.params:
            grad = summed[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        total = sum(p.numel() for p in self.params)
        std = self.noise_multiplier * self.max_grad_norm
        first = self.params[0].summed_grad
        noise = torch.normal(
            0.0,
            std,
            size=(total,),
            device=first.device,
            dtype=first.dtype,
            generator=self.generator,
        )
        offset = 0
        for p in self.params:
            p.grad = (p.summed_grad + noise[offset : offset + p.numel()].view_as(p)).view_as(p)
            offset += p.numel()
            _mark_as_processed(p.summed_grad)


def _noise_only_step(private: PrivateTraining) -> None:
    """An empty Poisson batch still costs (and takes) a step: zero gradient + noise."""
    for p in private.optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


#: Batch keys tried, in order, for the model input and the target of a dict batch.
INPUT_KEYS = ("img", "image", "x", "features", "input", "inputs", "pixel_values")
TARGET_KEYS = ("label", "labels", "y", "target", "targets", "fine_label")


def split_batch(
    batch: Any, input_key: str | None = None, target_key: str | None = None
) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch: an ``(x, y)`` pair or a dict.

    Dict batches (Flower's examples: ``batch["img"]``, ``batch["label"]``) use
    ``input_key`` / ``target_key`` when given, else the first of
    :data:`INPUT_KEYS` / :data:`TARGET_KEYS` present.

    Raises
    ------
    PrivacyConfigError
        Naming the batch's type or keys when neither form fits.
    """
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        x_key = input_key or next((k for k in INPUT_KEYS if k in batch), None)
        y_key = target_key or next((k for k in TARGET_KEYS if k in batch), None)
        if x_key not in batch or y_key not in batch:
            raise PrivacyConfigError(
                f"dict batch with keys {keys}: cannot tell the model input and the target; "
                "pass input_key= and target_key= (or batch_to_xy=) to train_private_epochs"
            )
        return batch[x_key], batch[y_key]
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise PrivacyConfigError(
        f"a batch must be an (inputs, targets) pair or a dict, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        + "; pass batch_to_xy= to train_private_epochs to split it"
    )


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for (B, K > 1) logits and class indices; else binary log-loss on logits."""
    if outputs.dim() >= 2 and outputs.shape[-1] > 1:
        return nn.functional.cross_entropy(outputs, targets.long())
    return nn.functional.binary_cross_entropy_with_logits(
        outputs.reshape(-1), targets.reshape(-1).to(outputs.dtype)
    )


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, list | tuple) and x and isinstance(x[0], torch.Tensor):
        return _rows(x[0])
    return len(x)


def train_private_epochs(
    private: PrivateTraining,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    *,
    batch_to_xy: Callable[[Any], tuple[Any, torch.Tensor]] | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
) -> float:
    """DP-SGD passes over ``private.data_loader``; returns the mean training loss.

    Parameters
    ----------
    private : PrivateTraining
        From :func:`make_private`.
    epochs : int, optional
        Default: the config's ``local_epochs`` (what the round was charged for).
    proximal_mu : float
        FedProx coefficient. Its gradient ``mu (w - w_global)`` does not depend
        on the data: it is added after clipping and noise, at no privacy cost
        (Opacus would silently drop it from a loss, as it only uses per-sample grads).
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> scalar``, the batch *mean* (reduction
        ``"mean"``, which is how Opacus scales per-sample gradients), e.g.
        ``nn.CrossEntropyLoss()``. Default :func:`default_loss`: cross-entropy
        for multi-class logits, binary log-loss otherwise. With
        ``grad_sample_mode="ghost"`` the loss is the ``criterion`` given to
        :func:`make_private` instead.
    batch_to_xy : callable, optional
        ``batch -> (inputs, targets)``; default :func:`split_batch` (pairs and
        dicts). Tuple inputs are passed to the model as ``model(*inputs)``.
    input_key, target_key : str, optional
        The keys of dict batches for :func:`split_batch`.

    Every Poisson batch is a step, an empty one included (noise only), so the
    steps taken equal the steps accounted and planned. More epochs than the
    round reserved are refused before the first extra step
    (:class:`PrivacyBudgetExhausted`).
    """
    epochs = private.config.local_epochs if epochs is None else epochs
    if epochs * private.steps_per_epoch > private.planned_steps:
        raise PrivacyBudgetExhausted(
            f"DP-SGD: {epochs} epochs ({epochs * private.steps_per_epoch} steps) asked, but "
            f"this round reserved {private.planned_steps} steps (local_epochs="
            f"{private.config.local_epochs}); set local_epochs in the DPSGDConfig instead",
            math.nan,
            math.nan,
            math.nan,
        )
    split = batch_to_xy or (lambda b: split_batch(b, input_key, target_key))
    if private.grad_sample_mode == "ghost":
        crit = private.criterion
        assert crit is not None
        if private.default_criterion:

            def loss_of(out: Any, y: torch.Tensor) -> Any:
                return crit(out.reshape(-1), y.reshape(-1).float())
        else:
            loss_of = crit
    else:
        base = loss_fn or default_loss

        def loss_of(out: Any, y: torch.Tensor) -> Any:
            loss = base(out, y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                raise PrivacyConfigError(
                    f"loss_fn must return one scalar, the mean over the batch (reduction="
                    f"'mean', as Opacus scales per-sample gradients by it); got {shape}"
                )
            return loss

    model, optimizer = private.module, private.optimizer
    anchor = [p.detach().clone() for p in optimizer.params] if proximal_mu > 0 else []
    model.train()
    total, batches = 0.0, 0
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    for _ in range(epochs):
        for batch in private.data_loader:
            xb, yb = split(batch)
            optimizer.zero_grad()
            empty = _rows(xb) == 0
            if empty and private.grad_sample_mode != "ghost":
                _noise_only_step(private)
            else:
                _drop_stale_activations(private.original_module)
                out = model(*xb) if isinstance(xb, list | tuple) else model(xb)
                loss = loss_of(out, yb)
                loss.backward()
            if not optimizer.pre_step():  # clip, accumulate, noise, scale, account
                continue
            if proximal_mu > 0:
                with torch.no_grad():
                    for p, a in zip(optimizer.params, anchor, strict=True):
                        p.grad.add_(p.detach() - a, alpha=proximal_mu)
            optimizer.original_optimizer.step()
            if not empty:
                total += float(loss.item())
                batches += 1
    return total / max(batches, 1)


def _drop_stale_activations(module: nn.Module) -> None:
    """Forget activations captured by a forward pass that had no backward.

    Opacus's hooks push activations on every training-mode forward with grad
    enabled and pop them on backward; a stray forward (say a validation loss
    computed in train mode) would otherwise pair the next backward with the
    wrong activations (and its forward counter would stop Opacus from ever
    completing the per-sample gradient).
    """
    for sub in module.modules():
        acts = getattr(sub, "activations", None)
        if isinstance(acts, list) and acts:
            acts.clear()
            for p in sub.parameters(recurse=False):
                if hasattr(p, "_forward_counter"):  # else the grad sample is never promoted
                    p._forward_counter = 0


def train_local_private(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    privacy: DPSGDConfig,
    state: RecordDict,
    ledger_key: str = SAMPLE_LEDGER_KEY,
    ledger_file: LedgerFile | None = None,
    note: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, PrivacyReport]:
    """:func:`flower_ext.training.train_local` with DP-SGD, charged to the ledger in ``state``.

    Raises :class:`PrivacyBudgetExhausted` (nothing trained, nothing spent)
    when the round would exceed the budget. With ``ledger_file`` the round is
    reserved on disk before any step (see :class:`LedgerFile`); else the ledger
    lives in ``state`` and is saved in a ``finally``, so a crash mid-round
    cannot under-report. ``cfg.seed`` seeds only what is not private (torch's
    global generator); the noise and the Poisson batches come from
    CSPRNG-seeded generators (:func:`make_private`).
    """
    torch.manual_seed(cfg.seed)
    ledger = PrivacyLedger.load(state, ledger_key, accountant=privacy.accountant)
    loader = make_loader(x, y, cfg.batch_size, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    try:
        private = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            config=privacy,
            ledger=ledger,
            ledger_file=ledger_file,
            note=note,
        )
    except PrivacyBudgetExhausted:
        if ledger_file is not None:  # the state mirrors what the file (all runs) spent
            ledger_file.restore(state, privacy.accountant, ledger.unit)
        raise
    try:
        loss = train_private_epochs(
            private, cfg.epochs, proximal_mu=cfg.proximal_mu, loss_fn=loss_fn
        )
    finally:
        report = private.finish()
        ledger.save(state, ledger_key)
    return loss, report


__all__ = [
    "INPUT_KEYS",
    "TARGET_KEYS",
    "FlatClipDPOptimizer",
    "PrivacyReport",
    "PrivateTraining",
    "check_module",
    "default_loss",
    "make_private",
    "poisson_loader",
    "resolve_grad_sample_mode",
    "split_batch",
    "train_local_private",
    "train_private_epochs",
]
