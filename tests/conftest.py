from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    path = SHARED / "pneumoniamnist.npz"
    if not path.exists():
        pytest.skip(f"{path} not present (shared test data lives beside the repository)")
    return path
