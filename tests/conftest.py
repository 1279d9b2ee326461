from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


def make_upstream(y: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A fixed random upstream gradient g for an output y."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=y.dtype)
