"""Plain full-batch SGD as a discretised gradient flow, for the conservation-law measurements."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import falign
from falign.diagnostics.law import LayerPair, conservation, drift, find_pairs


def loss_of(out: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Cross-entropy (``ce``) or square loss ``½‖out − target‖²`` averaged over examples (``mse``;
    integer labels become one-hot targets)."""
    if loss == "ce":
        return F.cross_entropy(out, y)
    target = y if y.dim() == out.dim() else F.one_hot(y, out.shape[-1]).to(out.dtype)
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def full_batch_loss(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    return loss_of(model(x), y, loss)


def sgd_flow(model: nn.Module, x: Tensor, y: Tensor, lr: float, horizon: float, *, loss: str = "ce",
             momentum: float = 0.0, backprop: bool = False, pairs: list[LayerPair] | None = None,
             record_every: int = 0) -> dict[str, Any]:
    """Train ``model`` by full-batch SGD with step ``lr`` for ``round(horizon / lr)`` steps (a fixed
    time horizon of the flow) and measure the conservation drift of every layer pair.

    ``backprop=True`` trains by backprop (every feedback function in backprop mode) while the layers
    keep their ``B``, so the FA quantity and backprop's balancedness can both be watched.

    Returns ``{"steps", "final_loss", "drift": {pair: drift dict}, "history": [...]}``.
    """
    if lr <= 0 or horizon <= 0:
        raise ValueError("lr and horizon must be positive")
    pairs = pairs if pairs is not None else find_pairs(model, x[:2])
    ref = conservation(pairs)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith("feedback_weight")],
                          lr=lr, momentum=momentum)
    train_step = falign.TrainStep(model, opt, backprop=backprop)
    steps = max(1, round(horizon / lr))
    history = []
    value = math.nan
    for step in range(steps):
        value = float(train_step(None, y, loss=lambda: full_batch_loss(model, x, y, loss)))
        if record_every and (step + 1) % record_every == 0:
            history.append({"step": step + 1, "loss": value,
                            "drift": {k: drift(q, ref[k]) for k, q in conservation(pairs).items()}})
    final = conservation(pairs)
    return {"steps": steps, "final_loss": value, "drift": {k: drift(q, ref[k]) for k, q in final.items()},
            "history": history}
