"""A ClientApp mod that turns chosen clients into attackers (test federations only).

Honest clients' code is untouched: the handler trains as usual and this mod,
on the malicious nodes only, rewrites the TRAIN reply with a kernel of
:mod:`flower_ext.attacks`. Everything comes from the run config::

    attack = "sign-flip"        # see flower_ext.attacks.ATTACKS
    malicious-banks = "0,3"     # node indices (node config bank-index / partition-id)
    attack-scale = 10.0         # sign-flip, scaling
    attack-noise-std = 1.0      # gaussian
    attack-alie-z = 0.0         # 0: Baruch et al.'s z_max(n, f), n = num-banks
    attack-ipm-epsilon = 5.0
    attack-seed = 0
    attack-count-factor = 0.0   # num-examples multiplier; 0: 100 for weight-inflation, else 1
    attack-moments-factor = 1e4 # poisoned-standardisation: sum-sq multiplier
    attack-knowledge = "colluders"  # or "all": the attackers know every bank's honest update
    attack-perturbation = "std" # min-max / min-sum direction: std, unit, sign

How each attack is plumbed:

- ``sign-flip``, ``scaling``, ``gaussian``: the reply's weights become
  ``global + attack(local - global)``, with the reply's keys and dtypes.
- ``weight-inflation`` (and any attack with ``attack-count-factor`` > 1): the
  reply's ``num-examples`` is multiplied; ``weight-inflation`` also flips labels.
- ``poisoned-standardisation``: the QUERY reply's ``moments`` get ``sum-sq``
  multiplied by ``attack-moments-factor``; training stays honest.
- ``label-flip``: for the duration of the call the mod puts a flag in
  ``context.state`` (ConfigRecord ``attack``, ``flip-labels = True``) and the
  app's train handler trains on :func:`training_labels`, i.e. ``1 - y``. The flag
  lives in node state, which the server cannot write: a server cannot make an
  honest bank flip its labels through the train config.
- ``alie``, ``ipm``, ``min-max``, ``min-sum``, ``fang-trim``, ``fang-krum``,
  ``mimic``: the colluding attackers pool their honest updates
  (:mod:`flower_ext.attacks` explains this threat model). The mod gets the other
  colluders' honest updates from the ``colluder_updates`` hook given to
  :class:`AttackMod` (the bank app trains them from the same global model and
  the same seeds, so every colluder computes the same pool and sends the same
  vector); without a hook the attacker's own update is the whole pool. With
  ``attack-knowledge = "all"`` the hook is asked for every other bank's honest
  update (the papers' omniscient attacker; costs one training per bank).

Other message types, error replies and replies that do not match the model
received pass through untouched; the incoming message is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from flower_ext.attacks import (
    COLLUDING_ATTACKS,
    LABEL_FLIP_ATTACKS,
    AttackConfig,
    apply_attack,
    flip_labels,
    inflate_count,
    poison_moments,
)
from flower_ext.records import ArrayLayout

STATE_KEY = "attack"
FLIP_LABELS = "flip-labels"
INDEX_KEYS = ("bank-index", "partition-id")

#: ``hook(msg, context, indices)`` -> the honest flat updates of those colluders.
ColluderUpdates = Callable[[Message, Context, list[int]], list[np.ndarray]]


def node_index(context: Context, keys: tuple[str, ...] = INDEX_KEYS) -> int | None:
    """This node's index from its node config (``bank-index``, else ``partition-id``)."""
    for key in keys:
        if key in context.node_config:
            return int(context.node_config[key])  # type: ignore[arg-type]
    return None


def training_labels(labels: np.ndarray, context: Context) -> np.ndarray:
    """The labels a train handler should train on: flipped while the mod says so."""
    flag = context.state.config_records.get(STATE_KEY)
    if isinstance(flag, ConfigRecord) and bool(flag.get(FLIP_LABELS, False)):
        return flip_labels(labels)
    return labels


def _single_arrays(content: RecordDict) -> tuple[str, ArrayRecord] | None:
    records = content.array_records
    if len(records) != 1:
        return None
    return next(iter(records.items()))


class AttackMod:
    """The attack mod; ``colluder_updates`` supplies ALIE/IPM's pooled honest updates.

    Parameters
    ----------
    colluder_updates : callable, optional
        ``hook(msg, context, indices) -> list of flat float updates``: the honest
        updates of the other malicious nodes ``indices`` for this round.
    index_keys : tuple of str
        Node-config keys naming the node's index, first match wins.
    """

    def __init__(
        self,
        colluder_updates: ColluderUpdates | None = None,
        index_keys: tuple[str, ...] = INDEX_KEYS,
    ) -> None:
        self.colluder_updates = colluder_updates
        self.index_keys = index_keys

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.QUERY) or not msg.has_content():
            return call_next(msg, context)
        cfg = AttackConfig.from_config(
            context.run_config,
            int(context.node_config.get("num-partitions", 0)),  # type: ignore[arg-type]
        )
        index = node_index(context, self.index_keys)
        if not cfg.is_malicious(index):
            return call_next(msg, context)
        assert index is not None
        if kind == MessageType.QUERY:
            if cfg.attack != "poisoned-standardisation":
                return call_next(msg, context)
            return _poison_query_reply(call_next(msg, context), cfg.moments_factor)
        out = self._attack_train(msg, context, call_next, cfg, index)
        factor = cfg.effective_count_factor()
        if factor > 1 and not out.has_error() and out.has_content():
            out = _inflate_reply_count(out, factor)
        return out

    def _attack_train(
        self,
        msg: Message,
        context: Context,
        call_next: ClientAppCallable,
        cfg: AttackConfig,
        index: int,
    ) -> Message:
        if cfg.attack in LABEL_FLIP_ATTACKS:
            context.state[STATE_KEY] = ConfigRecord({FLIP_LABELS: True})
            try:
                return call_next(msg, context)
            finally:
                del context.state[STATE_KEY]

        sent = _single_arrays(msg.content)
        out = call_next(msg, context)
        if sent is None or out.has_error() or not out.has_content():
            return out
        got = _single_arrays(out.content)
        if got is None:
            return out
        arrays_key, local = got
        layout = ArrayLayout.of(sent[1])
        mismatch = layout.mismatch(local)
        if mismatch:
            log(WARNING, "attack_mod: reply does not match the model received (%s)", mismatch)
            return out
        global_flat = layout.flatten(sent[1], dtype=np.float64)
        update = layout.flatten(local, dtype=np.float64) - global_flat
        honest = None
        if cfg.attack in COLLUDING_ATTACKS:
            known = cfg.malicious
            if cfg.knowledge == "all" and cfg.num_clients > 0:
                known = tuple(range(cfg.num_clients))
            others = [i for i in known if i != index]
            pool = {index: update}
            if others and self.colluder_updates is not None:
                pool.update(zip(others, self.colluder_updates(msg, context, others), strict=True))
            honest = np.stack([pool[i] for i in sorted(pool)])  # same order on every colluder
        server_round = int(msg.content.config_records.get("config", {}).get("server-round", 0))  # type: ignore[union-attr,arg-type]
        rng = np.random.default_rng([cfg.seed, index, server_round])
        rank = cfg.malicious.index(index) if index in cfg.malicious else 0
        attacked = apply_attack(
            cfg, update, honest=honest, rng=rng, attacker_rank=rank, server_round=server_round
        )
        content = RecordDict()
        for key, record in out.content.items():
            content[key] = layout.unflatten(global_flat + attacked) if key == arrays_key else record
        return Message(metadata=out.metadata, content=content)


def _inflate_reply_count(out: Message, factor: float) -> Message:
    """The reply with every ``num-examples`` metric multiplied by ``factor``."""
    content = RecordDict()
    for key, record in out.content.items():
        if isinstance(record, MetricRecord) and "num-examples" in record:
            record = MetricRecord(dict(record))
            record["num-examples"] = inflate_count(record["num-examples"], factor)  # type: ignore[arg-type]
        content[key] = record
    return Message(metadata=out.metadata, content=content)


def _poison_query_reply(out: Message, factor: float) -> Message:
    """The feature-moments reply with ``sum-sq`` multiplied (poisoned standardisation)."""
    if out.has_error() or not out.has_content() or "moments" not in out.content:
        return out
    moments = out.content["moments"]
    if not isinstance(moments, MetricRecord) or "sum-sq" not in moments:
        return out
    _, _, total_sq = poison_moments(
        moments["num-examples"],  # type: ignore[arg-type]
        np.asarray(moments["sum"]),
        np.asarray(moments["sum-sq"]),
        factor,
    )
    content = RecordDict()
    for key, record in out.content.items():
        if key == "moments":
            record = MetricRecord({**dict(moments), "sum-sq": [float(v) for v in total_sq]})
        content[key] = record
    return Message(metadata=out.metadata, content=content)


#: The ready-made mod (ALIE/IPM pool only the attacker's own update).
attack_mod = AttackMod()
