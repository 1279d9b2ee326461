"""Scale stability: weight, activation and logit scales over training, and the runaway they reveal.

A rule can train into a *runaway*: the weights grow geometrically toward the output, the logits reach
astronomical values (LeNet under dfa at lr 0.01: median ``|logit|`` 1e19 after one epoch, train loss 2.6e17),
and yet the test accuracy rises, because ``argmax`` ignores scale. Angles and the conservation law read normally
in such a run. :class:`ScaleMonitor` records, every ``k`` steps, the loss, the *logit scale* (median ``|z|`` over
the batch's outputs), each layer's weight norm ``‖W_l‖_F`` and the RMS of its output; :func:`find_runaway` reads
those records and flags the runaway with the step it began (Hao, Wan & Zhai, arXiv 2606.21126, name scale growth
among FA's silent failure modes).

The thresholds are on the logit scale of a classifier trained with cross-entropy, which a converging model keeps
at a few units to a few tens (its loss is already ~0 for ``|z|`` ≈ 20): *flagged* once the logit scale exceeds
``flag_at`` (1e3) or the loss exceeds ``loss_factor × ln C`` (10× chance), or either is not finite; the runaway
*began* at the first record of the uninterrupted stretch above ``onset`` (100) that leads to the flag.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

FLAG_AT = 1e3
ONSET = 100.0
LOSS_FACTOR = 10.0


def logit_scale(output: Tensor) -> float:
    """Median ``|z|`` over every entry of the output batch ``(N, C)``: the scale of the logits."""
    z = output.detach().float().abs().reshape(-1)
    return float(z.median()) if z.numel() else math.nan


def weight_norms(model: nn.Module) -> dict[str, float]:
    """``‖W_l‖_F`` of every module with a floating-point ``weight`` parameter (Linear, Conv, …), by module name."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.is_floating_point() and name:
            out[name] = float(torch.linalg.vector_norm(w.detach().float()))
    return out


class ScaleMonitor:
    """Records the scales of a model every ``every`` steps (``falign train`` writes them to ``scale.jsonl``).

    Usage::

        monitor = ScaleMonitor(model, every=50)
        with monitor.watch(step):            # hooks on the layers only on a recorded step
            output = model(x); loss = ...
        row = monitor.record(step, loss, output)   # None on other steps

    Shape: ``output`` is ``(N, C)`` logits; each row holds ``loss``, ``logit_scale``, ``weights`` (layer → norm)
    and ``activations`` (layer → RMS of the layer's output over the batch).
    """

    def __init__(self, model: nn.Module, every: int) -> None:
        self.model = model
        self.every = every
        self.layers = {n: m for n, m in model.named_modules()
                       if n and isinstance(getattr(m, "weight", None), nn.Parameter)}
        self._acts: dict[str, float] | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @contextlib.contextmanager
    def watch(self, step: int) -> Iterator[None]:
        if not self.due(step):
            yield
            return
        acts: dict[str, float] = {}

        def hook_for(name: str):
            def hook(module: nn.Module, inputs: Any, out: Any) -> None:
                if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
                    acts[name] = float(out.detach().float().pow(2).mean().sqrt())
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._acts = acts

    def record(self, step: int, loss: float, output: Tensor) -> dict[str, Any] | None:
        if not self.due(step):
            return None
        acts, self._acts = self._acts or {}, None
        return {"step": step, "loss": loss, "logit_scale": logit_scale(output), "weights": weight_norms(self.model),
                "activations": acts}


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and math.isfinite(x)


def find_runaway(records: list[dict[str, Any]], num_classes: int, *, flag_at: float = FLAG_AT,
                 onset: float = ONSET, loss_factor: float = LOSS_FACTOR) -> dict[str, Any] | None:
    """The runaway in ``records`` (rows of :class:`ScaleMonitor`, in step order), or ``None``.

    Flagged at the first record whose logit scale exceeds ``flag_at`` or whose loss exceeds
    ``loss_factor · ln(num_classes)``, or where either is not finite. It *began* at the first record of the
    uninterrupted stretch of records with logit scale above ``onset`` that ends at the flag (the flagged record
    itself where the flag came from the loss alone). Returns ``{"began_step", "flagged_step", "reason",
    "logit_scale", "loss", "weight_growth"}``, ``weight_growth`` being each layer's ``‖W_l‖`` at the flag over
    its first recorded value (geometric growth toward the output shows as factors that rise with depth).
    """
    by_step = {int(r["step"]): r for r in records}  # a resumed run may repeat steps: the last record wins
    rows = [by_step[s] for s in sorted(by_step)]
    loss_limit = loss_factor * math.log(num_classes)
    for i, r in enumerate(rows):
        scale, loss = r.get("logit_scale"), r.get("loss")
        reasons = []
        if not _finite(scale) or scale > flag_at:
            reasons.append(f"logit scale {scale:.3g} > {flag_at:g}" if _finite(scale) else "logit scale not finite")
        if not _finite(loss) or loss > loss_limit:
            reasons.append(f"train loss {loss:.3g} > {loss_factor:g}·ln {num_classes}" if _finite(loss)
                           else "train loss not finite")
        if not reasons:
            continue
        start = i
        while start > 0 and not (_finite(rows[start - 1].get("logit_scale"))
                                 and rows[start - 1]["logit_scale"] <= onset):
            start -= 1
        first = rows[0].get("weights") or {}
        now = r.get("weights") or {}
        growth = {k: (now[k] / first[k] if _finite(now.get(k)) and first.get(k) else math.inf)
                  for k in first if k in now}
        return {"began_step": int(rows[start]["step"]), "flagged_step": int(r["step"]), "reason": "; ".join(reasons),
                "logit_scale": scale if _finite(scale) else None, "loss": loss if _finite(loss) else None,
                "weight_growth": {k: (v if math.isfinite(v) else None) for k, v in growth.items()}}
    return None
