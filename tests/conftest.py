from __future__ import annotations

import os
import secrets
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


# PostgreSQL: a real server from .ci/services.sh (INSITU_TEST_PG_URL).  Without the variable the
# PostgreSQL tests skip on a laptop, but FAIL under CI=true: there the server must exist, and a
# silently skipped PostgreSQL path would pass CI without being tested.
@pytest.fixture
def pg_url() -> str:
    url = os.environ.get("INSITU_TEST_PG_URL")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but INSITU_TEST_PG_URL is unset: .ci/services.sh must start PostgreSQL")
        pytest.skip("INSITU_TEST_PG_URL not set (run `source .ci/services.sh`)")
    return url


@pytest.fixture
def pg_prefix() -> str:
    """A fresh table-name prefix so tests sharing the database never see each other's tables."""
    return "t_" + secrets.token_hex(6)
