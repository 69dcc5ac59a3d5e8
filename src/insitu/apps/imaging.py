"""Imaging figures a simulation can give because it holds every site's test split in one process.

* :func:`all_records_auc`: AUROC of the global model over every test record (MedMNIST reports ACC
  and AUC on the whole official test set).  A deployment cannot compute it without collecting
  scores from the sites; there each site's own AUROC travels in its evaluation answer instead
  (:mod:`insitu.federation.evaluation`).
* :func:`pooled_selected`: the centralised reference for an imaging recipe: one model trained on
  the union of the sites' training images with the task's own local-training settings
  (optimiser, augmentation, class weights), as many steps as the federation trained in all, its
  checkpoints ranked on the union of the validation splits by the same criterion the federated
  run used, and the chosen checkpoint scored on the test splits once.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from insitu.data.dataset import FederatedData
from insitu.federation.evaluation import Criterion, score, summarize
from insitu.learn.clinical import model_of, risk_scores
from insitu.learn.metrics import auroc
from insitu.learn.models import get_flat
from insitu.learn.train import evaluate, train_local


def all_records_auc(task: Any, params: np.ndarray, data: FederatedData) -> float:
    """AUROC of ``params`` over the union of the sites' test splits (binary tasks; NaN otherwise)."""
    if data.num_outputs != 1:
        return math.nan
    model = model_of(task, params)
    y = np.concatenate([s.y_test.numpy().astype(int) for s in data.sites])
    s = np.concatenate([risk_scores(model, site.X_test) for site in data.sites])
    return auroc(y, s)


def _answers(model: torch.nn.Module, data: FederatedData, split: str, num_outputs: int) -> dict[str, dict[str, Any]]:
    """What each site would answer about ``model`` on ``split`` (the same function sites run)."""
    out = {}
    for s in data.sites:
        X, y = (s.X_val, s.y_val) if split == "val" else (s.X_test, s.y_test)
        out[s.name] = evaluate(model, X, y, num_outputs=num_outputs, by_class=True)
    return out


def pooled_selected(data: FederatedData, task: Any, *, rounds: int, steps_per_round: int, criterion: Criterion | None,
                    seed: int = 0) -> dict[str, Any]:
    """Pooled training with the task's settings, ``rounds`` checkpoints of ``steps_per_round`` steps
    each, the best checkpoint on validation by ``criterion`` (None: the last), scored on test once."""
    X, y = data.pooled_train()
    cfg = replace(task.train_config(), steps=steps_per_round, prox_mu=0.0)
    model = task.build_model(seed)
    gen = torch.Generator().manual_seed(seed * 104729 + 1)
    best: tuple[float, int, np.ndarray] | None = None
    for r in range(1, rounds + 1):
        train_local(model, X, y, cfg, gen, num_outputs=task.num_outputs)  # Adam/momentum restart per chunk, as at a site
        if criterion is not None:
            val = score(_answers(model, data, "val", task.num_outputs), criterion)
            if best is None or val > best[0]:
                best = (val, r, get_flat(model).copy())
    params = best[2] if best is not None else get_flat(model)
    final = model_of(task, params)
    figures = summarize(_answers(final, data, "test", task.num_outputs))
    figures["all_records_auc"] = all_records_auc(task, params, data)
    figures["selected_round"] = best[1] if best is not None else rounds
    figures["validation_score"] = best[0] if best is not None else None  # what chose the checkpoint
    figures["steps"] = rounds * steps_per_round
    return figures


__all__ = ["all_records_auc", "pooled_selected"]
