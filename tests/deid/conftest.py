"""PostgreSQL fixture: a real server from .ci/services.sh (INSITU_TEST_PG_URL).

Without the variable the PostgreSQL tests skip on a laptop, but FAIL under CI=true: there the
server must exist, and a silently skipped PostgreSQL path would pass CI without being tested.
"""
from __future__ import annotations

import os
import secrets

import pytest


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
