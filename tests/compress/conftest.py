import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core box run ~10x faster single-threaded (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
