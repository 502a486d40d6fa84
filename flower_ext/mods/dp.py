"""Update-level (client-level) DP as a ClientApp mod: clip the update, add noise, account.

On a TRAIN message, with run config ``dp = "update"``, the mod:

1. loads the client's update-level :class:`~flower_ext.privacy.PrivacyLedger`
   from ``context.state`` and refuses the round (an error reply with code
   :data:`~flower_ext.privacy.PRIVACY_BUDGET_ERROR_CODE`, nothing trained)
   if one more release would exceed the budget; with node config ``ledger-dir``
   the release is reserved in the bank's ledger file under its lock first
   (:class:`~flower_ext.privacy.LedgerFile`), so concurrent runs cannot overspend;
2. lets the handler train, takes ``update = local - global``, clips its L2
   norm to ``dp-max-grad-norm`` and adds ``N(0, (sigma * C)^2)`` to every
   entry (:func:`~flower_ext.privacy.privatize_update`), drawn from a fresh
   generator seeded from the OS CSPRNG for every release, so neither the
   server nor another bank can predict it;
3. charges one Gaussian release at sample rate 1 to the ledger, accounted
   under "replace the bank's whole contribution" (sensitivity ``2C``, so the
   ledger records ``sigma / 2``), and adds the ``dp-*`` metrics to the reply.
   No norm of the update is ever sent, and the reply's metrics are an
   *allow-list*: ``num-examples`` (declared public) and the ``dp-*`` keys the mod
   writes; anything else the handler computed on the bank's rows before the
   noise (``train-loss``, Flower's ``train_loss``, ...) is dropped.

The bank's own policy (node config ``dp-required``, ``dp-epsilon-budget``,
``dp-max-delta``; :class:`~flower_ext.privacy.BankDPPolicy`) always wins over the
run config: a train message under a run that breaks it is answered with error
:data:`~flower_ext.privacy.PRIVACY_POLICY_ERROR_CODE`, nothing trained, and the
budget is ``min(run's, bank's)``. An update with a NaN or an infinity is never
sent (it cannot be clipped): the same error code, the release stays charged.

``frozen_keys`` name arrays training must not change (e.g. the bank model's
standardisation buffers): they are reset to the global values, so they carry
no data and need no noise. This is local DP: the noise is added before the
update leaves the client, so it holds against the server too (unlike Flower's
server-side DP wrappers), at the price of far more noise than central DP.
The mod must run inside any attack/compression/encryption mods (closest to
the handler), so that what they see is already private.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from flower_ext.privacy import (
    UPDATE_LEDGER_KEY,
    UPDATE_LEDGER_UNIT,
    DPSGDConfig,
    NonFiniteUpdateError,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    PrivacyPolicyViolation,
    UpdateDPConfig,
    bank_privacy,
    budget_refusal,
    ledger_file_for,
    policy_refusal,
    privacy_config_from_run_config,
    privatize_update,
    secure_numpy_generator,
)
from flower_ext.records import as_c_array

#: Reply metrics a DP train reply may carry besides the mod's own ``dp-*`` keys.
DEFAULT_ALLOWED_METRICS = ("num-examples",)


class UpdateDPMod:
    """Client-side update clipping + Gaussian noise with a cumulative ledger.

    Parameters
    ----------
    config : UpdateDPConfig, optional
        Fixed settings; if omitted they come from the run config (``dp*`` keys,
        rounds from the train config's ``num-server-rounds`` or the run config's).
    frozen_keys : tuple of str
        Arrays reset to the global model's values and left without noise.
    seed : int, optional
        Seed of the noise, for tests only: whoever knows it can subtract the
        noise. Default: a generator seeded from the OS CSPRNG for every release.
    allowed_metrics : tuple of str
        The only handler metrics kept in the reply (default ``num-examples``,
        declared public), besides the ``dp-*`` keys the mod writes: everything
        else was computed on the bank's rows before the noise and is outside the
        guarantee. Add a key only if it is public or privatised on its own.
    """

    def __init__(
        self,
        config: UpdateDPConfig | None = None,
        frozen_keys: tuple[str, ...] = (),
        seed: int | None = None,
        allowed_metrics: tuple[str, ...] = DEFAULT_ALLOWED_METRICS,
    ) -> None:
        self.config = config
        self.frozen_keys = tuple(frozen_keys)
        self.allowed_metrics = tuple(allowed_metrics)
        self._rng = np.random.default_rng(seed) if seed is not None else None

    def run_settings(self, msg: Message, context: Context) -> DPSGDConfig | UpdateDPConfig | None:
        """The run's DP settings (either mode; None when off), before the bank's policy."""
        if self.config is not None:
            return self.config
        run = context.run_config
        train_cfg = msg.content.config_records.get("config")
        rounds = (train_cfg or {}).get("num-server-rounds", run.get("num-server-rounds", 1))
        return privacy_config_from_run_config(run, int(rounds), 1)  # type: ignore[arg-type]

    def settings(self, msg: Message, context: Context) -> UpdateDPConfig | None:
        """The update-level settings after the bank's policy; None when another mode runs.

        Raises :class:`~flower_ext.privacy.PrivacyPolicyViolation` when the run
        breaks the bank's node-config policy.
        """
        cfg = bank_privacy(context, self.run_settings(msg, context))
        return cfg if isinstance(cfg, UpdateDPConfig) else None

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        try:
            cfg = self.settings(msg, context)
        except PrivacyPolicyViolation as err:
            return policy_refusal(msg, str(err))
        if cfg is None:
            return call_next(msg, context)
        if len(msg.content.array_records) != 1:
            raise ValueError("update_dp_mod: the train message must hold exactly one ArrayRecord")
        ledger = PrivacyLedger.load(
            context.state, UPDATE_LEDGER_KEY, accountant=cfg.accountant, unit=UPDATE_LEDGER_UNIT
        )
        sigma, accounted = cfg.noise(), cfg.accounted_noise()
        ledger_file = ledger_file_for(context, UPDATE_LEDGER_KEY)
        try:
            if ledger_file is not None:  # reserved on disk, under the lock, before training
                _, ledger = ledger_file.reserve(
                    ledger,
                    budget=cfg.budget,
                    delta=cfg.delta,
                    noise_multiplier=accounted,
                    sample_rate=1.0,
                    steps=1,
                    note={"run-id": int(context.run_id), "mode": "update"},
                )
            else:
                ledger.check_budget(cfg.budget, cfg.delta, accounted, 1.0, 1)
                ledger.record(accounted, 1.0, 1, cfg.delta)
                ledger.rounds += 1
        except PrivacyBudgetExhausted as err:
            if ledger_file is not None:  # the state mirrors what the file (all runs) spent
                ledger_file.restore(context.state, cfg.accountant, UPDATE_LEDGER_UNIT)
            return budget_refusal(msg, err)
        # Charged before training: a failed round stays spent, never under-reported.
        ledger.save(context.state, UPDATE_LEDGER_KEY)
        global_arrays = next(iter(msg.content.array_records.values()))
        out = call_next(msg, context)
        if out.has_error() or not out.has_content() or len(out.content.array_records) != 1:
            return out
        arrays_key, local_arrays = next(iter(out.content.array_records.items()))
        keys = list(global_arrays.keys())
        if list(local_arrays.keys()) != keys:
            raise ValueError("update_dp_mod: the reply's arrays do not match the model received")
        noised_keys = [k for k in keys if k not in self.frozen_keys]
        glob = {k: global_arrays[k].numpy() for k in keys}
        update = [local_arrays[k].numpy().astype(np.float64) - glob[k] for k in noised_keys]
        rng = self._rng if self._rng is not None else secure_numpy_generator()
        try:
            noised = privatize_update(update, cfg.clip_norm, sigma, rng)
        except NonFiniteUpdateError as err:  # cannot be clipped: nothing leaves the bank
            return policy_refusal(msg, f"update_dp_mod: {err}")
        private = dict(zip(noised_keys, noised, strict=True))
        new_arrays = ArrayRecord(
            {
                k: Array(
                    as_c_array(
                        (glob[k] + private[k]).astype(glob[k].dtype) if k in private else glob[k]
                    )
                )
                for k in keys
            }
        )
        content = RecordDict()
        for key, record in out.content.items():
            if key == arrays_key:
                content[key] = new_arrays
            elif isinstance(record, MetricRecord):
                metrics = MetricRecord(
                    {k: v for k, v in record.items() if k in self.allowed_metrics}
                )
                metrics["dp-epsilon"] = ledger.epsilon(cfg.delta)  # at the strictest delta
                metrics["dp-delta"] = ledger.strictest_delta(cfg.delta)
                metrics["dp-noise-multiplier"] = sigma
                metrics["dp-max-grad-norm"] = cfg.clip_norm
                metrics["dp-sample-rate"] = 1.0
                metrics["dp-steps"] = ledger.total_steps
                content[key] = metrics
            else:
                content[key] = record
        return Message(metadata=out.metadata, content=content)


#: The ready-made mod: settings from the run config, every array noised.
update_dp_mod = UpdateDPMod()
