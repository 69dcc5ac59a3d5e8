import pytest

from insitu.learn.train import single_thread


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Thousands of tiny steps: one torch thread is far faster than two on a shared 2-core box."""
    with single_thread():
        yield
