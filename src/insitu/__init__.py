"""insitu: privacy-preserving federated learning between hospitals.

The public namespace is small on purpose; everything else lives in subpackages.
Heavy imports (torch) happen only when a name that needs them is first used.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["simulate", "SimulationConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("simulate", "SimulationConfig"):
        from insitu.apps import simulate as simulation

        return getattr(simulation, name)
    raise AttributeError(f"module 'insitu' has no attribute {name!r}")
