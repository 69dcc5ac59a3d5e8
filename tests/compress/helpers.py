"""A small synthetic federation for compression tests: real Sites, Coordinator and transport."""
from __future__ import annotations

import numpy as np
import torch

from insitu.builder import build_federation
from insitu.compress import CompressionSpec
from insitu.data.dataset import SiteData
from insitu.federation.coordinator import Coordinator
from insitu.federation.site import Site
from insitu.federation.task import TaskSpec
from insitu.plan import Plan

DIM = 400


def synthetic_sites(n_sites: int = 3, n: int = 120, seed: int = 0) -> list[SiteData]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=DIM)
    out = []
    for i in range(n_sites):
        X = rng.normal(size=(n, DIM)).astype(np.float32)
        y = (X @ w + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        out.append(SiteData(f"site-{i}", Xt[:100], yt[:100], Xt[100:], yt[100:]))
    return out


def federation(spec: CompressionSpec, *, n_sites: int = 3, model: str = "mlp", seed: int = 0) -> tuple[Coordinator, dict[str, Site]]:
    task = TaskSpec(model=model, input_shape=(DIM,), num_outputs=1, schema=tuple(f"f{i}" for i in range(DIM)), lr=0.05, local_steps=5, batch_size=16)
    plan = Plan(task, compression=str(spec))
    secrets = {f"site-{i}": bytes([i + 1]) * 32 for i in range(n_sites)}
    return build_federation(plan, synthetic_sites(n_sites, seed=seed), seed=seed, job="job-test", secrets=secrets)
