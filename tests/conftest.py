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


def with_target(model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``model(x)``, giving a rule that projects the target its target first (``y``, or class 0 for every
    example when the test has no labels: any target exercises the rule's signal)."""
    import falign

    if falign.uses_target(model):
        if y is None:
            batch = x.shape[0] if x.dim() > 1 else 1
            y = torch.zeros(batch, dtype=torch.long)
        falign.set_target(model, y)
    return model(x)
