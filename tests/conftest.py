from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``needs_fashion_mnist`` skip, with the reason, where Fashion-MNIST is not installed (or is
    hidden by an empty ``$FALIGN_FASHION_MNIST_DIR``); CI runs them after installing it."""
    from falign.data import DatasetMissing
    from falign.data.idx import FILES, _find, fashion_mnist_dir

    folder = fashion_mnist_dir()
    try:
        for stem in FILES.values():
            _find(folder, stem, "fashion-mnist")
    except DatasetMissing:
        skip = pytest.mark.skip(reason=f"Fashion-MNIST is not in {folder} (apt-get install -y dataset-fashion-mnist)")
        for item in items:
            if "needs_fashion_mnist" in item.keywords:
                item.add_marker(skip)


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
