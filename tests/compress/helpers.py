"""A small synthetic federation for compression tests: real Sites, Coordinator and transport."""
from __future__ import annotations

import numpy as np
import torch

from insitu.compress import CompressionSpec, UpdateCompressor
from insitu.data.dataset import SiteData
from insitu.federation.coordinator import Coordinator
from insitu.federation.pipeline import SitePipeline
from insitu.federation.protocol import PlainProtocol
from insitu.federation.site import Site
from insitu.federation.strategies import Strategy
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport
from insitu.learn.models import build_model, get_flat

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
    protocol = PlainProtocol(spec)
    sites = {}
    for i, sd in enumerate(synthetic_sites(n_sites, seed=seed)):
        stage = None if spec.is_identity else UpdateCompressor(spec, seed=i + 1)
        sites[sd.name] = Site(sd.name, sd, task, pipeline=SitePipeline(compress=stage, protection=protocol.site_protection(sd.name)), seed=i + 1)
    init = get_flat(build_model(model, (DIM,), 1, seed=seed))
    coord = Coordinator(job="job-test", task=task, params=init, strategy=Strategy(), transport=InProcessTransport(sites), protocol=protocol)
    return coord, sites
