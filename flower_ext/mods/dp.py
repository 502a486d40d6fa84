"""Update-level (client-level) DP as a ClientApp mod: clip the update, add noise, account.

On a TRAIN message, with run config ``dp = "update"``, the mod:

1. loads the client's update-level :class:`~flower_ext.privacy.PrivacyLedger`
   from ``context.state`` and refuses the round (an error reply with code
   :data:`~flower_ext.privacy.PRIVACY_BUDGET_ERROR_CODE`, nothing trained)
   if one more release would exceed the budget;
2. lets the handler train, takes ``update = local - global``, clips its L2
   norm to ``dp-max-grad-norm`` and adds ``N(0, (sigma * C)^2)`` to every
   entry (:func:`~flower_ext.privacy.privatize_update`);
3. charges one Gaussian release at sample rate 1 to the ledger and adds the
   ``dp-*`` metrics to the reply.

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
    PrivacyBudgetExhausted,
    PrivacyLedger,
    UpdateDPConfig,
    budget_refusal,
    ledger_file_for,
    privacy_config_from_run_config,
    privatize_update,
)


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
        Seed of the noise (tests); default: fresh OS entropy every reply.
    """

    def __init__(
        self,
        config: UpdateDPConfig | None = None,
        frozen_keys: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.frozen_keys = tuple(frozen_keys)
        self._rng = np.random.default_rng(seed)

    def settings(self, msg: Message, context: Context) -> UpdateDPConfig | None:
        if self.config is not None:
            return self.config
        run = context.run_config
        train_cfg = msg.content.config_records.get("config")
        rounds = (train_cfg or {}).get("num-server-rounds", run.get("num-server-rounds", 1))
        cfg = privacy_config_from_run_config(run, int(rounds), 1)  # type: ignore[arg-type]
        return cfg if isinstance(cfg, UpdateDPConfig) else None

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        cfg = self.settings(msg, context)
        if cfg is None:
            return call_next(msg, context)
        if len(msg.content.array_records) != 1:
            raise ValueError("update_dp_mod: the train message must hold exactly one ArrayRecord")
        ledger_file = ledger_file_for(context, UPDATE_LEDGER_KEY)
        if ledger_file is not None:  # node config ledger-dir: survives SuperNode restarts
            ledger_file.restore(context.state)
        ledger = PrivacyLedger.load(
            context.state, UPDATE_LEDGER_KEY, accountant=cfg.accountant, unit="client"
        )
        sigma = cfg.noise()
        try:
            ledger.check_budget(cfg.budget, cfg.delta, sigma, 1.0, 1)
        except PrivacyBudgetExhausted as err:
            return budget_refusal(msg, err)
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
        noised, norm = privatize_update(update, cfg.clip_norm, sigma, self._rng)
        private = dict(zip(noised_keys, noised, strict=True))
        new_arrays = ArrayRecord(
            {
                k: Array(
                    np.ascontiguousarray(
                        (glob[k] + private[k]).astype(glob[k].dtype) if k in private else glob[k]
                    )
                )
                for k in keys
            }
        )
        ledger.record(sigma, 1.0, 1)
        ledger.rounds += 1
        ledger.save(context.state, UPDATE_LEDGER_KEY)
        if ledger_file is not None:
            ledger_file.persist(context.state)
        content = RecordDict()
        for key, record in out.content.items():
            if key == arrays_key:
                content[key] = new_arrays
            elif isinstance(record, MetricRecord):
                metrics = MetricRecord(dict(record))
                metrics["dp-epsilon"] = ledger.epsilon(cfg.delta)
                metrics["dp-delta"] = cfg.delta
                metrics["dp-noise-multiplier"] = sigma
                metrics["dp-max-grad-norm"] = cfg.clip_norm
                metrics["dp-sample-rate"] = 1.0
                metrics["dp-steps"] = ledger.total_steps
                metrics["dp-update-norm"] = float(norm)
                content[key] = metrics
            else:
                content[key] = record
        return Message(metadata=out.metadata, content=content)


#: The ready-made mod: settings from the run config, every array noised.
update_dp_mod = UpdateDPMod()
