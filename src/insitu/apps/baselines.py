"""The two references every federated result is read against.

* local-only: each site trains alone on its own records, for as many steps as
  it takes part in federated training.  Reported on its own test split and,
  FLamby-style, averaged over every site's test split.
* pooled: one model trained on the union of all sites' training records (what
  you would get if data could leave the hospitals), for the same step budget.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from insitu.data.dataset import FederatedData
from insitu.federation.task import TaskSpec
from insitu.learn.train import evaluate, train_local


def _score(model, data: FederatedData, task: TaskSpec) -> dict[str, Any]:
    evals = {s.name: evaluate(model, s.X_test, s.y_test, num_outputs=task.num_outputs) for s in data.sites}
    correct = sum(e["correct"] for e in evals.values())
    n = sum(e["n"] for e in evals.values())
    return {
        "site_accuracy": {k: e["accuracy"] for k, e in evals.items()},
        "mean_site_accuracy": float(np.mean([e["accuracy"] for e in evals.values()])),
        "pooled_accuracy": correct / n,
    }


def local_only(data: FederatedData, task: TaskSpec, steps: int, seed: int = 0) -> dict[str, Any]:
    own: dict[str, float] = {}
    across: dict[str, float] = {}
    cfg = task.train_config()
    cfg = replace(cfg, steps=steps, prox_mu=0.0)  # the task's optimiser, augmentation and class weights
    for i, site in enumerate(data.sites):
        model = task.build_model(seed)
        gen = torch.Generator().manual_seed(seed * 7919 + i)
        train_local(model, site.X_train, site.y_train, cfg, gen, num_outputs=task.num_outputs, track_loss=False)
        sc = _score(model, data, task)
        own[site.name] = sc["site_accuracy"][site.name]
        across[site.name] = sc["mean_site_accuracy"]
    best = max(across, key=across.get)
    return {
        "site_accuracy": own,
        "mean_site_accuracy": float(np.mean(list(own.values()))),
        "pooled_accuracy": float(
            sum(own[s.name] * s.n_test for s in data.sites) / sum(s.n_test for s in data.sites)
        ),
        "mean_accuracy_across_sites": across,
        "best_site_model": best,
        "best_site_model_mean_accuracy": across[best],
    }


def pooled(data: FederatedData, task: TaskSpec, steps: int, seed: int = 0) -> dict[str, Any]:
    X, y = data.pooled_train()
    cfg = task.train_config()
    cfg = replace(cfg, steps=steps, prox_mu=0.0)  # the task's optimiser, augmentation and class weights
    model = task.build_model(seed)
    train_local(model, X, y, cfg, torch.Generator().manual_seed(seed * 104729 + 1), num_outputs=task.num_outputs, track_loss=False)
    return _score(model, data, task)
