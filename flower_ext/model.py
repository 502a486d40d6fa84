"""The bank model: feature standardisation plus logistic regression or a small MLP.

Standardisation statistics live in the model as buffers, so the global model is
self-contained. They are computed *federatedly* before training: each bank
sends per-feature count, sum and sum of squares of its training rows (no row
leaves the bank) and the server combines them (:func:`combine_feature_moments`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

MODEL_KINDS = ("logreg", "mlp")


class CreditRiskModel(nn.Module):
    """Outputs one default log-odds per row, shape (B, 1)."""

    def __init__(
        self, num_features: int, kind: str = "mlp", hidden_units: Sequence[int] = (32, 16)
    ) -> None:
        super().__init__()
        if kind not in MODEL_KINDS:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got '{kind}'")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        layers: list[nn.Module] = []
        width = num_features
        if kind == "mlp":
            if not hidden_units or any(h < 1 for h in hidden_units):
                raise ValueError(f"hidden-units must be positive integers, got {hidden_units}")
            for h in hidden_units:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.feature_mean) / self.feature_std)

    def set_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        with torch.no_grad():
            self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))


def parse_hidden_units(text: str | int) -> tuple[int, ...]:
    """``"32,16"`` -> (32, 16)."""
    try:
        units = tuple(int(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise ValueError(f"hidden-units must be comma-separated integers, got '{text}'") from None
    return units


def build_model(
    num_features: int, kind: str, hidden_units: str | int = "32,16", seed: int | None = None
) -> CreditRiskModel:
    """A fresh model; with ``seed`` its initial weights are reproducible (global RNG untouched)."""
    if seed is None:
        return CreditRiskModel(num_features, kind, parse_hidden_units(hidden_units))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CreditRiskModel(num_features, kind, parse_hidden_units(hidden_units))


def feature_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, sum, sum of squares) per feature, in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    return len(x64), x64.sum(axis=0), (x64**2).sum(axis=0)


def combine_feature_moments(
    parts: Sequence[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Global mean and std from the banks' moments; constant features get std 1."""
    count = sum(p[0] for p in parts)
    if count == 0:
        raise ValueError("no training rows reported by any bank")
    total = np.sum([p[1] for p in parts], axis=0)
    total_sq = np.sum([p[2] for p in parts], axis=0)
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-8 * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, std


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
