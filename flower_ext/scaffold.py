"""SCAFFOLD on the bank side: drift-corrected local training with control variates.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II. The server sends its control
variate ``c`` next to the global model ``x`` (an extra ArrayRecord,
:data:`CONTROL_KEY`, in the same keys and shapes as the model); each bank keeps
its own ``c_i`` in ``context.state`` (:data:`STATE_KEY`; Flower keeps it across
rounds) and

1. trains from ``y_i = x`` with every local step descending ``g(y_i) + c - c_i``
   (:func:`flower_ext.training.train_steps`' ``correction``);
2. sets ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` with K the optimizer steps it took
   and lr the round's local learning rate;
3. replies with its model ``y_i`` (as usual) and ``delta c_i = c_i+ - c_i``
   (:data:`CONTROL_DELTA_KEY`), then keeps ``c_i+``.

The server (:class:`flower_ext.strategies.Scaffold`) averages the models as FedAvg
does and sets ``c += (1/N) sum_{i in S} delta c_i`` (N banks in all, S the accepted
replies).

Local momentum: the paper's local solver is plain SGD, where ``(x - y_i) / (K lr)``
is the mean corrected gradient. The app trains with heavy-ball momentum ``beta``
(``TrainConfig.momentum``, restarted each round), under which K steps of a
constant gradient move the weights ``lr * K_eff`` times it, ``K_eff = sum_{k=1..K}
(1 - beta**k) / (1 - beta)``; dividing by ``K_eff * lr`` instead of ``K * lr``
keeps ``c_i+`` the mean corrected gradient (``K_eff = K`` when ``beta = 0``, the
paper's case exactly).

Only trainable parameters are corrected. Other arrays of the model (the
standardisation buffers, integer counters) have control values that stay 0.

Privacy: ``delta c_i`` is ``(x - y_i) / (K_eff lr) - c`` up to the bank's own previous
``c_i``: it reveals as much about the bank's data as its model update itself, and
in clear. Hence SCAFFOLD is refused with DP (the deltas would need their own
noise and accounting), HE and secure aggregation (the server must read each
delta), top-k (one sparse ArrayRecord per reply) and the robust rules (an attacker's
delta would poison ``c`` for every bank).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from torch import nn

from .records import as_c_array
from .training import TrainConfig, train_local_steps

#: The server's control variate ``c`` in a train message (an ArrayRecord).
CONTROL_KEY = "scaffold-control"
#: The bank's ``delta c_i`` in its train reply (an ArrayRecord, keys and shapes of ``c``).
CONTROL_DELTA_KEY = "scaffold-control-delta"
#: Where a bank keeps its ``c_i`` between rounds (``context.state``, an ArrayRecord).
STATE_KEY = "scaffold-client-control"


class ScaffoldError(ValueError):
    """A control variate the bank cannot use (wrong keys, shapes, or not finite)."""


def effective_steps(steps: int, momentum: float) -> float:
    """``sum_{k=1..K} (1 - beta**k) / (1 - beta)``: K steps of heavy-ball SGD from a zero
    buffer move the weights this many times ``lr * g`` for a constant gradient ``g``."""
    if steps <= 0:
        return 0.0
    if momentum == 0.0:
        return float(steps)
    beta = float(momentum)
    return (steps - beta * (1.0 - beta**steps) / (1.0 - beta)) / (1.0 - beta)


def server_control(content: RecordDict) -> ArrayRecord | None:
    """The control variate ``c`` a train message carries, or ``None`` (no SCAFFOLD)."""
    record = content.array_records.get(CONTROL_KEY)
    return record if isinstance(record, ArrayRecord) else None


def _as_tensors(
    record: ArrayRecord, params: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """The parameters' entries of ``record`` as float tensors, checked."""
    out = {}
    for name, param in params.items():
        if name not in record:
            raise ScaffoldError(f"{what} has no array for parameter '{name}'")
        values = np.asarray(record[name].numpy(), dtype=np.float64)
        if values.shape != tuple(param.shape):
            raise ScaffoldError(
                f"{what} array '{name}' has shape {values.shape}, the parameter "
                f"{tuple(param.shape)}"
            )
        if not np.isfinite(values).all():
            raise ScaffoldError(f"{what} array '{name}' has NaN or Inf")
        out[name] = torch.as_tensor(values, dtype=param.dtype)
    return out


def scaffold_train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    control: ArrayRecord,
    state: RecordDict,
) -> tuple[float, ArrayRecord, int]:
    """Train ``model`` in place with SCAFFOLD's correction; update ``c_i`` in ``state``.

    Parameters
    ----------
    model : nn.Module
        The global model ``x`` loaded; trained in place to ``y_i``.
    x, y : np.ndarray
        The bank's training rows and labels.
    cfg : TrainConfig
        The round's local training settings (``learning_rate`` is the lr above).
    control : ArrayRecord
        The server's ``c``: one float array per model array (keys and shapes of
        ``model.state_dict()``).
    state : RecordDict
        The bank's ``context.state``; ``c_i`` is read from and written to
        ``state[STATE_KEY]`` (zeros when absent or from another model layout).

    Returns
    -------
    (loss, delta, steps)
        The mean training loss, ``delta c_i`` as an ArrayRecord in ``control``'s keys,
        shapes and dtypes, and the optimizer steps K taken.

    Raises
    ------
    ScaffoldError
        If ``control`` misses a parameter, has another shape, or is not finite.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    c = _as_tensors(control, params, "the server's control variate")
    kept = state.array_records.get(STATE_KEY)
    try:
        c_i = _as_tensors(kept, params, "the kept control variate") if kept is not None else None
    except ScaffoldError:
        c_i = None  # another model (a new run with other hidden units): start again from 0
    if c_i is None:
        c_i = {name: torch.zeros_like(p) for name, p in params.items()}
    start = {name: p.detach().clone() for name, p in params.items()}
    correction = {name: c[name] - c_i[name] for name in params}
    loss, steps = train_local_steps(model, x, y, cfg, correction)
    scale = effective_steps(steps, cfg.momentum) * cfg.learning_rate
    new_c_i: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        if scale > 0:
            drift = (start[name] - param.detach()) / scale
            new_c_i[name] = c_i[name] - c[name] + drift
        else:  # no step taken: nothing learned about the bank's gradient
            new_c_i[name] = c_i[name]
    delta = ArrayRecord()
    for key in control:
        like = control[key].numpy()
        dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.dtype(np.float32)
        if key in params:
            values = (new_c_i[key] - c_i[key]).detach().cpu().numpy()
        else:
            values = np.zeros(like.shape)
        delta[key] = Array(as_c_array(np.asarray(values, dtype=dtype).reshape(like.shape)))
    state[STATE_KEY] = ArrayRecord(
        {name: Array(as_c_array(t.detach().cpu().numpy())) for name, t in new_c_i.items()}
    )
    return loss, delta, steps


#: Error code of a bank's train reply when the server's control variate is unusable.
SCAFFOLD_ERROR_CODE = 4300


def scaffold_refusal(msg: Message, reason: str) -> Message:
    """The reply of a bank that cannot run SCAFFOLD this round (the server audits it)."""
    return Message(Error(code=SCAFFOLD_ERROR_CODE, reason=f"SCAFFOLD: {reason}"), reply_to=msg)
