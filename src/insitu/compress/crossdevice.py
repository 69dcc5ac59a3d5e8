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

Devices exist only while they are asked something: a device's records (drawn from its own seed,
so any device can be drawn alone), its :class:`Site` and model are made when it is sampled and
dropped after it answers, so memory grows with the sample, not the population (1,000,000 devices
on one machine).  Only what a phone would keep between rounds stays: the error-feedback residual
of a ``topk`` compressor, for the devices that have taken part.
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


_MEAN = np.array([62.0, 45.0, 97.5, 33.5, 14.0, 7.0, 7.2, 45.0])
_SD = np.array([8.0, 15.0, 1.2, 0.6, 2.0, 3.0, 1.0, 15.0])
# an episode: heart rate and respiration up, HRV and SpO2 down, skin warmer, less activity
_EPISODE = np.array([1.1, -1.0, -0.8, 0.9, 0.9, -0.6, -0.3, 0.0])


class WearablePopulation:
    """The synthetic cohort of :func:`wearable_population`, drawn one device at a time.

    Device ``d`` is drawn from its own seed (``seed``, ``d``), so any device can be made alone and
    made again identically; nothing is held.  Names are zero-padded so that name order is index order.
    """

    def __init__(self, devices: int, seed: int = 0, windows: tuple[int, int] = (20, 60), test_windows: int = 10):
        if devices < 2:
            raise ConfigError(f"a cross-device population needs at least 2 devices, got {devices}")
        self.devices, self.seed, self.windows, self.test_windows = int(devices), int(seed), windows, test_windows
        self._width = max(4, len(str(self.devices - 1)))

    def __len__(self) -> int:
        return self.devices

    def name(self, d: int) -> str:
        return f"device-{d:0{self._width}d}"

    def index(self, name: str) -> int:
        """The device a name stands for; a name not of this population is refused."""
        head, _, num = name.rpartition("-")
        if head != "device" or len(num) != self._width or not num.isdigit() or not 0 <= int(num) < self.devices:
            raise ConfigError(f"{name!r} is not a device of this population of {self.devices}")
        return int(num)

    def __getitem__(self, d: int) -> SiteData:
        rng = np.random.default_rng([self.seed, d])
        base = _MEAN + _SD * rng.normal(0, 0.6, size=8)
        base[7] = rng.uniform(18, 85)
        risk = 1 / (1 + np.exp(-(base[7] - 55) / 10))  # older people have episodes more often
        n_tr = int(rng.integers(self.windows[0], self.windows[1] + 1))
        n = n_tr + self.test_windows
        y = (rng.random(n) < 0.08 + 0.25 * risk).astype(np.float32)
        noise = rng.normal(0, 0.7, size=(n, 8))
        x = base + _SD * (noise + np.outer(y * rng.uniform(0.6, 1.6, size=n), _EPISODE))
        x[:, 7] = base[7]
        z = ((x - _MEAN) / _SD).astype(np.float32)
        X, Y = torch.from_numpy(z), torch.from_numpy(y)
        return SiteData(self.name(d), X[:n_tr], Y[:n_tr], X[n_tr:], Y[n_tr:])

    def info(self) -> dict[str, Any]:
        return {"synthetic": True, "devices": self.devices}


def wearable_population(devices: int = 1000, seed: int = 0, windows: tuple[int, int] = (20, 60), test_windows: int = 10) -> FederatedData:
    """A synthetic cohort of ``devices`` people (see module docstring), every device drawn now;
    features z-scored with population constants, label prevalence about 20 % and different per
    person.  :func:`cross_device` draws the same devices only when it samples them."""
    pop = WearablePopulation(devices, seed, windows, test_windows)
    return FederatedData("wearables-synthetic", tuple(pop[d] for d in range(devices)), (8,), 2, FEATURES, pop.info())


class _GivenDevices:
    """A :class:`FederatedData` whose sites are already in memory, seen as a population."""

    def __init__(self, data: FederatedData):
        self.data = data
        self._index = {s.name: i for i, s in enumerate(data.sites)}
        self._names = sorted(self._index)
        self._position = {n: d for d, n in enumerate(self._names)}

    def __len__(self) -> int:
        return len(self._names)

    def name(self, d: int) -> str:
        return self._names[d]

    def index(self, name: str) -> int:
        return self._position.get(name, -1)

    def __getitem__(self, d: int) -> SiteData:
        return self.data.sites[self._index[self._names[d]]]


class _Devices:
    """Makes a device's :class:`Site` (through the one site builder) when it is asked something;
    keeps only the error-feedback residuals a phone would keep between rounds."""

    def __init__(self, population: Any, plan: Any, secrets: Any = None):
        self.population, self.plan = population, plan
        self.secrets = secrets  # name -> secret (exact-equality tests); None: fresh from the OS each time
        self._kept: dict[int, Any] = {}  # devices whose compressor carries a residual
        self.made = 0

    def site(self, name: str, round_: int, secret: bytes | None = None) -> Any:
        """The device ``name``, made now; ``secret`` as handed over by a Ray driver, else its own."""
        from insitu.builder import build_site

        d = self.population.index(name)
        if d < 0:
            raise ConfigError(f"unknown device {name!r}")
        if secret is None and self.secrets is not None:
            secret = self.secrets(name)
        site = build_site(self.plan, name, self.population[d], secret=secret)
        stage = site.pipeline.compress
        if stage is not None and stage.uses_feedback:
            site.pipeline.compress = self._kept.setdefault(d, stage)  # the residual this device kept
        self.made += 1
        return site


class _OnDemandTransport:
    """The in-process transport over devices made per message (every message still encoded and
    decoded as on the wire), so only the device answering exists at any time."""

    def __init__(self, devices: _Devices, fail: Any = None):
        self.devices, self.fail = devices, fail

    def sites(self) -> list[str]:
        pop = self.devices.population
        return [pop.name(d) for d in range(len(pop))]

    def exchange(self, requests, timeout):
        from insitu.federation.transport import Exchange

        replies, dropped, sent, recv, refused = {}, {}, {}, {}, {}
        for sid, req in requests.items():
            try:
                site = self.devices.site(sid, req.round)
            except ConfigError as exc:
                dropped[sid] = str(exc)
                continue
            ex = InProcessTransport({sid: site}, fail=self.fail).exchange({sid: req}, timeout)
            replies.update(ex.replies)
            dropped.update(ex.dropped)
            sent.update(ex.bytes_sent)
            recv.update(ex.bytes_received)
            refused.update(ex.refused)
        return Exchange(replies, dropped, sent, recv, refused)


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
    backend: str = "in-process"  # or ray: devices made in Ray workers (insitu.apps.raybackend)
    ray_address: str | None = None  # --backend ray: join this cluster (default: a private local Ray on 127.0.0.1)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.offline < 1:
            raise ConfigError(f"--offline must be in [0, 1), got {self.offline}")
        if self.rounds < 1 or self.devices < 2:
            raise ConfigError(f"need rounds >= 1 and devices >= 2, got {self.rounds} and {self.devices}")
        CompressionSpec.parse(self.compress)
        from insitu.apps.raybackend import check_backend

        check_backend(self.backend, self.ray_address)


def _offline(seed: int, fraction: float):
    def fail(site: str, rnd: int, kind) -> bool:
        h = hashlib.sha256(f"offline/{seed}/{site}/{rnd}/{kind.value}".encode()).digest()
        return int.from_bytes(h[:8], "little") / 2**64 < fraction

    return fail if fraction > 0 else None


def cross_device(config: CrossDeviceConfig = CrossDeviceConfig(), data: FederatedData | None = None, *,
                 device_secrets: Any = None) -> dict[str, Any]:
    """Run a cross-device federation (in this process, or with ``backend="ray"`` in Ray workers);
    returns a summary with per-round records.  ``device_secrets(name)`` fixes each device's secret
    (tests comparing two backends exactly); by default every device gets a fresh one when made."""
    if config.backend == "ray":
        from insitu.apps.raybackend import ray_session

        with ray_session(config.ray_address):
            return _cross_device(config, data, device_secrets)
    return _cross_device(config, data, device_secrets)


def _cross_device(config: CrossDeviceConfig, data: FederatedData | None, device_secrets: Any) -> dict[str, Any]:
    cfg = config
    t0 = time.perf_counter()
    if data is None:
        population: Any = WearablePopulation(cfg.devices, cfg.seed)
        name, info = "wearables-synthetic", population.info()
        input_shape, num_outputs, schema = (8,), 1, FEATURES
    else:
        population = _GivenDevices(data)
        name, info = data.name, data.info
        input_shape, num_outputs, schema = data.input_shape, data.num_outputs, data.schema
    if len(population) < 2:
        raise ConfigError("cross-device mode needs at least 2 devices")
    from insitu.builder import build_coordinator, initial_params
    from insitu.plan import Plan, StrategySpec

    CompressionSpec.parse(cfg.compress)
    task = TaskSpec(model=cfg.model, input_shape=input_shape, num_outputs=num_outputs, schema=schema,
                    lr=cfg.lr, local_steps=cfg.local_steps, batch_size=cfg.batch_size)
    plan = Plan(task, StrategySpec(server_lr=cfg.server_lr), compression=cfg.compress, rounds=cfg.rounds, min_sites=cfg.min_devices)
    devices = _Devices(population, plan, device_secrets)
    if cfg.backend == "ray":
        from insitu.apps.raybackend import device_transport

        transport: Any = device_transport(population, plan, fail=_offline(cfg.seed, cfg.offline), secrets=device_secrets)
        devices = transport  # counts the devices it made
    else:
        transport = _OnDemandTransport(devices, fail=_offline(cfg.seed, cfg.offline))
    n_devices = len(population)
    per_round = max(1, int(round(cfg.fraction * n_devices)))
    rng = np.random.default_rng(cfg.seed)
    # a device is made afresh for each message it answers: it never holds the plan, so the plan goes whole
    coord = build_coordinator(plan, f"xdev-{cfg.seed}", transport, params=initial_params(plan, cfg.seed), plan_by_hash=False)

    def sample(k: int) -> tuple[str, ...]:  # indices in name order: the draw rng.choice(names) made
        return tuple(population.name(int(d)) for d in np.sort(rng.choice(n_devices, size=k, replace=False)))

    eval_set = sample(min(cfg.eval_devices, n_devices))
    setup_s = time.perf_counter() - t0
    history = []
    for r in range(1, cfg.rounds + 1):
        coord.sites = sample(per_round)
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
        "data": {"name": name, "devices": n_devices, **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}},
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
            "devices_made": devices.made,  # Site objects created: one per device asked (train or evaluate)
            "seconds": time.perf_counter() - t0,
        },
        "rounds": history,
    }


__all__ = ["CrossDeviceConfig", "cross_device", "wearable_population", "WearablePopulation", "FEATURES"]
