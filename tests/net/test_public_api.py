"""Every name a deployment module exports exists (an __all__ no test checks goes stale)."""
from __future__ import annotations

import importlib

import pytest

MODULES = [
    "insitu.net.pki", "insitu.net.channel", "insitu.net.client", "insitu.net.server",
    "insitu.net.sandbox", "insitu.coordinator.store", "insitu.coordinator.jobs", "insitu.coordinator.service",
    "insitu.site.policy", "insitu.site.node",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    mod = importlib.import_module(name)
    assert mod.__all__, name
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ lists missing names {missing}"
