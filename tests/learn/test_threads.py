"""One torch thread per training worker: the context manager simulate and sites use."""
from __future__ import annotations

import pytest
import torch

from insitu.errors import ConfigError
from insitu.learn.train import single_thread, torch_threads


def test_threads_set_inside_and_restored_after_even_on_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with single_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused_with_the_value(bad):
    with pytest.raises(ConfigError, match="positive integer, got"):
        with torch_threads(bad):
            pass
