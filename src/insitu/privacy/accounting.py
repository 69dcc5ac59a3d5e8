"""Privacy accounting: frozen events in, ε out, through Google's ``dp-accounting``.

What is released is described by :class:`PrivacyEvent` records (a Gaussian or
Laplace release, possibly Poisson-subsampled, repeated ``steps`` times), in the
units of their sensitivity.  A round is a tuple of events; a site's history is
the sequence of its rounds.  ε is always computed by composing the *exact*
events that happened, so a schedule whose σ changes from round to round (e.g. a
decaying σ) is accounted by composing each round's own event, never by a
closed formula for the constant case.

Which accountant, and why PLD is the default
--------------------------------------------
``dp-accounting`` offers two accountants for the subsampled Gaussian:

* **PLD** (privacy loss distributions, Koskela et al. 2020, Doroshenko et al.
  2022) composes the full distribution of the privacy loss numerically.  Its
  ε is tight up to the discretisation, which is *pessimistic* (rounded so the
  reported ε is an upper bound).  For DP-SGD it reports 10–20 % smaller ε than
  RDP at the same noise (e.g. σ=1, q=0.08, 200 steps, δ=1e-5: PLD 7.84, RDP
  8.71), i.e. less noise for the same promise.
* **RDP** (Rényi DP, Mironov 2017) tracks a handful of Rényi orders and
  converts to (ε, δ) at the end.  Cheap and robust, but loose.

We default to PLD because a hospital's budget is a hard limit and a loose
accountant spends it on noise that protects nobody.  The discretisation
interval is 3e-3 instead of the library's 1e-4: measured here, the ε moves by
< 0.01 % (7.8399 vs 7.8395 above; the discretisation is pessimistic, so the
reported ε stays an upper bound) while one evaluation drops from ~1.2 s to
~0.08 s, which matters because every site evaluates ε before every round.  RDP
stays available (``AccountantKind.RDP``) for very long runs or as a cross
check.

Composition is commutative, so identical events are grouped and composed with
``count`` (the library's efficient self-composition); the result is the same
number a round-by-round composition gives (tested).
"""
from __future__ import annotations

import enum
import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # dp-accounting (and scipy.signal under it) costs ~1.5 s to import: only when ε is computed
    from dp_accounting import dp_event

from insitu.errors import ConfigError

#: PLD discretisation (see the module docstring for the measured trade-off).
PLD_DISCRETIZATION = 3e-3
#: calibration never goes below this noise (PLD is slow there and utility is no better).
MIN_NOISE_MULTIPLIER = 0.3

# dp-accounting's RDP code logs a warning for every order it cannot evaluate; the order is
# simply dropped (a looser but still valid bound), so the warnings are noise for our users.
logging.getLogger("absl").setLevel(logging.ERROR)


class AccountantKind(str, enum.Enum):
    PLD = "pld"
    RDP = "rdp"


class Mechanism(str, enum.Enum):
    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"


@dataclass(frozen=True)
class PrivacyEvent:
    """One release, repeated ``steps`` times, each on a Poisson sample of rate ``sampling_rate``.

    ``noise_multiplier`` is the noise in units of the release's sensitivity: σ/Δ₂ for the
    Gaussian mechanism, b/Δ₁ for Laplace (so a Laplace release is (1/b)-DP, pure).
    """

    mechanism: Mechanism
    noise_multiplier: float
    sampling_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        z = float(self.noise_multiplier)
        if not (z > 0 and math.isfinite(z)):
            raise ConfigError(f"noise multiplier must be a positive number, got {self.noise_multiplier!r}; "
                              "zero noise is not differentially private")
        if not (0 < float(self.sampling_rate) <= 1):
            raise ConfigError(f"sampling rate must be in (0, 1], got {self.sampling_rate!r}")
        if int(self.steps) < 1 or int(self.steps) != self.steps:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sampling_rate", float(self.sampling_rate))
        object.__setattr__(self, "steps", int(self.steps))

    def to_dp_event(self) -> dp_event.DpEvent:
        from dp_accounting import dp_event

        base: dp_event.DpEvent
        if self.mechanism is Mechanism.GAUSSIAN:
            base = dp_event.GaussianDpEvent(self.noise_multiplier)
        else:
            base = dp_event.LaplaceDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1.0:
            base = dp_event.PoissonSampledDpEvent(self.sampling_rate, base)
        return base if self.steps == 1 else dp_event.SelfComposedDpEvent(base, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism.value, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrivacyEvent":
        unknown = set(d) - {"mechanism", "noise_multiplier", "sampling_rate", "steps"}
        if unknown:
            raise ConfigError(f"privacy event has unknown fields {sorted(unknown)}")
        return cls(Mechanism(d["mechanism"]), d["noise_multiplier"], d.get("sampling_rate", 1.0), d.get("steps", 1))

    def describe(self) -> str:
        s = f"{self.mechanism.value}(z={self.noise_multiplier:.4g}"
        if self.sampling_rate < 1:
            s += f", q={self.sampling_rate:.4g}"
        if self.steps > 1:
            s += f", steps={self.steps}"
        return s + ")"


def _fresh(kind: AccountantKind):
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if kind is AccountantKind.PLD:
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return rdp_privacy_accountant.RdpAccountant()


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ConfigError(f"δ must be in (0, 1), got {delta!r}; use a value well below 1/number of records, e.g. 1e-5")


@functools.lru_cache(maxsize=4096)
def _epsilon_grouped(groups: tuple[tuple[PrivacyEvent, int], ...], delta: float, kind: AccountantKind) -> float:
    acc = _fresh(kind)
    for event, count in groups:
        acc.compose(event.to_dp_event(), count)
    return float(acc.get_epsilon(delta))


def epsilon_of(events: Iterable[PrivacyEvent], delta: float, kind: AccountantKind = AccountantKind.PLD) -> float:
    """ε at ``delta`` of composing ``events`` (pure function; 0 for no events)."""
    _check_delta(delta)
    counts = Counter(events)
    if not counts:
        return 0.0
    groups = tuple(sorted(counts.items(), key=lambda kv: (kv[0].mechanism.value, kv[0].noise_multiplier, kv[0].sampling_rate, kv[0].steps)))
    return _epsilon_grouped(groups, float(delta), AccountantKind(kind))


class Accountant:
    """The small interface sites and the coordinator use: ``dry_run``, ``step``, ``get_epsilon``.

    ``dry_run`` answers "what would ε be after this round?" without recording anything;
    ``step`` records.  Both take a whole round (one or more events) so that a round is
    charged all-or-nothing.
    """

    def __init__(self, delta: float, kind: AccountantKind = AccountantKind.PLD, events: Iterable[PrivacyEvent] = ()):
        _check_delta(delta)
        self.delta = float(delta)
        self.kind = AccountantKind(kind)
        self._events: list[PrivacyEvent] = list(events)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def dry_run(self, round_events: Sequence[PrivacyEvent]) -> float:
        return epsilon_of([*self._events, *round_events], self.delta, self.kind)

    def step(self, round_events: Sequence[PrivacyEvent]) -> float:
        eps = self.dry_run(round_events)  # validates before mutating
        self._events.extend(round_events)
        return eps

    def get_epsilon(self, delta: float | None = None) -> float:
        return epsilon_of(self._events, self.delta if delta is None else delta, self.kind)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    *,
    rounds: int,
    sampling_rate: float = 1.0,
    steps_per_round: int = 1,
    kind: AccountantKind = AccountantKind.PLD,
    extra_per_round: Sequence[PrivacyEvent] = (),
    tol: float = 2e-3,
) -> float:
    """The smallest Gaussian noise multiplier z (within ``tol``) such that ``rounds`` rounds of
    ``steps_per_round`` Poisson-sampled Gaussian releases (plus ``extra_per_round`` events each
    round) spend at most ``target_epsilon`` at ``delta``.

    ``tol`` is relative to the bracket's upper end.  Uses dp-accounting's own calibration
    (Brent's method) inside a bracket found by doubling, with the same grouped composition
    :func:`epsilon_of` uses, so the ledger later reports ε ≤ target.
    """
    _check_delta(delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target ε must be a positive number, got {target_epsilon!r}")
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    kind = AccountantKind(kind)
    if extra_per_round and epsilon_of([e for e in extra_per_round for _ in range(rounds)], delta, kind) >= target_epsilon:
        raise ConfigError(f"the fixed per-round events alone spend more than ε={target_epsilon} over {rounds} rounds")

    from dp_accounting import dp_event, mechanism_calibration

    def make_event(z: float) -> dp_event.DpEvent:
        z = max(z, 1e-6)
        parts = [dp_event.SelfComposedDpEvent(PrivacyEvent(Mechanism.GAUSSIAN, z, sampling_rate, steps_per_round).to_dp_event(), rounds)]
        parts += [dp_event.SelfComposedDpEvent(e.to_dp_event(), rounds) for e in extra_per_round]
        return dp_event.ComposedDpEvent(parts)

    extra = [e for e in extra_per_round for _ in range(rounds)]

    def eps_at(z: float) -> float:
        return epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, z, sampling_rate, steps_per_round)] * rounds + extra, delta, kind)

    # Bracket by doubling/halving from z = 1 (PLD gets slow for z << 0.3, so we never start there).
    lo, hi = 1.0, 1.0
    if eps_at(hi) > target_epsilon:
        while eps_at(hi) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ConfigError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta} in {rounds} rounds")
    else:
        while hi / 2 >= MIN_NOISE_MULTIPLIER and eps_at(hi / 2) <= target_epsilon:
            hi /= 2
        lo = hi / 2
        if lo < MIN_NOISE_MULTIPLIER:
            if eps_at(MIN_NOISE_MULTIPLIER) <= target_epsilon:
                return MIN_NOISE_MULTIPLIER
            lo = MIN_NOISE_MULTIPLIER
    z = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _fresh(kind), make_event, target_epsilon, delta,
        mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=tol * hi,
    )
    z = float(z)
    # Brent's method returns a point within tol of the boundary; step up until the ledger's own
    # grouped composition agrees that the target holds (it almost always does at once).
    for _ in range(50):
        if eps_at(z) <= target_epsilon:
            return z
        z += tol * hi
    raise ConfigError(f"could not calibrate noise for ε={target_epsilon}, δ={delta}")


def gaussian_round(noise_multiplier: float, *, sampling_rate: float = 1.0, steps: int = 1) -> tuple[PrivacyEvent, ...]:
    return (PrivacyEvent(Mechanism.GAUSSIAN, noise_multiplier, sampling_rate, steps),)


__all__ = ["AccountantKind", "Mechanism", "PrivacyEvent", "Accountant", "epsilon_of", "calibrate_noise", "gaussian_round", "PLD_DISCRETIZATION"]
