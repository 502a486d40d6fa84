"""``secagg_mod``: the bank side of secure aggregation, as a Flower ClientApp mod.

Install it as ``ClientApp(mods=[secagg_mod])`` or ``@app.train(mods=[secagg_mod])``.
It acts only on train messages that carry a ``secagg`` ConfigRecord (sent by
:class:`flower_ext.strategies.SecureFedAvg`); every other message passes through.

Stages (the ``stage`` key of the server's ``secagg`` record; all are train messages):

``train``
    Calls the ClientApp's own train function, computes ``update = local - global``
    (float64, the layout of the global model it was sent) and keeps it in
    ``context.state``. Replies with the two fresh public keys and the train
    metrics (``num-examples`` among them). **No arrays leave the bank.**
``share-keys``
    Gets the roster (public keys of every bank that replied) and the public
    total weight ``N``; replies with encrypted Shamir shares for each other bank
    and ``sha256(b_i)``.
``masked-input``
    Gets the shares other banks sent it; replies with
    ``masked(q(n_i / N * update))`` as one ``uint32`` array and the number of
    coordinates clipped. With distributed DP (the train record carries
    ``dp-clip-norm`` and ``dp-noise-std``) it masks ``q(clip(update) + noise)``
    instead, every bank with the same weight, and reports no clip count
    (:mod:`flower_ext.secagg.dp`).
``consistency`` (only when every bank signed its keys)
    Gets the survivor list; replies with its identity key's signature of it, once
    per round (a second, different list is refused).
``unmask``
    Gets the survivors and the dropped (with signed keys also the survivors'
    signatures of that list: ``t`` must verify, and it must be the list this bank
    signed); replies with its shares of the survivors' self-mask seeds and of the
    dropped banks' mask keys (never both for one bank, never twice). The round's
    secrets are then deleted from the state.

A refusal (a step out of order, a tampered share, a request that would unmask one
bank) comes back as an error reply with the reason; the bank's update never
leaves in clear.

Signed keys (node config, both optional):

``secagg-identity-key``
    Path to this bank's long-term Ed25519 private key (PEM, PKCS#8; e.g. the
    bank's ``bank-key.pem`` of its receipts). The advertisement then carries the
    public half and a signature over the two public keys, the run, the round and
    the node id.
``secagg-trusted-keys``
    The banks' identity public keys, comma-separated, each 64 hex digits or a
    file (PEM, or hex). With it the bank refuses (error reply, nothing shared) a
    roster in which any bank's keys are unsigned, signed by another key, or two
    entries are signed by one key: a server that forges other banks' keys gets no
    share of this bank's secrets.

The bank's own floor (node config, optional; the server's settings cannot lower it):

``secagg-min-threshold``
    The smallest ``t`` this bank takes part with.
``secagg-dp-min-noise-multiplier``
    Distributed DP required, with the noise of the sum over the clip norm (``sigma``,
    computed from the ``t``, ``C`` and per-bank std the server sends) at least this.

``secagg-dp-required``
    true: a train message without distributed DP (``dp-clip-norm``, ``dp-noise-std``)
    is refused (so is one when the run config itself says ``secagg-dp = true``).
``secagg-state-dir``
    A folder where the bank records the last round it trained per run
    (``secagg-trained-<node>.json``), so that the replay guard below survives a
    SuperNode restart. Without it the record is in ``context.state`` only.

A train message below the floor is refused before any training (error reply).

Replays: a bank trains each server round of a run at most once, in increasing order
(a second train message for a round it trained, or an earlier one, is refused): a
server that ran one round twice, with and without one bank, could subtract the sums.

``masked-input`` is refused unless shares from at least ``t - 1`` other banks came
with it; shares that do not decrypt are left out and reported (``bad-src``), and the
server drops their senders.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from flower_ext.audit.signing import Signer, SigningKeyError, load_public_key
from flower_ext.records import ArrayLayout

from .primitives import KeyPair
from .protocol import BankSession, SecAggError, SecAggParams

RECORD_KEY = "secagg"  # ConfigRecord in messages both ways; ArrayRecord "secagg" for y_i
STATE_KEY = "secagg.session"  # ConfigRecord in context.state
STATE_UPDATE_KEY = "secagg.update"  # ArrayRecord in context.state
MASKED_KEY = "masked"
ERROR_CODE = 4020  # error replies from this mod

STAGE_TRAIN = "train"
STAGE_SHARE_KEYS = "share-keys"
STAGE_MASKED_INPUT = "masked-input"
STAGE_UNMASK = "unmask"
STAGE_CONSISTENCY = "consistency"  # only with signed keys (module docstring)

#: Node-config keys of signed keys (module docstring).
IDENTITY_KEY = "secagg-identity-key"
TRUSTED_KEYS = "secagg-trusted-keys"
#: Node-config keys of the bank's floor (module docstring).
MIN_THRESHOLD_KEY = "secagg-min-threshold"
MIN_SIGMA_KEY = "secagg-dp-min-noise-multiplier"
DP_REQUIRED_KEY = "secagg-dp-required"
#: Node config: a folder where the bank keeps the rounds it trained (survives restarts).
STATE_DIR_KEY = "secagg-state-dir"
TRAINED_KEY = "secagg.trained"  # ConfigRecord in context.state: run id -> last round trained


def floor_problems(config: ConfigRecord | dict, node_config: dict) -> list[str]:
    """Why the server's round settings are below this bank's floor (empty: fine).

    ``sigma = std * sqrt(t) / C`` is the noise of the sum over the clip norm with ``t``
    honest banks (:func:`flower_ext.secagg.dp.per_bank_noise_std` inverted).
    """
    problems = []
    t = int(config.get("threshold", 0))  # type: ignore[arg-type]
    least_t = node_config.get(MIN_THRESHOLD_KEY)
    if least_t not in (None, "", 0) and t < int(least_t):  # type: ignore[arg-type]
        problems.append(f"threshold t={t} is below this bank's {MIN_THRESHOLD_KEY}={least_t}")
    least_sigma = float(node_config.get(MIN_SIGMA_KEY, 0.0) or 0.0)  # type: ignore[arg-type]
    if _as_bool(node_config.get(DP_REQUIRED_KEY, False)) and (
        DP_STD_KEY not in config or DP_CLIP_KEY not in config
    ):
        problems.append(
            f"this bank requires distributed DP ({DP_REQUIRED_KEY}=true) and the train message "
            "carries no dp-clip-norm / dp-noise-std"
        )
    if least_sigma > 0:
        if DP_STD_KEY not in config or DP_CLIP_KEY not in config:
            problems.append(f"this bank requires distributed DP ({MIN_SIGMA_KEY}={least_sigma:g})")
        else:
            std, clip = float(config[DP_STD_KEY]), float(config[DP_CLIP_KEY])  # type: ignore
            sigma = std * max(t, 1) ** 0.5 / clip if clip > 0 else 0.0
            if sigma < least_sigma * (1 - 1e-9):
                problems.append(
                    f"the noise multiplier of the sum is {sigma:.4g}, below this bank's "
                    f"{MIN_SIGMA_KEY}={least_sigma:g}"
                )
    return problems


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# --------------------------------------------------------------------------- replays
def _trained_file(context: Context):
    import pathlib

    folder = str(context.node_config.get(STATE_DIR_KEY, "") or "").strip()
    if not folder:
        return None
    return pathlib.Path(folder) / f"secagg-trained-{int(context.node_id)}.json"


def _last_trained(context: Context) -> int | None:
    """The last server round this bank trained under secagg in this run (None: none)."""
    import json

    run = str(int(context.run_id))
    rounds = []
    record = context.state.config_records.get(TRAINED_KEY)
    if record is not None and run in record:
        rounds.append(int(record[run]))  # type: ignore[arg-type]
    path = _trained_file(context)
    if path is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SecAggError(
                f"node config {STATE_DIR_KEY}: unreadable {path.name}: {err}"
            ) from None
        if run in saved:
            rounds.append(int(saved[run]))
    return max(rounds) if rounds else None


def _mark_trained(context: Context, server_round: int) -> None:
    """Remember (run id, round) before any training (context.state; and the state dir)."""
    import json
    import os

    run = str(int(context.run_id))
    record = context.state.config_records.get(TRAINED_KEY) or ConfigRecord()
    record[run] = int(server_round)
    context.state[TRAINED_KEY] = record
    path = _trained_file(context)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            saved = json.loads(path.read_text()) if path.exists() else {}
            saved[run] = int(server_round)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, path)
        except (OSError, ValueError) as err:
            raise SecAggError(
                f"node config {STATE_DIR_KEY}: cannot record the round: {err}"
            ) from None


def replay_problem(context: Context, server_round: int) -> str:
    """Why a train message for ``server_round`` is a replay ("" if it is a new round).

    A server that runs one round twice, with and without one bank, and subtracts the two
    sums gets that bank's update: a bank trains each round of a run at most once, in
    increasing order.
    """
    last = _last_trained(context)
    if last is not None and int(server_round) <= last:
        return (
            f"round {server_round} of run {int(context.run_id)} is not after round {last}, "
            "which this bank already trained under secure aggregation (a replayed round "
            "would let the server subtract two sums)"
        )
    return ""


#: Distributed-DP keys of the ``train`` record (absent: no DP): L2 clip and noise std.
DP_CLIP_KEY = "dp-clip-norm"
DP_STD_KEY = "dp-noise-std"
_KEPT = ("weight", "weight-total", DP_CLIP_KEY, DP_STD_KEY)  # carried from step to step


def _ids(values: list[int]) -> list[str]:
    # Node ids are uint64; ConfigRecord ints are int64: send them as decimal strings.
    return [str(int(v)) for v in values]


def _from_ids(values: object) -> list[int]:
    if not isinstance(values, list):
        raise SecAggError("a node-id list is missing")
    return [int(v) for v in values]


# --------------------------------------------------------------------------- state
def save_session(session: BankSession, extra: dict, context: Context) -> None:
    """Keep a round's session in ``context.state`` (it survives between messages)."""
    nodes = sorted(session.roster)
    record = ConfigRecord(
        {
            "node-id": str(session.node_id),
            "round": int(session.server_round),
            **session.params.to_dict(),
            "c-sk": session.c_keys.private,
            "s-sk": session.s_keys.private,
            "seed": session.self_seed,
            "roster": _ids(nodes),
            "roster-c": [session.roster[n][0] for n in nodes],
            "roster-s": [session.roster[n][1] for n in nodes],
            "share-nodes": _ids(sorted(session.seed_shares)),
            "seed-shares": [session.seed_shares[n] for n in sorted(session.seed_shares)],
            "key-shares": [session.key_shares[n] for n in sorted(session.seed_shares)],
            "unmasked": bool(session.unmasked),
            "roster-signers": [session.signers.get(n, "") for n in nodes],
            "signed-survivors": _ids(list(session.signed_survivors or ())),
            "has-signed": session.signed_survivors is not None,
            **extra,
        }
    )
    context.state[STATE_KEY] = record


def load_session(context: Context) -> tuple[BankSession, ConfigRecord]:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise SecAggError("no secure-aggregation round in progress at this bank")
    session = BankSession(
        node_id=int(record["node-id"]),  # type: ignore[arg-type]
        server_round=int(record["round"]),  # type: ignore[arg-type]
        params=SecAggParams.from_dict(dict(record)),
        c_keys=KeyPair(record["c-sk"]),  # type: ignore[arg-type]
        s_keys=KeyPair(record["s-sk"]),  # type: ignore[arg-type]
        self_seed=record["seed"],  # type: ignore[arg-type]
    )
    roster = _from_ids(record.get("roster", []))
    session.roster = (
        dict(zip(roster, zip(record["roster-c"], record["roster-s"], strict=True), strict=True))
        if roster
        else {}
    )
    holders = _from_ids(record.get("share-nodes", []))
    for n, b, k in zip(holders, record["seed-shares"], record["key-shares"], strict=True):
        session.seed_shares[n], session.key_shares[n] = b, k
    session.unmasked = bool(record.get("unmasked", False))
    signers = record.get("roster-signers", [])
    session.signers = {n: str(k) for n, k in zip(roster, signers, strict=False) if k}  # type: ignore[arg-type]
    if record.get("has-signed"):
        session.signed_survivors = tuple(_from_ids(record.get("signed-survivors", [])))
    return session, record


def clear_session(context: Context) -> None:
    for store in (context.state.config_records, context.state.array_records):
        for key in (STATE_KEY, STATE_UPDATE_KEY):
            if key in store:
                del store[key]


# --------------------------------------------------------------------------- the mod
def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_CODE, reason=f"secagg_mod: {reason}"[:500]), reply_to=msg)


def _reply(msg: Message, stage: str, values: dict, **records) -> Message:
    content = RecordDict({RECORD_KEY: ConfigRecord({"stage": stage, **values}), **records})
    return Message(content=content, reply_to=msg)


def _check_round(session: BankSession, config: ConfigRecord) -> None:
    if int(config.get("round", -1)) != session.server_round:  # type: ignore[arg-type]
        raise SecAggError(
            f"message for round {config.get('round')}, the session is round {session.server_round}"
        )


def _free_mask(layout: ArrayLayout, frozen: tuple[str, ...]) -> np.ndarray:
    """``uint8`` per coordinate: 1 where the array may change in training, 0 for ``frozen``."""
    free = np.ones(layout.dim, dtype=np.uint8)
    for key, start, stop in zip(layout.keys, layout.offsets[:-1], layout.offsets[1:], strict=True):
        if key in frozen:
            free[start:stop] = 0
    return free


def _train(
    msg: Message,
    context: Context,
    call_next: Callable,
    config: ConfigRecord,
    frozen: tuple[str, ...] = (),
) -> Message:
    params = SecAggParams.from_dict(dict(config))
    below = floor_problems(config, dict(context.node_config))
    if _as_bool(context.run_config.get("secagg-dp", False)) and not (
        DP_STD_KEY in config and DP_CLIP_KEY in config
    ):  # the run's own config asks for distributed DP: a message without it is refused
        below.append("the run config says secagg-dp = true but the train message has no DP")
    if below:  # before any training: nothing is computed from the rows
        raise SecAggError("refused by this bank's node config: " + "; ".join(below))
    protocol_round = int(config["round"])  # type: ignore[arg-type]
    replay = replay_problem(context, protocol_round)
    flower_config = msg.content.config_records.get("config")
    # The bank's training may be seeded by the train config's round: a server that numbers
    # the protocol round differently could replay one training under two protocol rounds.
    if (
        flower_config is not None
        and "server-round" in flower_config
        and str(flower_config["server-round"]) != str(protocol_round)
    ):
        replay = (
            f"the train config's server-round {flower_config['server-round']!r} is not "
            f"the secure-aggregation round {protocol_round}"
        )
    if replay:
        raise SecAggError("refused: " + replay)
    _mark_trained(context, protocol_round)
    weight_key = str(config.get("weight-key", "num-examples"))
    arrays_key = str(config.get("arrays-key", "arrays"))
    clear_session(context)  # a new round starts from nothing
    incoming = msg.content.array_records.get(arrays_key)
    if incoming is None:
        raise SecAggError(f"the train message has no ArrayRecord '{arrays_key}'")
    layout = ArrayLayout.of(incoming)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    content = reply.content
    if "he" in content.config_records or any(k.startswith("topk") for k in content):
        raise SecAggError(
            "the train reply is encrypted (he_mod) or top-k compressed (topk_mod): secure "
            "aggregation needs the dense plaintext update; remove those mods"
        )
    local = content.array_records.get(arrays_key)
    if local is None:
        raise SecAggError(f"the train reply has no ArrayRecord '{arrays_key}'")
    mismatch = layout.mismatch(local)
    if mismatch:
        raise SecAggError(f"the trained model does not fit the global model: {mismatch}")
    metrics = content.metric_records.get("metrics")
    if metrics is None or weight_key not in metrics:
        raise SecAggError(f"the train reply has no metric '{weight_key}'")
    weight = float(metrics[weight_key])  # type: ignore[arg-type]
    if not (weight > 0 and np.isfinite(weight)):
        raise SecAggError(f"'{weight_key}' must be positive, got {metrics[weight_key]}")
    update = layout.flatten(local, np.float64) - layout.flatten(incoming, np.float64)
    session = BankSession(int(context.node_id), protocol_round, params)
    dp = {k: float(config[k]) for k in (DP_CLIP_KEY, DP_STD_KEY) if k in config}  # type: ignore
    if len(dp) == 1:
        raise SecAggError(f"distributed DP needs both {DP_CLIP_KEY} and {DP_STD_KEY}")
    save_session(session, {"weight": weight, **dp}, context)
    kept = {"update": Array(update)}
    if dp and frozen:  # under DP the frozen arrays send exactly 0 and get no noise
        kept["free"] = Array(_free_mask(layout, frozen))
    context.state[STATE_UPDATE_KEY] = ArrayRecord(kept)
    c_pk, s_pk = session.advertise()
    advert: dict = {"c-pk": c_pk, "s-pk": s_pk}
    signer = identity(context)
    if signer is not None:
        session.run_id = int(context.run_id)
        advert.update(signer=signer.public_hex, sig=session.signed_advert(signer.sign))
    records = {k: v for k, v in content.items() if k != arrays_key and k != RECORD_KEY}
    records = {k: v for k, v in records.items() if not isinstance(v, ArrayRecord)}
    return _reply(msg, "advertise", advert, **records)


def identity(context: Context) -> Signer | None:
    """This bank's identity key (node config ``secagg-identity-key``), or None."""
    path = str(context.node_config.get(IDENTITY_KEY, "") or "").strip()
    if not path:
        return None
    try:
        return Signer.from_file(path)
    except (OSError, SigningKeyError) as err:
        raise SecAggError(f"node config {IDENTITY_KEY}: {err}") from None


def trusted_keys(context: Context) -> frozenset[str] | None:
    """The banks' identity keys (node config ``secagg-trusted-keys``), or None (unchecked)."""
    text = str(context.node_config.get(TRUSTED_KEYS, "") or "").strip()
    if not text:
        return None
    try:
        return frozenset(load_public_key(part) for part in text.split(",") if part.strip())
    except SigningKeyError as err:
        raise SecAggError(f"node config {TRUSTED_KEYS}: {err}") from None


def _kept(record: ConfigRecord) -> dict:
    return {k: record[k] for k in _KEPT if k in record}


def _share_keys(msg: Message, context: Context, config: ConfigRecord) -> Message:
    session, record = load_session(context)
    _check_round(session, config)
    nodes = _from_ids(config.get("nodes"))
    roster = dict(zip(nodes, zip(config["c-pk"], config["s-pk"], strict=True), strict=True))
    total = float(config["weight-total"])  # type: ignore[arg-type]
    weight = float(record["weight"])  # type: ignore[arg-type]
    if not (np.isfinite(total) and total >= weight):
        raise SecAggError(f"weight-total {total} is below this bank's own weight {weight}")
    session.run_id, session.trusted = int(context.run_id), trusted_keys(context)
    signatures = {}
    if "signer" in config and "sig" in config:
        signers, sigs = config["signer"], config["sig"]
        signatures = dict(zip(nodes, zip(signers, sigs, strict=True), strict=True))  # type: ignore
    cts = session.share_keys(roster, signatures)
    save_session(session, {**_kept(record), "weight-total": total}, context)
    dsts = sorted(cts)
    return _reply(
        msg,
        STAGE_SHARE_KEYS,
        {
            "dst": _ids(dsts),
            "ct": [cts[d] for d in dsts],
            "seed-digest": session.self_seed_digest(),
        },
    )


def _masked_input(msg: Message, context: Context, config: ConfigRecord) -> Message:
    session, record = load_session(context)
    _check_round(session, config)
    if session.neighbours:
        raise SecAggError("this round's masked input was already sent")
    update_record = context.state.array_records.get(STATE_UPDATE_KEY)
    if update_record is None:
        raise SecAggError("no update kept for this round")
    srcs = _from_ids(config.get("src"))
    if len(set(srcs)) != len(srcs):
        raise SecAggError("the masked-input message repeats a sender")
    bad = session.receive_shares(dict(zip(srcs, config["ct"], strict=True)))  # type: ignore
    # Refused unless shares came from t-1 other banks (BankSession.masked_input).
    update = update_record["update"].numpy()
    if DP_STD_KEY in record:  # distributed DP: equal weights, clip + this bank's noise share
        from flower_ext.privacy.mechanisms import secure_numpy_generator

        from .dp import noised_share

        clip, std = float(record[DP_CLIP_KEY]), float(record[DP_STD_KEY])  # type: ignore
        free = update_record["free"].numpy().astype(bool) if "free" in update_record else None
        masked, clipped = session.masked_input(
            noised_share(update, clip, std, secure_numpy_generator(), free=free)
        )
        report = {"dim": int(masked.size)}  # a clamp count would be outside the guarantee
    else:
        scale = float(record["weight"]) / float(record["weight-total"])  # type: ignore[arg-type]
        masked, clipped = session.masked_input(update * scale)
        report = {"clipped": int(clipped), "dim": int(masked.size)}
    report["bad-src"] = _ids(bad)  # senders whose shares did not decrypt: not masked with
    save_session(session, _kept(record), context)
    del context.state.array_records[STATE_UPDATE_KEY]  # the plaintext is no longer needed
    return _reply(
        msg,
        STAGE_MASKED_INPUT,
        report,
        **{RECORD_KEY + ".masked": ArrayRecord({MASKED_KEY: Array(masked)})},
    )


def _consistency(msg: Message, context: Context, config: ConfigRecord) -> Message:
    session, record = load_session(context)
    _check_round(session, config)
    signer = identity(context)
    if signer is None:
        raise SecAggError(f"the consistency check needs node config {IDENTITY_KEY}")
    session.run_id = int(context.run_id)
    signature = session.sign_survivors(_from_ids(config.get("survivors")), signer.sign)
    save_session(session, _kept(record), context)
    return _reply(msg, STAGE_CONSISTENCY, {"sig": signature})


def _unmask(msg: Message, context: Context, config: ConfigRecord) -> Message:
    session, _ = load_session(context)
    _check_round(session, config)
    session.run_id, session.trusted = int(context.run_id), trusted_keys(context)
    consistency = dict(
        zip(
            _from_ids(config.get("consistency-nodes", [])),
            [str(x) for x in config.get("consistency-sigs", [])],  # type: ignore[union-attr]
            strict=True,
        )
    )
    seeds, keys = session.unmask_shares(
        _from_ids(config.get("survivors")), _from_ids(config.get("dropped", [])), consistency
    )
    clear_session(context)  # answered once: the round's secrets go
    return _reply(
        msg,
        STAGE_UNMASK,
        {
            "seed-nodes": _ids(sorted(seeds)),
            "seed-shares": [seeds[n] for n in sorted(seeds)],
            "key-nodes": _ids(sorted(keys)),
            "key-shares": [keys[n] for n in sorted(keys)],
        },
    )


class SecAggMod:
    """Flower ClientApp mod: run this bank's side of a SecureFedAvg round.

    ``dp_frozen_keys`` name arrays training never changes (e.g. a model's
    standardisation buffers): under distributed DP their update is sent as exactly
    0 and gets no noise (as :class:`flower_ext.mods.dp.UpdateDPMod` does).
    :data:`secagg_mod` is the instance without frozen arrays.
    """

    def __init__(self, dp_frozen_keys: tuple[str, ...] = ()) -> None:
        self.dp_frozen_keys = tuple(str(k) for k in dp_frozen_keys)

    def __call__(self, msg: Message, context: Context, call_next: Callable) -> Message:
        return _secagg(msg, context, call_next, self.dp_frozen_keys)


def _secagg(
    msg: Message, context: Context, call_next: Callable, frozen: tuple[str, ...]
) -> Message:
    if not msg.has_content() or RECORD_KEY not in msg.content.config_records:
        return call_next(msg, context)
    config = msg.content.config_records[RECORD_KEY]
    stage = config.get("stage")
    try:
        if stage == STAGE_TRAIN:
            return _train(msg, context, call_next, config, frozen)
        if stage == STAGE_SHARE_KEYS:
            return _share_keys(msg, context, config)
        if stage == STAGE_MASKED_INPUT:
            return _masked_input(msg, context, config)
        if stage == STAGE_CONSISTENCY:
            return _consistency(msg, context, config)
        if stage == STAGE_UNMASK:
            return _unmask(msg, context, config)
        raise SecAggError(f"unknown stage {stage!r}")
    except (SecAggError, KeyError, TypeError, ValueError) as err:
        if stage in (STAGE_MASKED_INPUT, STAGE_UNMASK, STAGE_CONSISTENCY):
            clear_session(context)  # never retry a half-done masking step
        return _error(msg, f"stage {stage!r}: {err}")


#: The mod, ready to install: ``ClientApp(mods=[secagg_mod])``.
secagg_mod = SecAggMod()
