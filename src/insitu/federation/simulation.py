"""``insitu simulate``: one machine, every hospital in-process, the real round engine.

The sites and coordinator are the same classes a deployment runs; only the
transport differs (:class:`InProcessTransport` encodes every message exactly as
the wire would).  A run writes, atomically, a directory with ``summary.json``,
``rounds.jsonl``, ``accuracy.png``, the final model (``model.npz`` and
``task.json``), and compares the federated model with local-only and pooled
training on the same splits.
"""
from __future__ import annotations

import enum
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from insitu.compress import CompressionSpec, UpdateCompressor
from insitu.data.dataset import FederatedData
from insitu.data.partition import Partition, PartitionKind
from insitu.errors import ConfigError, RoundAborted
from insitu.federation.coordinator import Coordinator, RoundRecord
from insitu.federation.pipeline import SitePipeline
from insitu.federation.protocol import AggregationProtocol, PlainProtocol
from insitu.federation.site import Site
from insitu.federation.strategies import StrategyName, make_strategy
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport
from insitu.learn.baselines import local_only, pooled
from insitu.learn.models import build_model, get_flat


class DatasetName(str, enum.Enum):
    HEART = "heart"
    PNEUMONIAMNIST = "pneumoniamnist"
    MEDMNIST = "medmnist"  # any MedMNIST-format .npz


@dataclass(frozen=True)
class Defaults:
    model: str
    rounds: int
    local_steps: int
    lr: float
    batch_size: int
    optimizer: str
    partition: str
    sites: int
    lr_schedule: str = "constant"
    select: str = "last"
    augment: int = 0


DEFAULTS: dict[DatasetName, Defaults] = {
    DatasetName.HEART: Defaults("logreg", 30, 50, 0.01, 4, "sgd", "natural", 4),
    DatasetName.PNEUMONIAMNIST: Defaults("cnn", 40, 20, 0.001, 64, "adam", "dirichlet:0.5", 4, "constant", "last", 2),
    DatasetName.MEDMNIST: Defaults("cnn", 40, 20, 0.001, 64, "adam", "iid", 4, "constant", "last", 2),
}

#: server learning rates that work for the adaptive optimizers (Reddi et al. tune η on a grid).
SERVER_LR = {StrategyName.FEDADAM: 0.03, StrategyName.FEDYOGI: 0.03, StrategyName.FEDADAGRAD: 0.03}


def _cosine(rounds: int, floor: float = 0.1) -> Callable[[int], float]:
    """Site learning rate from 100% in round 1 down to ``floor`` in the last round."""
    import math

    return lambda r: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (r - 1) / max(1, rounds - 1)))


LR_SCHEDULES: dict[str, Callable[[int], Callable[[int], float] | None]] = {
    "constant": lambda rounds: None,
    "cosine": _cosine,
}


@dataclass(frozen=True)
class SimulationConfig:
    dataset: str = "heart"
    data: str | None = None
    sites: int | None = None
    partition: str | None = None
    strategy: str = "fedavg"
    rounds: int | None = None
    local_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    model: str | None = None
    mu: float = 0.01
    server_lr: float | None = None
    seed: int = 0
    min_sites: int = 1
    dropout: float = 0.0
    round_timeout: float = 600.0
    compress: str = "none"  # update compression: int8, topk:F, shared:F, topk:F+int8 (insitu.compress)
    secure_aggregation: bool = False  # pairwise-masked sums (insitu.secure.secagg)
    secagg_recovery: str = "server"  # who removes masks: server (Bonawitz) or survivors (one more upload each)
    homomorphic: str = "none"  # none, paillier or ckks (insitu.secure.he)
    # differential privacy (insitu.federation.dp): off, record (DP-SGD) or site (DP-FedAvg)
    dp: str = "off"
    epsilon: float | None = None  # target ε; noise is calibrated to it
    delta: float = 1e-5
    noise_multiplier: float | None = None  # instead of --epsilon
    clip: float | None = None
    dp_placement: str = "central"  # site-level noise: central or distributed
    adaptive_clip: bool = False
    site_budget: str | None = None  # "3" or "cleveland=1,default=3"; default: the target ε
    accountant: str = "pld"
    privacy_ledger: str | None = None  # SQLite ledger kept across runs (default: in the run directory)
    augment: int | None = None  # images: random shifts of up to N pixels during local training
    select: str | None = None  # final model: the last round's, or the best on the sites' validation splits
    lr_schedule: str | None = None  # constant or cosine (site lr decays to 10% over the rounds)
    normalize: str = "site"  # heart: z-score per site (FLamby) or with federated moments
    baselines: bool = True
    out: str | None = None

    def resolved(self) -> "SimulationConfig":
        """The config with dataset defaults filled in and every value checked."""
        try:
            ds = DatasetName(self.dataset)
        except ValueError:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {[d.value for d in DatasetName]}") from None
        d = DEFAULTS[ds]
        if self.dp != "off":
            from insitu.federation.dp import dp_defaults

            d = dp_defaults(ds.value, self.dp, d)  # DP-friendly batch/steps where the user set none
        try:
            strat = StrategyName(self.strategy)
        except ValueError:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {[s.value for s in StrategyName]}") from None
        cfg = replace(
            self,
            sites=self.sites if self.sites is not None else d.sites,
            partition=self.partition or d.partition,
            rounds=self.rounds if self.rounds is not None else d.rounds,
            local_steps=self.local_steps if self.local_steps is not None else d.local_steps,
            lr=self.lr if self.lr is not None else d.lr,
            batch_size=self.batch_size if self.batch_size is not None else d.batch_size,
            optimizer=self.optimizer or d.optimizer,
            model=self.model or d.model,
            lr_schedule=self.lr_schedule or d.lr_schedule,
            select=self.select or d.select,
            augment=self.augment if self.augment is not None else d.augment,
            server_lr=self.server_lr if self.server_lr is not None else SERVER_LR.get(strat, 1.0),
        )
        Partition.parse(cfg.partition)
        if cfg.select not in ("last", "best-val"):
            raise ConfigError(f"unknown --select {cfg.select!r}; choose last or best-val")
        if cfg.select == "best-val" and ds is DatasetName.HEART:
            raise ConfigError("--select best-val needs validation splits; the heart data has none (FLamby's splits are train/test)")
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown --lr-schedule {cfg.lr_schedule!r}; choose one of {sorted(LR_SCHEDULES)}")
        CompressionSpec.parse(cfg.compress)
        from insitu.secure import secure_protocol

        secure_protocol(cfg.secure_aggregation, cfg.homomorphic, cfg.secagg_recovery)  # validates the combination
        from insitu.federation.dp import settings_from

        settings_from(cfg)  # validates the DP options
        if cfg.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {cfg.rounds}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.min_sites < 1 or cfg.min_sites > cfg.sites:
            raise ConfigError(f"--min-sites {cfg.min_sites} must be between 1 and the number of sites ({cfg.sites})")
        if ds is not DatasetName.HEART and not cfg.data:
            raise ConfigError(f"dataset {ds.value} needs --data PATH to a MedMNIST .npz file")
        return cfg


def load_federated(cfg: SimulationConfig) -> FederatedData:
    from insitu.data.heart import heart_sites_from_indices, load_heart, load_heart_frame
    from insitu.data.medmnist import load_medmnist
    from insitu.data.partition import split_indices

    part = Partition.parse(cfg.partition)
    ds = DatasetName(cfg.dataset)
    if ds is DatasetName.HEART:
        if part.kind is PartitionKind.NATURAL:
            if cfg.sites != 4:
                raise ConfigError(f"the natural heart partition has 4 hospitals; --sites {cfg.sites} needs --partition iid or dirichlet:ALPHA")
            return load_heart(cfg.data, cfg.normalize)
        df = load_heart_frame(cfg.data)
        parts = split_indices(df["label"].to_numpy(), cfg.sites, part, np.random.default_rng(cfg.seed), min_per_site=4)
        return heart_sites_from_indices(df, parts, [f"hospital-{i + 1}" for i in range(cfg.sites)], cfg.normalize)
    return load_medmnist(cfg.data, cfg.sites, part, seed=cfg.seed, name=ds.value)


def make_task(cfg: SimulationConfig, data: FederatedData) -> TaskSpec:
    return TaskSpec(
        model=cfg.model, input_shape=data.input_shape, num_outputs=data.num_outputs, schema=data.schema,
        lr=cfg.lr, local_steps=cfg.local_steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
        extra={"augment_shift": cfg.augment} if cfg.augment else {},
    )


def build_protocol(cfg: SimulationConfig) -> AggregationProtocol:
    """The aggregation protocol asked for (plain unless a secure option is given)."""
    from insitu.secure import secure_protocol

    secure = secure_protocol(cfg.secure_aggregation, cfg.homomorphic, cfg.secagg_recovery)
    spec = CompressionSpec.parse(cfg.compress)
    if secure is not None:
        from insitu.compress.secure import compose_with_secure

        return compose_with_secure(secure, spec)  # shared:F masks only the shared subset; others refused
    return PlainProtocol(spec)


def build_pipeline(cfg: SimulationConfig, protocol: AggregationProtocol, site_id: str) -> SitePipeline:
    spec = CompressionSpec.parse(cfg.compress)
    stage = None if spec.is_identity else UpdateCompressor(spec, seed=int(_stable_uniform(cfg.seed, site_id, -1) * 2**32))
    return SitePipeline(compress=stage, protection=protocol.site_protection(site_id))


def _dropout_plan(cfg: SimulationConfig) -> Callable | None:
    if cfg.dropout <= 0:
        return None
    from insitu.federation.messages import MessageKind

    def fail(site: str, rnd: int, kind: MessageKind) -> bool:
        if kind is not MessageKind.TRAIN:
            return False
        return _stable_uniform(cfg.seed, site, rnd) < cfg.dropout

    return fail


def _stable_uniform(seed: int, site: str, rnd: int) -> float:
    import hashlib

    h = hashlib.sha256(f"{seed}/{site}/{rnd}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


@dataclass
class RunWriter:
    """Writes the run directory under a temporary name and renames it only when complete."""

    final: Path
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.final.exists():
            raise ConfigError(f"output directory {str(self.final)!r} already exists; choose another --out")
        self.tmp = self.final.with_name(self.final.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._rounds = (self.tmp / "rounds.jsonl").open("w")

    def round(self, rec: dict[str, Any]) -> None:
        self._rounds.write(json.dumps(rec, default=_jsonable) + "\n")
        self._rounds.flush()

    def finish(self) -> Path:
        self._rounds.close()
        self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        self._rounds.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, enum.Enum):
        return v.value
    raise TypeError(f"not JSON: {type(v)}")


def _site_accuracy(evals: dict[str, dict[str, Any]]) -> tuple[float, float]:
    accs = [e["accuracy"] for e in evals.values() if e["n"] > 0]
    correct = sum(e["correct"] for e in evals.values())
    n = sum(e["n"] for e in evals.values())
    return float(np.mean(accs)) if accs else float("nan"), correct / n if n else float("nan")


def default_out(cfg: SimulationConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.dataset}-{cfg.strategy}-s{cfg.seed}"


def simulate(config: SimulationConfig | None = None, *, progress: bool = False, write: bool = True, **options: Any) -> dict[str, Any]:
    """Run a federated simulation and return its summary (also written to ``summary.json``).

    ``simulate(dataset="heart", strategy="fedyogi", rounds=30)`` is the Python face of
    ``insitu simulate``; options are the fields of :class:`SimulationConfig`.
    """
    if config is None:
        config = SimulationConfig(**options)
    elif options:
        config = replace(config, **options)
    cfg = config.resolved()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if write and out.exists():
        raise ConfigError(f"output directory {str(out)!r} already exists; choose another --out")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    data = load_federated(cfg)
    if cfg.select == "best-val" and any(s.X_val is None or s.X_val.shape[0] == 0 for s in data.sites):
        raise ConfigError(f"--select best-val needs validation splits, and {cfg.data!r} has no val_images/val_labels; use --select last")
    task = make_task(cfg, data)
    protocol = build_protocol(cfg)
    from insitu.federation.dp import run_for_simulation

    dp = run_for_simulation(cfg, data)  # None unless --dp record|site
    if dp:
        protocol = dp.wrap_protocol(protocol)
    sites = {}
    for i, sd in enumerate(data.sites):
        sites[sd.name] = Site(sd.name, sd, task, pipeline=build_pipeline(cfg, protocol, sd.name), seed=cfg.seed * 1000 + i + 1)
        if dp:
            dp.configure_site(sites[sd.name])
    transport = InProcessTransport(sites, fail=_dropout_plan(cfg))
    strategy = make_strategy(cfg.strategy, **({"mu": cfg.mu} if cfg.strategy == "fedprox" else {}), server_lr=cfg.server_lr)
    init = get_flat(build_model(task.model, task.input_shape, task.num_outputs, seed=cfg.seed))
    coord = Coordinator(job=f"sim-{cfg.seed}", task=task, params=init, strategy=strategy, transport=transport,
                        protocol=protocol, min_sites=cfg.min_sites, timeout=cfg.round_timeout,
                        lr_schedule=LR_SCHEDULES[cfg.lr_schedule](cfg.rounds),
                        weighting=dp.weighting if dp else "samples")
    writer = RunWriter(out) if write else None
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        from insitu.report.progress import round_progress

        with round_progress(cfg.rounds, enabled=progress, label=f"{cfg.dataset} · {cfg.strategy}") as bar:
            best: tuple[float, int, np.ndarray] | None = None
            for r in range(1, cfg.rounds + 1):
                rec = _one_round(coord, r)
                if cfg.select == "best-val" and rec["status"] == "ok":
                    _, val_acc = _site_accuracy(coord.evaluate(r, split="val"))
                    rec["val_accuracy"] = val_acc
                    if best is None or val_acc > best[0]:
                        best = (val_acc, r, coord.params.copy())
                if dp:
                    rec.update(dp.round_summary(r))
                history.append(rec)
                if writer:
                    writer.round(rec)
                bar(rec)
        fed_time = time.perf_counter() - t0
        selected = cfg.rounds
        if best is not None:
            _, selected, coord.params = best  # the model the sites' validation data chose
        final_eval = coord.evaluate(cfg.rounds + 1)
        mean_acc, pooled_acc = _site_accuracy(final_eval)
        summary: dict[str, Any] = {
            "config": asdict(cfg),
            "task": task.to_meta(),
            "task_hash": task.content_hash(),
            "sites": {s.name: {"n_train": s.n_train, "n_test": s.n_test} for s in data.sites},
            "final": {
                "mean_site_accuracy": mean_acc,
                "pooled_accuracy": pooled_acc,
                "site_accuracy": {k: v["accuracy"] for k, v in final_eval.items()},
                "selected_round": selected,
                "rounds_completed": sum(1 for h in history if h["status"] == "ok"),
                "rounds_aborted": sum(1 for h in history if h["status"] == "aborted"),
                "bytes_up_per_round": float(np.mean([h["bytes_up_total"] for h in history])) if history else 0.0,
                "bytes_up_per_round_per_site": {
                    s.name: float(np.mean(v)) if (v := [h["sites"][s.name]["bytes_up"] for h in history if s.name in h["sites"] and h["sites"][s.name].get("bytes_up")]) else 0.0
                    for s in data.sites
                },
                "seconds": fed_time,
            },
        }
        if cfg.baselines:
            # same compute as the federation: each site its own steps, pooled all sites' steps
            site_steps = cfg.rounds * cfg.local_steps
            summary["baselines"] = {
                "local_only": local_only(data, task, site_steps, seed=cfg.seed),
                "pooled": pooled(data, task, site_steps * len(data.sites), seed=cfg.seed),
            }
        if dp:
            summary["final"].update(dp.final())
            if writer and not cfg.privacy_ledger:
                dp.ledger.export(writer.tmp / "privacy_ledger.sqlite")
        summary["wall_seconds"] = time.perf_counter() - t0
        if writer:
            from insitu.report.plots import accuracy_plot

            np.savez(writer.tmp / "model.npz", params=coord.params)
            (writer.tmp / "task.json").write_text(json.dumps(task.to_meta(), indent=2))
            accuracy_plot(history, writer.tmp / "accuracy.png", title=f"{cfg.dataset} · {cfg.strategy}")
            summary["run_dir"] = str(out)
            (writer.tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
            writer.finish()
        return summary
    except BaseException:
        if writer:
            writer.abort()
        raise


def _one_round(coord: Coordinator, r: int) -> dict[str, Any]:
    try:
        rec: RoundRecord = coord.run_round(r)
    except RoundAborted as exc:
        return {"round": r, "status": "aborted", "reason": str(exc), "bytes_up_total": 0, "sites": {}}
    evals = coord.evaluate(r)
    mean_acc, pooled_acc = _site_accuracy(evals)
    sites = {}
    for sid in sorted(set(evals) | set(rec.train) | set(rec.dropped)):
        entry: dict[str, Any] = {}
        if sid in rec.train:
            entry.update({k: v for k, v in rec.train[sid].items()})
        if sid in evals:
            entry.update({"test_loss": evals[sid]["loss"], "test_accuracy": evals[sid]["accuracy"]})
        if sid in rec.dropped:
            entry["dropped"] = rec.dropped[sid]
        entry["bytes_up"] = rec.bytes_up.get(sid, 0)
        entry["bytes_down"] = rec.bytes_down.get(sid, 0)
        sites[sid] = entry
    return {
        "round": r,
        "status": "ok",
        "participants": list(rec.participants),
        "dropped": dict(rec.dropped),
        "mean_site_accuracy": mean_acc,
        "pooled_accuracy": pooled_acc,
        "update_norm": rec.update_norm,
        "seconds": rec.seconds,
        "bytes_up_total": int(sum(rec.bytes_up.values())),
        "sites": sites,
    }
