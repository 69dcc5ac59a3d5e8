"""Cross-device federation: many small clients (phones, wearables), a few sampled per round.

The cross-silo engine is reused as is: each device is a :class:`Site`, the
:class:`Coordinator` gets a new ``sites`` tuple every round (uniform sampling
without replacement, McMahan et al. 2017's ``C`` fraction), and the
in-process transport encodes every message, so bytes per device are the bytes a
phone would upload.  Devices that were sampled but do not answer (offline,
battery) are dropped by the transport like a failing hospital.

For a health-monitoring style task without shipping real personal data,
:func:`wearable_population` draws a *synthetic* population: each person has
their own resting baseline (heart rate, HRV, SpO2, skin temperature,
respiration, steps, sleep) and a few dozen daily windows labelled "needs
review" when the day deviates from their baseline the way an infection or
arrhythmia episode would.  It is a stand-in for a real wearable cohort; any
:class:`FederatedData` (e.g. PneumoniaMNIST split over 1,000 devices) runs too.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from insitu.compress.updates import CompressionSpec
from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import ConfigError, RoundAborted
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport

FEATURES = ("resting_hr", "hrv_rmssd", "spo2", "skin_temp", "resp_rate", "steps_k", "sleep_h", "age")


def wearable_population(devices: int = 1000, seed: int = 0, windows: tuple[int, int] = (20, 60), test_windows: int = 10) -> FederatedData:
    """A synthetic cohort of ``devices`` people (see module docstring); features z-scored with
    population constants, label prevalence about 20 % and different per person."""
    if devices < 2:
        raise ConfigError(f"a cross-device population needs at least 2 devices, got {devices}")
    rng = np.random.default_rng(seed)
    mean = np.array([62.0, 45.0, 97.5, 33.5, 14.0, 7.0, 7.2, 45.0])
    sd = np.array([8.0, 15.0, 1.2, 0.6, 2.0, 3.0, 1.0, 15.0])
    # an episode: heart rate and respiration up, HRV and SpO2 down, skin warmer, less activity
    episode = np.array([1.1, -1.0, -0.8, 0.9, 0.9, -0.6, -0.3, 0.0])
    sites = []
    for d in range(devices):
        base = mean + sd * rng.normal(0, 0.6, size=8)
        base[7] = rng.uniform(18, 85)
        risk = 1 / (1 + np.exp(-(base[7] - 55) / 10))  # older people have episodes more often
        n_tr = int(rng.integers(windows[0], windows[1] + 1))
        n = n_tr + test_windows
        y = (rng.random(n) < 0.08 + 0.25 * risk).astype(np.float32)
        noise = rng.normal(0, 0.7, size=(n, 8))
        x = base + sd * (noise + np.outer(y * rng.uniform(0.6, 1.6, size=n), episode))
        x[:, 7] = base[7]
        z = ((x - mean) / sd).astype(np.float32)
        X, Y = torch.from_numpy(z), torch.from_numpy(y)
        sites.append(SiteData(f"device-{d:04d}", X[:n_tr], Y[:n_tr], X[n_tr:], Y[n_tr:]))
    return FederatedData("wearables-synthetic", tuple(sites), (8,), 2, FEATURES, {"synthetic": True, "devices": devices})


@dataclass(frozen=True)
class CrossDeviceConfig:
    devices: int = 1000
    fraction: float = 0.05  # devices sampled per round
    rounds: int = 30
    compress: str = "none"
    model: str = "mlp"
    local_steps: int = 10
    lr: float = 0.1
    batch_size: int = 8
    server_lr: float = 1.0
    offline: float = 0.1  # probability that a sampled device does not answer
    min_devices: int = 1
    eval_devices: int = 200  # devices sampled once for federated evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.offline < 1:
            raise ConfigError(f"--offline must be in [0, 1), got {self.offline}")
        if self.rounds < 1 or self.devices < 2:
            raise ConfigError(f"need rounds >= 1 and devices >= 2, got {self.rounds} and {self.devices}")
        CompressionSpec.parse(self.compress)


def _offline(seed: int, fraction: float):
    def fail(site: str, rnd: int, kind) -> bool:
        h = hashlib.sha256(f"offline/{seed}/{site}/{rnd}/{kind.value}".encode()).digest()
        return int.from_bytes(h[:8], "little") / 2**64 < fraction

    return fail if fraction > 0 else None


def cross_device(config: CrossDeviceConfig = CrossDeviceConfig(), data: FederatedData | None = None) -> dict[str, Any]:
    """Run a cross-device federation in this process; returns a summary with per-round records."""
    cfg = config
    data = data if data is not None else wearable_population(cfg.devices, cfg.seed)
    if len(data.sites) < 2:
        raise ConfigError("cross-device mode needs at least 2 devices")
    from insitu.builder import build_coordinator, build_site, initial_params
    from insitu.plan import Plan, StrategySpec

    task = TaskSpec(model=cfg.model, input_shape=data.input_shape, num_outputs=data.num_outputs, schema=data.schema,
                    lr=cfg.lr, local_steps=cfg.local_steps, batch_size=cfg.batch_size)
    plan = Plan(task, StrategySpec(server_lr=cfg.server_lr), compression=cfg.compress, rounds=cfg.rounds, min_sites=cfg.min_devices)
    t0 = time.perf_counter()
    sites = {}
    for i, sd in enumerate(data.sites):
        sites[sd.name] = build_site(plan, sd.name, sd)
    setup_s = time.perf_counter() - t0
    names = sorted(sites)
    per_round = max(1, int(round(cfg.fraction * len(names))))
    rng = np.random.default_rng(cfg.seed)
    coord = build_coordinator(plan, f"xdev-{cfg.seed}", InProcessTransport(sites, fail=_offline(cfg.seed, cfg.offline)),
                              params=initial_params(plan, cfg.seed))
    eval_set = tuple(sorted(rng.choice(names, size=min(cfg.eval_devices, len(names)), replace=False)))
    history = []
    for r in range(1, cfg.rounds + 1):
        coord.sites = tuple(sorted(rng.choice(names, size=per_round, replace=False)))
        try:
            rec = coord.run_round(r)
        except RoundAborted as exc:
            history.append({"round": r, "status": "aborted", "reason": str(exc), "sampled": per_round})
            continue
        up = [rec.bytes_up[s] for s in rec.participants if s in rec.bytes_up]
        history.append({
            "round": r, "status": "ok", "sampled": per_round, "completed": len(rec.participants), "offline": len(rec.dropped),
            "bytes_up_per_device": float(np.mean(up)) if up else 0.0, "bytes_down_per_device": float(np.mean(list(rec.bytes_down.values()))),
            "seconds": rec.seconds,
        })
    coord.sites = eval_set
    evals = coord.evaluate(cfg.rounds + 1)
    correct, n = sum(e["correct"] for e in evals.values()), sum(e["n"] for e in evals.values())
    ok = [h for h in history if h["status"] == "ok"]
    return {
        "config": asdict(cfg),
        "data": {"name": data.name, "devices": len(data.sites), **{k: v for k, v in data.info.items() if isinstance(v, (int, float, str, bool))}},
        "task": task.to_meta(),
        "parameters": int(coord.params.shape[0]),
        "devices_per_round": per_round,
        "final": {
            "accuracy": correct / n if n else float("nan"),
            "eval_devices": len(evals),
            "eval_records": n,
            "rounds_completed": len(ok),
            "bytes_up_per_device_round": float(np.mean([h["bytes_up_per_device"] for h in ok])) if ok else 0.0,
            "bytes_down_per_device_round": float(np.mean([h["bytes_down_per_device"] for h in ok])) if ok else 0.0,
            "setup_seconds": setup_s,
            "seconds": time.perf_counter() - t0,
        },
        "rounds": history,
    }


__all__ = ["CrossDeviceConfig", "cross_device", "wearable_population", "FEATURES"]
