"""Splitting one dataset across N simulated hospitals.

``iid``: a uniform random split.  ``dirichlet:ALPHA``: label skew after Hsu et
al. 2019 — each class is spread over the sites with proportions drawn from
Dir(α); small α gives sites dominated by one class.  ``natural``: the real
hospitals (heart only).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from insitu.errors import ConfigError, parse_choice


class PartitionKind(str, enum.Enum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    NATURAL = "natural"


@dataclass(frozen=True)
class Partition:
    kind: PartitionKind
    alpha: float | None = None

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind is PartitionKind.DIRICHLET else self.kind.value

    @classmethod
    def parse(cls, text: str) -> "Partition":
        name, _, arg = text.partition(":")
        kind = parse_choice(PartitionKind, name.strip().lower(), f"partition {text!r}",
                            choices="iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or natural")
        if kind is PartitionKind.DIRICHLET:
            try:
                alpha = float(arg)
            except ValueError:
                raise ConfigError(f"partition {text!r} needs a number after 'dirichlet:', e.g. dirichlet:0.5") from None
            if not (alpha > 0 and np.isfinite(alpha)):
                raise ConfigError(f"Dirichlet alpha must be positive, got {alpha}")
            return cls(kind, alpha)
        if arg:
            raise ConfigError(f"partition {name!r} takes no argument, got {text!r}")
        return cls(kind)


def split_indices(labels: np.ndarray, n_sites: int, partition: Partition, rng: np.random.Generator, min_per_site: int = 2) -> list[np.ndarray]:
    """Indices of each site's records.  Every site gets at least ``min_per_site`` records."""
    n = len(labels)
    if n_sites < 1:
        raise ConfigError(f"--sites must be at least 1, got {n_sites}")
    if n_sites * min_per_site > n:
        raise ConfigError(f"--sites {n_sites} is more than {n} records can supply ({min_per_site} per site at least)")
    if partition.kind is PartitionKind.IID:
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_sites)]
    if partition.kind is PartitionKind.NATURAL:
        raise ConfigError("the natural partition exists only for the heart dataset's four hospitals")
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_sites, partition.alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_site:
            return [np.sort(np.array(p, dtype=int)) for p in parts]
    raise ConfigError(f"could not draw a dirichlet:{partition.alpha} split giving every one of {n_sites} sites {min_per_site} records; raise alpha or lower --sites")
