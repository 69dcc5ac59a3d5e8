"""Server strategies: how the averaged update moves the global model.

A strategy is a tiny interface over pure math: :meth:`Strategy.configure` adds
what sites need to know for the round (FedProx's μ, Scaffold's control
variate), :meth:`Strategy.apply` turns the weighted-mean update into the next
global model.  The adaptive optimizers follow Reddi et al. 2021 ("Adaptive
Federated Optimization"): the mean update Δ is a pseudo-gradient, and

    m ← β₁m + (1−β₁)Δ
    FedAdagrad: v ← v + Δ²
    FedYogi:    v ← v − (1−β₂)Δ²·sign(v − Δ²)
    FedAdam:    v ← β₂v + (1−β₂)Δ²
    x ← x + η·m / (√v + τ)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from insitu.errors import ConfigError, parse_choice


class StrategyName(str, enum.Enum):
    """The server strategies: FedAvg, FedProx (proximal local loss, weight μ), the adaptive server
    optimisers of Reddi et al. (FedAdam, FedYogi, FedAdagrad) and Scaffold (control variates)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    SCAFFOLD = "scaffold"


@dataclass
class Strategy:
    """FedAvg: x ← x + η·Δ (η = 1 is plain averaging of the sites' models)."""

    server_lr: float = 1.0

    name = StrategyName.FEDAVG
    scaffold = False

    #: attributes that carry state between rounds (saved by a deployed coordinator, restored on restart)
    STATE: ClassVar[tuple[str, ...]] = ()

    def configure(self, round_: int, params: np.ndarray) -> dict[str, np.ndarray]:
        """Tensors the sites need this round besides the global parameters (Scaffold's control)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """The server state to persist between rounds (empty for stateless strategies)."""
        return {k: np.asarray(getattr(self, k)) for k in self.STATE if getattr(self, k, None) is not None}

    def load_state(self, key: str, value: np.ndarray) -> None:
        if key not in self.STATE:
            raise ConfigError(f"strategy {self.name.value} has no state {key!r}; it keeps {list(self.STATE)}")
        setattr(self, key, np.asarray(value, dtype=np.float64))

    def update_size(self, n_params: int) -> int:
        return n_params

    def apply(self, params: np.ndarray, mean_update: np.ndarray, *, fraction: float = 1.0) -> np.ndarray:
        return (params.astype(np.float64) + self.server_lr * mean_update).astype(np.float32)


@dataclass
class FedProx(Strategy):
    """FedAvg on the server; sites add μ/2·‖w − w_global‖² to their loss (Li et al. 2020)."""

    mu: float = 0.01
    name = StrategyName.FEDPROX  # μ reaches the sites in the approved plan (StrategySpec.mu), not per round


@dataclass
class _Adaptive(Strategy):
    server_lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)
    STATE = ("m", "v")

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, params, mean_update, *, fraction=1.0):
        d = mean_update.astype(np.float64)
        if self.m is None:
            self.m = np.zeros_like(d)
            self.v = np.full_like(d, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * d
        self.v = self._second_moment(self.v, d * d)
        return (params.astype(np.float64) + self.server_lr * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)


@dataclass
class FedAdam(_Adaptive):
    name = StrategyName.FEDADAM

    def _second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2


@dataclass
class FedYogi(_Adaptive):
    name = StrategyName.FEDYOGI

    def _second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


@dataclass
class FedAdagrad(_Adaptive):
    name = StrategyName.FEDADAGRAD

    def _second_moment(self, v, d2):
        return v + d2


@dataclass
class Scaffold(Strategy):
    """Scaffold (Karimireddy et al. 2020): sites correct their gradients by c − cᵢ and return
    [Δy, Δc]; the server moves x by η·mean(Δy) and c by (|S|/N)·mean(Δc)."""

    name = StrategyName.SCAFFOLD
    scaffold = True
    control: np.ndarray | None = field(default=None, repr=False)
    STATE = ("control",)

    def configure(self, round_, params):
        if self.control is None:
            self.control = np.zeros(params.shape[0], dtype=np.float64)
        return {"control": self.control.astype(np.float32)}

    def update_size(self, n_params):
        return 2 * n_params

    def apply(self, params, mean_update, *, fraction=1.0):
        n = params.shape[0]
        dy, dc = mean_update[:n], mean_update[n:]
        if self.control is None:
            self.control = np.zeros(n)
        self.control = self.control + fraction * dc
        return (params.astype(np.float64) + self.server_lr * dy).astype(np.float32)


STRATEGIES: dict[StrategyName, type[Strategy]] = {
    StrategyName.FEDAVG: Strategy,
    StrategyName.FEDPROX: FedProx,
    StrategyName.FEDADAM: FedAdam,
    StrategyName.FEDYOGI: FedYogi,
    StrategyName.FEDADAGRAD: FedAdagrad,
    StrategyName.SCAFFOLD: Scaffold,
}


def make_strategy(name: str, **options: Any) -> Strategy:
    cls = STRATEGIES[parse_choice(StrategyName, name, "strategy")]
    allowed = set(cls.__dataclass_fields__) - set(cls.STATE)
    bad = set(options) - allowed
    if bad:
        raise ConfigError(f"strategy {name} takes no option(s) {sorted(bad)}; it takes {sorted(allowed)}")
    return cls(**options)
