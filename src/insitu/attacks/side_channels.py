"""Attacks on what travels *around* the protected vectors: losses, evaluation answers, sampling.

Masking, encryption and noise protect the update vector.  A curious coordinator also receives
metrics beside it, scores of the models it asks sites to evaluate, and (in replayable runs) the
randomness of each site's sampling.  The three attacks here use exactly those, through the real
engine (sites built by :mod:`insitu.builder` from a plan, messages through the in-process
transport, which encodes them as the wire does):

* :func:`loss_equation_attack` — the coordinator sends single-record sites parameters it chose,
  round after round, and reads the exact training loss each site reports.  For logistic
  regression the loss of one SGD step on one record ``(x, y)`` is ``softplus(−(2y−1)(w·x + b))``:
  inverting it gives one linear equation in ``x`` per round, and ``d + 1`` rounds give the record
  and its label exactly.  The site's egress contract decides whether there is anything to invert.
* :func:`evaluation_oracle` — the coordinator sends crafted models in EVALUATE messages: a
  logistic regression that thresholds one feature at ``t`` with a steep slope ``M``.  The answer's
  ``correct`` count is ``#{y=0, x≤t} + #{y=1, x>t}`` and its loss is ``M/n`` times a convex
  piecewise-linear function of ``t`` whose kinks sit at the test records' values, the slope
  jumping by the number of records there.  Locating the kinks (tangent-line intersections) and
  reading the count jumps gives every (feature value, label) pair of the site's test split.  A
  site under the evaluation contract scores only models it was sent for training plus at most two
  others, so the oracle is refused after two queries.
* :func:`sampling_figures` — when the coordinator knows each site's Poisson sampling (a run with
  replayable randomness), amplification by sampling does not hold against it: the per-record ε
  is the accountant's figure for the same steps at sampling rate 1.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from insitu.attacks.observer import observe_round
from insitu.data.dataset import SiteData
from insitu.errors import ConfigError, DataError
from insitu.federation.task import TaskSpec
from insitu.learn.models import ModelName, build_model, get_flat
from insitu.plan import Plan

#: the metric the loss-equation attack inverts
LOSS_METRIC = "train_loss"


def _ledger_for(plan: Plan, site_ids: Iterable[str]):
    """An in-memory ledger with budgets no probe can exhaust (DP plans need one to train)."""
    if not plan.dp.on:
        return None
    from insitu.privacy import Budget, PrivacyLedger

    ledger = PrivacyLedger(":memory:")
    for sid in site_ids:
        ledger.set_budget(sid, Budget(1e9, plan.dp.delta, plan.dp.accountant))
    return ledger


def _require_logreg(task: TaskSpec, attack: str) -> int:
    """The number of input features of a logistic-regression task with one logit."""
    if ModelName(task.model) is not ModelName.LOGREG or task.num_outputs != 1:
        raise ConfigError(f"the {attack} models a logistic regression with one logit; this task is {task.model} "
                          f"with {task.num_outputs} output(s)")
    return int(np.prod(task.input_shape))


@functools.lru_cache(maxsize=16)
def _check_layout(model: str, input_shape: tuple[int, ...], num_outputs: int) -> None:
    """The flat vector of the registry's logistic regression is its weights, then its bias (checked once)."""
    m = build_model(model, input_shape, num_outputs)
    lin = [x for x in m.modules() if isinstance(x, torch.nn.Linear)][0]
    d = lin.in_features
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, d + 1, dtype=torch.float32).view(1, d))
        lin.bias.fill_(-1.0)
    if not np.array_equal(get_flat(m), np.r_[np.arange(1, d + 1), -1.0].astype(np.float32)):
        raise ConfigError(f"the {model} parameter layout is not (weights, bias); the side-channel attacks cannot build its parameters")


def _logreg_params(task: TaskSpec, w: np.ndarray, b: float) -> np.ndarray:
    """The flat parameter vector of the task's logistic regression with weights ``w`` and bias ``b``."""
    _check_layout(task.model, tuple(task.input_shape), task.num_outputs)
    return np.r_[np.asarray(w, dtype=np.float64).reshape(-1), float(b)].astype(np.float32)


def _split_logreg(task: TaskSpec, params: np.ndarray) -> tuple[np.ndarray, float]:
    """(w, b) of a flat logistic-regression parameter vector, in float64 (exactly what was sent)."""
    _check_layout(task.model, tuple(task.input_shape), task.num_outputs)
    p = np.asarray(params, dtype=np.float32).astype(np.float64)
    return p[:-1], float(p[-1])


# ---------------------------------------------------------------------------------------------
# the loss-equation attack
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossEquationResult:
    """Per target record: recovered exactly (every feature within ``tol`` and the label right), the
    estimate's RMS error and the population-mean guess's, and how many losses the coordinator got."""

    rounds: int
    losses_received: int  # train_loss values that reached the coordinator, over all sites and rounds
    success: tuple[bool, ...]
    label_correct: tuple[bool, ...]
    rms_error: tuple[float, ...]
    guess_rms_error: tuple[float, ...]
    chosen_parameters: bool = True

    @property
    def records(self) -> int:
        return len(self.success)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success)) if self.success else 0.0

    @property
    def better_than_guess(self) -> float:
        return float(np.mean([e < g for e, g in zip(self.rms_error, self.guess_rms_error)])) if self.success else 0.0


def invert_logistic_loss(loss: float) -> float:
    """``u`` with ``softplus(u) = loss``: for one record, ``u = −(2y−1)(w·x + b)``."""
    if not (loss > 0 and math.isfinite(loss)):
        return math.nan
    return loss + math.log(-math.expm1(-loss))  # log(eˡ − 1), stable for small and large losses


def solve_loss_equations(W: np.ndarray, b: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, int, float] | None:
    """The record ``x`` and label ``y`` behind ``losses[t] = softplus(−(2y−1)(W[t]·x + b[t]))``.

    Each sign of ``2y−1`` turns the rounds into a linear system ``W x = −(2y−1)u − b``; with more
    equations than features only the true label's system is consistent, so the sign with the
    smaller residual wins.  Returns (x, y, residual of the chosen system), or None with fewer than
    ``d + 1`` usable equations (the label is then undetermined)."""
    W, b = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
    u = np.array([invert_logistic_loss(float(v)) for v in losses])
    ok = np.isfinite(u)
    W, b, u = W[ok], b[ok], u[ok]
    if W.shape[0] < W.shape[1] + 1:
        return None
    sv = np.linalg.svd(W, compute_uv=False)
    if sv[-1] <= 1e-6 * sv[0]:
        return None  # the parameters sent span too few directions (float32 rounding is not information)
    best: tuple[np.ndarray, int, float] | None = None
    for sign in (1.0, -1.0):
        rhs = -sign * u - b
        x, *_ = np.linalg.lstsq(W, rhs, rcond=None)
        res = float(np.linalg.norm(W @ x - rhs))
        if best is None or res < best[2]:
            best = (x, int(sign > 0), res)
    return best


def loss_equation_attack(
    plan: Plan,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    guess: np.ndarray,
    guess_label: int = 0,
    rounds: int | None = None,
    chosen: bool = True,
    scale: float = 1.0,
    tol: float = 1e-3,
    seed: int = 0,
    secrets: dict[str, bytes] | None = None,
) -> LossEquationResult:
    """A curious coordinator recovers single-record sites' records from the losses they report.

    ``plan`` must be a single-record probe plan (:func:`insitu.attacks.probe.probe_plan`: one SGD
    step at batch size one) of a logistic-regression task.  One site per record (``probe-1`` …) is
    built from the plan, and the coordinator runs ``rounds`` rounds (default: features + 1)
    through the plan's own protocol.  ``chosen``: the coordinator sends parameters it drew
    (``N(0, scale²/d)`` weights, ``N(0, scale²)`` bias; sites check only that they are finite);
    otherwise it sends the global model the protocol produced.  The attacker reads only the
    TRAIN_REPLY messages it received: each ``metrics.train_loss`` is one equation.  A record with
    too few equations is estimated as ``guess`` (the population mean) with ``guess_label``."""
    from insitu.builder import build_federation

    task = plan.task
    d = _require_logreg(task, "loss-equation attack")
    if task.local_steps != 1:
        raise ConfigError(f"the loss-equation attack needs single-step probe rounds (local_steps = 1), got {task.local_steps}; "
                          "make the plan with insitu.attacks.probe.probe_plan")
    if X.ndim != 2 or X.shape[1] != d or X.shape[0] != y.shape[0] or X.shape[0] < 1:
        raise DataError(f"the attack needs records of {d} features with one label each, got X {tuple(X.shape)}, y {tuple(y.shape)}")
    rounds = d + 1 if rounds is None else int(rounds)
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    ids = [f"probe-{i + 1}" for i in range(X.shape[0])]
    sites = [SiteData(sid, X[i : i + 1], y[i : i + 1], X[i : i + 1], y[i : i + 1]) for i, sid in enumerate(ids)]
    coord, _ = build_federation(plan, sites, seed=seed, job="loss-equation-probe", secrets=secrets, ledger=_ledger_for(plan, ids))
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[np.ndarray, float, float]]] = {sid: [] for sid in ids}
    received = 0
    for r in range(1, rounds + 1):
        if chosen:
            coord.params = _logreg_params(task, rng.normal(0.0, scale / math.sqrt(d), d), float(rng.normal(0.0, scale)))
        obs = observe_round(coord, r)
        w, b = _split_logreg(task, obs.params)
        for sid, msg in obs.train_replies.items():
            metrics = msg.meta.get("metrics")
            if isinstance(metrics, dict) and isinstance(metrics.get(LOSS_METRIC), (int, float)) and sid in rows:
                rows[sid].append((w, b, float(metrics[LOSS_METRIC])))
                received += 1
    guess = np.asarray(guess, dtype=np.float64).reshape(-1)
    succ, lab, err, gerr = [], [], [], []
    for i, sid in enumerate(ids):
        truth = X[i].double().numpy()
        eqs = rows[sid]
        sol = solve_loss_equations(np.array([e[0] for e in eqs]), np.array([e[1] for e in eqs]), np.array([e[2] for e in eqs])) if eqs else None
        est, label = (guess, int(guess_label)) if sol is None else (sol[0], sol[1])
        label_ok = label == int(y[i])
        succ.append(bool(np.max(np.abs(est - truth)) <= tol and label_ok))
        lab.append(bool(label_ok))
        err.append(float(np.sqrt(np.mean((est - truth) ** 2))))
        gerr.append(float(np.sqrt(np.mean((guess - truth) ** 2))))
    return LossEquationResult(rounds, received, tuple(succ), tuple(lab), tuple(err), tuple(gerr), chosen)


# ---------------------------------------------------------------------------------------------
# the evaluation oracle
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OracleResult:
    """How much of one site's test split (one feature's value and the label) the oracle recovered."""

    site: str
    feature: str
    pairs: int  # test records of the site: (feature value, label) pairs to recover
    recovered: int  # pairs the attacker's answer gets right (value within tol, label right)
    queries_sent: int
    queries_answered: int
    refusal: str | None = None  # the site's reason when it stopped answering
    contract: bool = True  # False: a site that scores any parameters (the pre-contract behaviour)

    @property
    def rate(self) -> float:
        return self.recovered / self.pairs if self.pairs else 0.0


class _Stop(Exception):
    """The site stopped answering (refusal) or the query budget ran out."""


@dataclass
class _Point:
    t: float  # the threshold the site actually applied (from the float32 parameters sent)
    F: float  # n · loss / M: Σ over misclassified records of |x − t|
    A: int  # records classified correctly


@dataclass
class _DroppedLog:
    """Wraps the coordinator's transport to keep why a site did not answer."""

    inner: Any
    dropped: dict[str, str] = field(default_factory=dict)

    def sites(self) -> list[str]:
        return self.inner.sites()

    def exchange(self, requests, timeout):
        ex = self.inner.exchange(requests, timeout)
        self.dropped.update(ex.dropped)
        return ex


class _ThresholdQueries:
    """The coordinator's side of the oracle: one crafted model per question, through ``coord.evaluate``."""

    def __init__(self, coord: Any, site: str, task: TaskSpec, feature: int, steep: float, budget: int):
        self.coord, self.site, self.task, self.feature, self.steep, self.budget = coord, site, task, feature, float(steep), budget
        self.d = _require_logreg(task, "evaluation oracle")
        self.sent = self.answered = 0
        self.n = 0
        self.refusal: str | None = None
        self.log = _DroppedLog(coord.transport)
        coord.transport = self.log

    def ask(self, t: float) -> _Point:
        if self.sent >= self.budget:
            raise _Stop(f"query budget of {self.budget} spent")
        w = np.zeros(self.d)
        w[self.feature] = self.steep
        params = _logreg_params(self.task, w, -self.steep * t)
        wf, bf = _split_logreg(self.task, params)
        self.sent += 1
        out = self.coord.evaluate(self.sent, params=params)
        rep = out.get(self.site)
        if rep is None:
            self.refusal = self.log.dropped.get(self.site, "no answer")
            raise _Stop(self.refusal)
        self.answered += 1
        self.n = int(rep["n"])
        return _Point(-bf / wf[self.feature], self.n * float(rep["loss"]) / wf[self.feature], int(rep["correct"]))

    def slope_near(self, t: float, lo: float, hi: float, delta: float, have: _Point | None = None) -> tuple[_Point, int] | None:
        """A point near ``t`` inside (lo, hi) with no record within ``delta``, and the slope of F
        there (an integer: records below t minus y=0 records above it); None if none was found."""
        for k in (0, 3, -3, 7, -7, 13, -13):
            c = t + k * delta
            if not lo + 2 * delta < c < hi - 2 * delta:
                continue
            mid = have if (k == 0 and have is not None) else self.ask(c)
            left, right = self.ask(mid.t - delta), self.ask(mid.t + delta)
            sl = (mid.F - left.F) / (mid.t - left.t)
            sr = (right.F - mid.F) / (right.t - mid.t)
            if abs(sl - round(sl)) < 0.2 and round(sl) == round(sr) and abs(sr - round(sr)) < 0.2:
                return mid, int(round(sl))
        return None


def _recover_pairs(q: _ThresholdQueries, reach: float, delta: float, rel: float = 1e-6) -> list[tuple[float, int, int]]:
    """(value, records with y=0, records with y=1) at every kink of the loss curve."""
    lo, hi = q.ask(-reach), q.ask(reach)
    n1 = lo.A  # below every record, the model says 1 to everyone: correct = records with y=1
    n0 = q.n - n1
    found: list[tuple[float, int, int]] = []
    stack = [(lo, hi, -n0, n1, 0)]  # F's slope is −n0 below every record and n1 above
    while stack:
        a, b, sa, sb, depth = stack.pop()
        if sb <= sa or depth > 64:
            continue
        t = (b.F - a.F + sa * a.t - sb * b.t) / (sa - sb)  # where the two outer lines cross
        t = min(max(t, a.t + 1e-9), b.t - 1e-9)
        m = q.ask(t)
        line = a.F + sa * (m.t - a.t)
        c = sb - sa
        # one kink: F(t) lies on both lines, up to float32 rounding and softplus(0) = log 2 per record at t
        if abs(m.F - line) <= rel * (1.0 + abs(m.F)) + 2.0 * c * math.log(2.0) / q.steep:
            # one value holds every record between a and b
            c0 = int(round((c + b.A - a.A) / 2))  # crossing it turns y=0 records right, y=1 records wrong
            found.append((m.t, min(max(c0, 0), c), c - min(max(c0, 0), c)))
            continue
        split = q.slope_near(m.t, a.t, b.t, delta, m)
        if split is None:
            continue  # records too close together to part at this resolution
        p, s = split
        stack.append((a, p, sa, min(max(s, sa), sb), depth + 1))
        stack.append((p, b, min(max(s, sa), sb), sb, depth + 1))
    return found


def score_pairs(found: Sequence[tuple[float, int, int]], values: np.ndarray, labels: np.ndarray, tol: float) -> int:
    """Pairs of (value, label) the attacker's answer gets right: each true value is matched to the
    nearest recovered value within ``tol``, at most once, and counts per label up to the truth."""
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels).astype(int)
    truth: dict[float, list[int]] = {}
    for v, lbl in zip(values, labels):
        truth.setdefault(float(v), [0, 0])[lbl] += 1
    keys = np.array(sorted(truth))
    used: set[float] = set()
    hits = 0
    for v, c0, c1 in found:
        if keys.size == 0:
            break
        k = float(keys[int(np.argmin(np.abs(keys - v)))])
        if abs(k - v) > tol or k in used:
            continue
        used.add(k)
        hits += min(c0, truth[k][0]) + min(c1, truth[k][1])
    return hits


def evaluation_oracle(
    plan: Plan,
    data: SiteData,
    feature: int | str = 0,
    *,
    contract: bool = True,
    max_queries: int = 5000,
    steep: float = 1e5,
    reach: float = 100.0,
    delta: float = 1e-3,
    tol: float = 1e-3,
    secret: bytes | None = None,
) -> OracleResult:
    """The coordinator recovers (feature value, label) pairs of ``data``'s test split with crafted models.

    The site is built from ``plan`` by :func:`insitu.builder.build_federation`.  ``contract=False``
    rebuilds it with an unlimited ``max_unverified_evaluations``: that reproduces the site before
    the evaluation contract, which scored any parameters it was sent.  ``steep`` is the slope M of
    the threshold model, ``reach`` bounds the feature's values (z-scores), ``delta`` is the
    spacing of the slope measurements and ``tol`` the match tolerance, in feature units."""
    from insitu.builder import build_federation

    task = plan.task
    d = _require_logreg(task, "evaluation oracle")
    names = tuple(task.schema) if task.schema else tuple(f"x{i}" for i in range(d))
    if isinstance(feature, str):
        if feature not in names:
            raise ConfigError(f"feature {feature!r} is not one of the task's features {list(names)}")
        j = names.index(feature)
    else:
        j = int(feature)
        if not 0 <= j < d:
            raise ConfigError(f"feature index {feature} is out of range for {d} features")
    if data.n_test == 0:
        raise DataError(f"site {data.name} has no test records to attack")

    def pre_contract(site: Any) -> Any:
        # the site as it was before the contract: it scores any parameters it receives
        return dataclasses.replace(site, max_unverified_evaluations=sys.maxsize)

    coord, _ = build_federation(plan, [data], job="oracle-probe", secrets={data.name: secret} if secret else None,
                                ledger=_ledger_for(plan, [data.name]), wrap=None if contract else pre_contract)
    q = _ThresholdQueries(coord, data.name, task, j, steep, max_queries)
    try:
        found = _recover_pairs(q, reach, delta)
    except _Stop:
        found = []  # the attacker reads pairs off a finished sweep; a refused sweep gives none
    values = data.X_test[:, j].double().numpy()
    hits = score_pairs(found, values, data.y_test.numpy(), tol)
    return OracleResult(data.name, names[j], data.n_test, hits, q.sent, q.answered, q.refusal, contract)


# ---------------------------------------------------------------------------------------------
# known sampling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingFigures:
    """ε per record with and without amplification by sampling, for one run (largest over sites)."""

    declared_epsilon: float  # the ledger's events composed as charged (Poisson sampling at rate q)
    known_sampling_epsilon: float  # the same events at sampling rate 1: what holds if the sampling is known
    private_randomness: bool  # False: the run's sampling is replayable from what the run recorded
    sampling_rate: float | None = None  # the largest q any site sampled at

    @property
    def amplification_holds(self) -> bool:
        return self.private_randomness

    @property
    def effective_epsilon(self) -> float:
        """ε against the coordinator: the declared one only when it cannot know the sampling."""
        return self.declared_epsilon if self.private_randomness else self.known_sampling_epsilon


def known_sampling_epsilon(events: Iterable[Any], delta: float, accountant: Any = "pld") -> float:
    """ε of ``events`` with every Poisson-sampled step taken at rate 1 (the batch is known)."""
    from insitu.privacy import epsilon_of

    return epsilon_of([dataclasses.replace(e, sampling_rate=1.0) for e in events], delta, accountant)


def sampling_figures(events_by_site: dict[str, Sequence[Any]], delta: float, accountant: Any, private_randomness: bool) -> SamplingFigures:
    """Declared and known-sampling ε of each site's ledger events; the largest of each over sites."""
    from insitu.privacy import epsilon_of

    if not events_by_site or not any(events_by_site.values()):
        raise DataError("no privacy events to account: the run has no DP rounds in its ledger")
    declared = max(epsilon_of(list(ev), delta, accountant) for ev in events_by_site.values())
    known = max(known_sampling_epsilon(list(ev), delta, accountant) for ev in events_by_site.values())
    q = max((e.sampling_rate for ev in events_by_site.values() for e in ev), default=None)
    return SamplingFigures(declared, known, bool(private_randomness), q)


__all__ = [
    "LOSS_METRIC",
    "LossEquationResult",
    "OracleResult",
    "SamplingFigures",
    "evaluation_oracle",
    "invert_logistic_loss",
    "known_sampling_epsilon",
    "loss_equation_attack",
    "sampling_figures",
    "score_pairs",
    "solve_loss_equations",
]
