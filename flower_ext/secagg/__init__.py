"""Secure aggregation (SecAgg / SecAgg+ family) for Flower's Message API.

- :mod:`.primitives`: X25519 + HKDF, AES-CTR PRG, and Flower's Shamir, Fernet and
  quantisation helpers;
- :mod:`.protocol`: the protocol as pure steps (:class:`BankSession` at a bank,
  :class:`ServerRound` at the server);
- :mod:`.dp`: distributed DP (each bank's share of the Gaussian noise, the accountant);
- :mod:`.mod`: the bank-side ClientApp mod ``secagg_mod``;
- the server strategy is ``flower_ext.strategies.SecureFedAvg``.
"""

from .dp import DistributedDP, DistributedDPError, epsilon_if_missing
from .protocol import (
    BankSession,
    SecAggError,
    SecAggParams,
    ServerRound,
    TooFewSurvivors,
    dequantize_sum,
    quantize_vector,
)

__all__ = [
    "BankSession",
    "DistributedDP",
    "DistributedDPError",
    "SecAggError",
    "SecAggParams",
    "ServerRound",
    "TooFewSurvivors",
    "dequantize_sum",
    "epsilon_if_missing",
    "quantize_vector",
]
