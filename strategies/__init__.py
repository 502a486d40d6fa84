"""Server-side strategies for Flower's Message API (installed as ``flower_ext.strategies``).

Every strategy subclasses ``flwr.serverapp.strategy.FedAvg`` through
:class:`UpdateAggregationStrategy`, keeps FedAvg's constructor arguments, and
aggregates validated client *updates* with a pure kernel from
:mod:`flower_ext.aggregation`. The Byzantine-robust rules share
:class:`RobustStrategy` (f checks, robust round metrics). :class:`Scaffold` adds
SCAFFOLD's control variates to FedAvg; every strategy takes an adaptive server
optimiser (``server_optimizer``: FedAdagrad, FedAdam, FedYogi).
"""

from .base import RoundReport, UpdateAggregationStrategy
from .bulyan import Bulyan
from .centered_clipping import CenteredClipping
from .encrypted_fedavg import EncryptedFedAvg
from .fedavg import FedAvg
from .fednova import FedNova
from .geometric_median import GeometricMedian
from .krum import Krum
from .median import FedMedian, Median
from .multikrum import MultiKrum
from .norm_bound import NormBound
from .robust import RobustStrategy
from .scaffold import Scaffold
from .secure_fedavg import SecureFedAvg
from .topk import TopKCompression
from .trimmed_mean import FedTrimmedAvg, TrimmedMean

__all__ = [
    "Bulyan",
    "CenteredClipping",
    "EncryptedFedAvg",
    "FedAvg",
    "FedMedian",
    "FedNova",
    "FedTrimmedAvg",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBound",
    "RobustStrategy",
    "RoundReport",
    "Scaffold",
    "SecureFedAvg",
    "TopKCompression",
    "TrimmedMean",
    "UpdateAggregationStrategy",
]
