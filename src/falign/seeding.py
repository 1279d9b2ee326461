"""Seeds and random-number state, used by rules, data and training alike.

:func:`mix_seed` derives independent seeds from integers (a layer's feedback from the run's seed and the
layer's index; brsf's draw from the layer's seed and the step; a data split from the seed and a tag),
so every random choice in falign is a pure function of the seed it names.
"""

from __future__ import annotations

import operator
import random
from typing import Any

import numpy as np
import torch

MAX_SEED = 2**63 - 1
"""The largest seed (``torch.manual_seed`` refuses more than 64 bits, and falign mixes seeds in 63)."""


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` if it is an integer in ``[0, MAX_SEED]``; otherwise a ``ValueError`` / ``TypeError`` naming it
    (a float or a wider integer would silently alias another seed)."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)  # type: ignore[arg-type]  # int, numpy integers, ...; else TypeError
    except TypeError:
        raise TypeError(f"{what} must be an integer in [0, 2**63 - 1], got {seed!r} ({type(seed).__name__})") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{what} must be an integer in [0, 2**63 - 1] (what torch.manual_seed takes), got {seed}")
    return seed


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chained over the parts)."""
    z = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        z = (z + (int(p) & mask) + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
    return z & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' state (torch, numpy, python, CUDA) as tensors and plain data (checkpointable
    with ``weights_only=True``)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]  # the tuple form
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
