"""A job: an ``insitu simulate`` configuration plus where and how long to run it.

``job.toml`` uses exactly the option names of ``insitu simulate`` (``--secure-aggregation`` is
``secure_aggregation = true``, ``--dp record`` is ``dp = "record"``), parsed into the same
:class:`~insitu.plan.Plan` by the same code, so a plan tried in simulation is deployed
unchanged and sites approve the same hash::

    name = "heart-fedprox"        # job id (free again once the job with this name ended)
    dataset = "heart"             # fills in the task from the dataset's schema and defaults
    strategy = "fedprox"
    mu = 0.1
    rounds = 5
    seed = 0                      # initial model (splits are each site's own)
    min_sites = 3
    secure_aggregation = true
    compress = "shared:0.1"
    dp = "site"                   # or "record"; with epsilon or noise_multiplier, clip, dp_placement, …
    epsilon = 3.0
    dp_placement = "distributed"
    # deployment only
    sites = ["cleveland", "hungary", "switzerland", "va-long-beach"]   # optional
    round_timeout = 60.0
    wait_for_sites = 60.0
    approval_timeout = 1800.0     # before round one, wait this long for the sites to approve the plan (0: do not wait)
    exclude_after = 3             # leave out a site named as the cause of this many aborted rounds or refused updates (0: never)

    [task]                        # needed for datasets other than heart: the data's shape
    input_shape = [1, 28, 28]
    num_outputs = 2
    schema = ["image"]

Your own model (instead of ``model = "cnn"``): ``model_spec = "my_model.json"`` (a path relative
to job.toml; ``insitu job submit`` and ``insitu job hash`` put the file's layers into the job, so
the coordinator never reads a file an operator names) or the layers inline::

    [model_spec]
    layers = [{type = "flatten"}, {type = "linear", out_features = 16}, {type = "relu"},
              {type = "linear", out_features = "outputs"}]

Options that only make sense on one machine (``data``, ``partition``, ``dropout``,
``site_budget``, …) are refused: in a deployment each site holds its own data and budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from insitu.errors import ConfigError
from insitu.plan import Plan

#: fields of a job that are not part of the plan
DEPLOYMENT_FIELDS = ("name", "sites", "round_timeout", "wait_for_sites", "max_aborted", "eval_every", "approval_timeout",
                     "exclude_after")
#: deployment fields that are plain settings of how the job runs (stored and re-read as given)
RUN_SETTINGS = DEPLOYMENT_FIELDS[2:]
#: simulate options that have no meaning in a deployment (the site owns them)
SIMULATE_ONLY = ("data", "partition", "dropout", "site_budget", "privacy_ledger", "baselines", "personalize", "personalize_lr", "personalize_mode", "out", "backend", "ray_address",
                 "insecure_replayable_randomness")
#: keys of the job format before the plan: what to write instead
RENAMED = {
    "protocol": 'secure_aggregation = true, or homomorphic = "paillier" / "ckks" (the names insitu simulate uses)',
    "protocol_options": 'secagg_recovery = "server" or "survivors"',
    "dp": None,  # a table in the old format; a string now
}
#: the heart task's feature names (FLamby order), as ``insitu.data.heart.FEATURES``.  Copied so that
#: the coordinator, which holds no data, need not import the data loaders; a test keeps the two equal.
HEART_SCHEMA = (
    "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)
MAX_TIMEOUT = 86_400.0
#: the most sites a job may name
MAX_SITES = 10_000


def inline_model_spec(job: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``job`` with a ``model_spec`` file path (relative to ``base``, job.toml's folder) replaced by the
    file's specification, so that the job sent to the coordinator carries the layers themselves."""
    job = dict(job)
    spec = job.get("model_spec")
    if isinstance(spec, str):
        from insitu.learn.spec import load_model_spec

        job["model_spec"] = load_model_spec(base / spec).to_meta()
    return job


def _seconds(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= MAX_TIMEOUT):
        raise ConfigError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {v!r}")
    return float(v)


def check_site_names(names: Any) -> None:
    """``sites`` is a list of distinct site names, each a certificate name (what a site's CN may be)."""
    from insitu.net.pki import NAME_RE

    if not isinstance(names, (list, tuple)) or not 1 <= len(names) <= MAX_SITES:
        raise ConfigError(f"sites must be a list of 1 to {MAX_SITES:,} site names, got {_short(names)}")
    for s in names:
        if not isinstance(s, str) or not NAME_RE.match(s):
            raise ConfigError(f"sites: {_short(s)} is not a site name (the CN of a site certificate: lower-case letters, "
                              "digits, '.' and '-', at most 63 characters)")
    seen: set[str] = set()
    dup = sorted({s for s in names if s in seen or seen.add(s)})
    if dup:
        raise ConfigError(f"sites lists {_short(dup)} more than once")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class JobSpec:
    """A parsed job: its plan (what sites approve), the initial-model seed and deployment fields."""

    name: str
    plan: Plan
    seed: int
    config: Mapping[str, Any]  # the job's plan options as given (what to_dict stores)
    sites: tuple[str, ...] | None = None
    round_timeout: float = 60.0
    wait_for_sites: float = 60.0  # how long a round waits for min_sites to be connected
    max_aborted: int | None = None  # give up after this many aborted rounds (default: rounds)
    eval_every: int = 1
    approval_timeout: float = 1800.0  # before round one, wait for the sites' approvals (insitu.coordinator.onboarding)
    exclude_after: int = 3  # a site named as the cause of this many aborted rounds or refused updates is left out of later rounds (0: never)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 64 or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"job name {self.name!r} must be 1-64 letters, digits, '-', '_' or '.'")
        object.__setattr__(self, "round_timeout", _seconds("round_timeout", self.round_timeout))
        object.__setattr__(self, "wait_for_sites", _seconds("wait_for_sites", self.wait_for_sites))
        if self.approval_timeout != 0:  # 0: do not wait for approvals
            object.__setattr__(self, "approval_timeout", _seconds("approval_timeout", self.approval_timeout))
        for k in ("max_aborted", "eval_every", "exclude_after"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1_000_000):
                raise ConfigError(f"{k} must be an integer from 0 to 1,000,000, got {v!r}")
        if self.sites is not None:
            if not self.sites or len(set(self.sites)) != len(self.sites) or not all(isinstance(s, str) and s for s in self.sites):
                raise ConfigError(f"sites must be a list of distinct site names, got {list(self.sites)!r}")
            if self.plan.min_sites > len(self.sites):
                raise ConfigError(f"min_sites = {self.plan.min_sites} but the job names only {len(self.sites)} site(s)")

    @property
    def rounds(self) -> int:
        return self.plan.rounds

    @property
    def min_sites(self) -> int:
        return self.plan.min_sites

    @property
    def task(self):  # the model/data part of the plan
        return self.plan.task

    def to_dict(self) -> dict[str, Any]:
        """The job description as given (re-parsed by :meth:`from_dict` when the job runs)."""
        d: dict[str, Any] = {"name": self.name, **dict(self.config)}
        d["sites"] = list(self.sites) if self.sites is not None else None
        for k in RUN_SETTINGS:
            d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "JobSpec":
        """Parse a job description (job.toml or its stored JSON); every field is checked."""
        from insitu.apps.simulate import DatasetName, SimulationConfig
        from insitu.errors import parse_choice

        if not isinstance(raw, Mapping):
            raise ConfigError(f"a job description is a table of options, got {type(raw).__name__}")
        raw = dict(raw)
        if "name" not in raw:
            raise ConfigError("job description needs a name (e.g. name = \"heart-fedavg\")")
        for old, new in RENAMED.items():
            if old in raw and (old != "dp" or isinstance(raw[old], Mapping)):
                hint = new or 'dp = "record" or "site" with noise_multiplier / epsilon and clip as top-level keys'
                raise ConfigError(f"job key {old!r} is gone; write {hint}")
        simulate_fields = {f.name for f in fields(SimulationConfig)}
        plan_keys = simulate_fields - set(SIMULATE_ONLY) - {"sites", "round_timeout"}
        known = plan_keys | set(DEPLOYMENT_FIELDS) | {"task"}
        unknown = sorted(set(raw) - known)
        if unknown:
            local = sorted(set(unknown) & set(SIMULATE_ONLY))
            if local:
                raise ConfigError(f"job keys {local} apply to insitu simulate only; in a deployment each site holds its own data and budget")
            raise ConfigError(f"job description has unknown keys {unknown}; known keys are {sorted(known)}")
        config = {k: raw[k] for k in sorted(plan_keys) if k in raw and raw[k] is not None}
        if isinstance(config.get("model_spec"), str):
            raise ConfigError(f"model_spec = {_short(config['model_spec'])}: a job carries the specification itself "
                              "(a [model_spec] table with layers = [...]); `insitu job submit job.toml` reads a file path "
                              "given in job.toml for you")
        task = raw.get("task")
        if task is not None:
            if not isinstance(task, Mapping) or set(task) - {"input_shape", "num_outputs", "schema"}:
                raise ConfigError("[task] gives the data's shape only: input_shape, num_outputs, schema "
                                  "(training options are top-level keys, named as in insitu simulate)")
            config["task"] = dict(task)
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"seed must be an integer from 0 to 2^63-1, got {seed!r}")
        names = raw.get("sites")
        if names is not None:
            check_site_names(names)
        sim = {k: v for k, v in config.items() if k != "task"}
        dataset = parse_choice(DatasetName, sim.get("dataset", "heart"), "dataset")
        try:
            cfg = SimulationConfig(**sim, sites=len(names) if names else max(int(sim.get("min_sites", 1)), 4 if dataset is DatasetName.HEART else 1))
            cfg = cfg.resolved(need_data=False)
        except TypeError as exc:
            raise ConfigError(f"invalid job description: {exc}") from None
        if task is not None:
            shape = (task.get("input_shape"), task.get("num_outputs"), task.get("schema"))
        elif dataset is DatasetName.HEART:
            shape = ((len(HEART_SCHEMA),), 1, HEART_SCHEMA)
        elif dataset is DatasetName.PHYSIONET2012:  # 48 hourly bins of 44 variables (sites: [data] source = "physionet2012")
            from insitu.data.physionet import task_shape

            shape = task_shape()
        else:
            raise ConfigError(f"dataset {dataset.value}: give the data's shape in a [task] table (input_shape, num_outputs, schema)")
        if not isinstance(shape[0], (list, tuple)) or not isinstance(shape[2], (list, tuple)):
            raise ConfigError("[task] input_shape and schema must be lists")
        plan = cfg.plan_for(tuple(shape[0]), shape[1], tuple(shape[2]))
        if cfg.model_spec is not None:
            config["model_spec"] = cfg.model_spec  # stored canonical, as the plan carries it
        return cls(name=raw["name"], plan=plan, seed=seed, config=config,
                   sites=tuple(names) if names is not None else None,
                   **{k: raw[k] for k in RUN_SETTINGS if k in raw})


__all__ = ["JobSpec", "HEART_SCHEMA", "DEPLOYMENT_FIELDS", "inline_model_spec"]
