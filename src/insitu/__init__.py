"""insitu: privacy-preserving federated learning between hospitals.

The public Python API is the short list in ``__all__``; everything else lives in subpackages and
may change.  Names load lazily, so ``import insitu`` (and ``insitu --help``) does not import torch.

Run a simulation, the Python face of ``insitu simulate``::

    import insitu
    summary = insitu.simulate(dataset="heart", strategy="fedprox", mu=0.01, rounds=30)

Bring one's own data: split it into sites (:class:`SiteData`: each hospital's train and test
tensors), wrap them in :class:`FederatedData`, and pass that as ``data``; every option of
``insitu simulate`` still applies (secure aggregation, DP, compression, …)::

    data = insitu.FederatedData("my-study", (site_a, site_b, site_c), input_shape=(13,), num_classes=2,
                                schema=("age", ...))
    summary = insitu.simulate(data=data, strategy="fedavg", rounds=20, secure_aggregation=True)

Or hold the round engine directly: a :class:`Plan` (what every site runs: :class:`TaskSpec`,
:class:`StrategySpec`, :class:`ProtectionSpec`, :class:`DPSpec`, …) and :func:`build_federation`
give the coordinator and the sites, in-process, built exactly as a deployment builds them.
Every error insitu raises on purpose is an :class:`insitu.errors.InsituError`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name → the module that defines it (imported on first use)
_LAZY: dict[str, str] = {
    "simulate": "insitu.apps.simulate",
    "SimulationConfig": "insitu.apps.simulate",
    "Plan": "insitu.plan",
    "StrategySpec": "insitu.plan",
    "ProtectionSpec": "insitu.plan",
    "DPSpec": "insitu.plan",
    "Protection": "insitu.plan",
    "TaskSpec": "insitu.federation.task",
    "StrategyName": "insitu.federation.strategies",
    "DPLevel": "insitu.federation.dp",
    "Placement": "insitu.federation.dp",
    "FederatedData": "insitu.data.dataset",
    "SiteData": "insitu.data.dataset",
    "build_federation": "insitu.builder",
    "build_site": "insitu.builder",
}

__all__ = ["__version__", "errors", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("insitu.errors")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'insitu' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
