"""Fixtures of the gateway tests (helpers live in support.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from .support import Harness, make_harness


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """One gateway for a whole module, for tests whose outcome does not depend on earlier requests."""
    return make_harness(tmp_path_factory.mktemp("gw"))
