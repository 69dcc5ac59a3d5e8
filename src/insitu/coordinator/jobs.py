"""A job: which task to train, with which strategy, for how many rounds, on which sites.

``job.toml`` uses the same names as ``insitu simulate`` so that a job tried in
simulation is deployed unchanged::

    name = "heart-fedavg"        # job id (unique on the coordinator)
    dataset = "heart"            # fills in the task from the dataset's schema and defaults
    strategy = "fedavg"
    rounds = 5
    seed = 0
    min_sites = 3
    round_timeout = 60.0
    sites = ["cleveland", "hungary", "switzerland", "va-long-beach"]   # optional
    protocol = "plain"

    [task]                       # optional; overrides (or, without `dataset`, defines) the task
    lr = 0.05
    local_steps = 50

    [dp]                         # optional: record-level DP-SGD at every site
    noise_multiplier = 1.1       # part of the task (and its hash): a site approves the noise
    clip = 1.0                   # per-record L2 clip

Each site computes its own ε from the noise multiplier and its own sampling rate and charges
its own privacy ledger before training; sites with a budget refuse non-DP tasks and rounds that
would pass their budget.

The coordinator never sends code: the job names a model from the model
registry and a data schema; each site checks the task's content hash
against what its admin approved.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from insitu.errors import ConfigError
from insitu.federation.strategies import Strategy, StrategyName, make_strategy
from insitu.federation.task import TaskSpec
from insitu.net.protocols import ProtocolName, make_protocol  # noqa: F401  (ProtocolName: the names a job may give)


@dataclass(frozen=True)
class JobSpec:
    name: str
    task: TaskSpec
    strategy: str = "fedavg"
    server_lr: float | None = None
    mu: float = 0.01
    rounds: int = 5
    seed: int = 0
    min_sites: int = 1
    round_timeout: float = 60.0
    sites: tuple[str, ...] | None = None
    protocol: str = ProtocolName.PLAIN.value
    protocol_options: Mapping[str, Any] = field(default_factory=dict)
    wait_for_sites: float = 60.0  # how long a round waits for min_sites to be connected
    max_aborted: int | None = None  # give up after this many aborted rounds (default: rounds)
    eval_every: int = 1

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64 or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"job name {self.name!r} must be 1-64 letters, digits, '-', '_' or '.'")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.min_sites < 1:
            raise ConfigError(f"min_sites must be at least 1, got {self.min_sites}")
        if not self.round_timeout > 0:
            raise ConfigError(f"round_timeout must be positive, got {self.round_timeout}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        make_protocol(self.protocol, self.protocol_options)
        self.make_strategy()
        from insitu.federation.dp import TaskDP

        TaskDP.of(self.task)  # a malformed DP request fails at submission, not at every site

    def make_strategy(self) -> Strategy:
        from insitu.federation.simulation import SERVER_LR

        try:
            strat = StrategyName(self.strategy)
        except ValueError:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {[s.value for s in StrategyName]}") from None
        lr = self.server_lr if self.server_lr is not None else SERVER_LR.get(strat, 1.0)
        return make_strategy(self.strategy, **({"mu": self.mu} if strat is StrategyName.FEDPROX else {}), server_lr=lr)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"] = self.task.to_meta()
        d["sites"] = list(self.sites) if self.sites is not None else None
        d["protocol_options"] = dict(self.protocol_options)
        return d

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "JobSpec":
        """Parse a job description (job.toml or its stored JSON); every field is checked."""
        raw = dict(raw)
        known = {f.name for f in fields(cls)} | {"dataset", "dp"}
        bad = set(raw) - known
        if bad:
            raise ConfigError(f"job description has unknown keys {sorted(bad)}; known keys are {sorted(known)}")
        task_raw = raw.pop("task", None)
        dataset = raw.pop("dataset", None)
        dp_raw = raw.pop("dp", None)
        task = _task(dataset, task_raw)
        if dp_raw is not None:
            task = _with_dp(task, dp_raw)
        if "sites" in raw and raw["sites"] is not None:
            raw["sites"] = tuple(str(s) for s in raw["sites"])
        if "name" not in raw:
            raise ConfigError("job description needs a name (e.g. name = \"heart-fedavg\")")
        try:
            return cls(task=task, **raw)
        except TypeError as exc:
            raise ConfigError(f"invalid job description: {exc}") from None


#: the heart task's feature names (FLamby order), as ``insitu.data.heart.FEATURES``.  Copied so that
#: the coordinator, which holds no data, need not import the data loaders (pandas, scikit-learn);
#: a test keeps the two equal.
HEART_SCHEMA = (
    "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)


def _with_dp(task: TaskSpec, dp: Any) -> TaskSpec:
    """Put a job's [dp] table into the task (so its content hash covers the noise) and check it."""
    from dataclasses import replace

    from insitu.federation.dp import TaskDP

    if not isinstance(dp, Mapping):
        raise ConfigError(f"[dp] must be a table (noise_multiplier, clip), got {dp!r}")
    unknown = set(dp) - {"level", "noise_multiplier", "clip"}
    if unknown:
        raise ConfigError(f"[dp] has unknown keys {sorted(unknown)}; known: level, noise_multiplier, clip")
    extra = {**dict(task.extra), "dp": dp.get("level", "record"), "noise_multiplier": dp.get("noise_multiplier"), "clip": dp.get("clip")}
    out = replace(task, extra=extra)
    TaskDP.of(out)
    return out


def _task(dataset: str | None, task_raw: Mapping[str, Any] | None) -> TaskSpec:
    """The task from a dataset's defaults (``dataset = "heart"``) and/or an explicit [task] table."""
    base: dict[str, Any] = {}
    if dataset is not None:
        from insitu.federation.simulation import DEFAULTS, DatasetName

        try:
            ds = DatasetName(dataset)
        except ValueError:
            raise ConfigError(f"unknown dataset {dataset!r}; choose one of {[d.value for d in DatasetName]}") from None
        if ds is not DatasetName.HEART:
            raise ConfigError(f"dataset {ds.value}: give the task explicitly in a [task] table (input_shape, num_outputs, schema)")
        d = DEFAULTS[ds]
        base = {"model": d.model, "input_shape": [len(HEART_SCHEMA)], "num_outputs": 1, "schema": list(HEART_SCHEMA),
                "lr": d.lr, "local_steps": d.local_steps, "batch_size": d.batch_size, "optimizer": d.optimizer}
    base.update(dict(task_raw or {}))
    if not base:
        raise ConfigError("job description needs `dataset = \"heart\"` or a [task] table")
    try:
        return TaskSpec(**base)
    except TypeError as exc:
        raise ConfigError(f"invalid [task] table: {exc}") from None


__all__ = ["JobSpec", "HEART_SCHEMA"]
