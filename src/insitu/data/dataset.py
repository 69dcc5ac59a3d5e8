"""What a site holds: its own train and test records, as tensors ready for training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SiteData:
    """One hospital's records as tensors: ``X_*`` float32 of shape (records, *input_shape), ``y_*`` one
    class index per record (0/1 for a binary task).  ``name`` is the site's identity in every
    message, ledger and report.  The test split is scored each round; the optional validation
    split serves ``--select best-val``."""

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    X_val: torch.Tensor | None = None  # a validation split, where the data has one (model selection)
    y_val: torch.Tensor | None = None

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.X_test.shape[0])


@dataclass(frozen=True)
class FederatedData:
    """One dataset split across sites, plus what a model needs to know about it."""

    name: str
    sites: tuple[SiteData, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    schema: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([s.X_train for s in self.sites]), torch.cat([s.y_train for s in self.sites])

    def pooled_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([s.X_test for s in self.sites]), torch.cat([s.y_test for s in self.sites])
