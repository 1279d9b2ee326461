"""The per-neuron conservation law of feedback alignment (Robertson & Koyejo, ICML 2024, Thm 5.2).

For hidden neuron ``k`` between converted layers ``l`` and ``l+1`` joined by a positively homogeneous
activation (ReLU, identity, max/average pooling, flatten), under gradient flow with one learning rate:

    Q_{l,k} = ½ (‖W_l[k,:]‖² + b_l[k]²) − ⟨B_{l+1}[:,k], W_{l+1}[:,k]⟩        is constant in time.

Backprop's counterpart (Du, Hu & Lee 2018) is the balancedness ``½(‖W_l[k,:]‖² + b_l[k]²) − ½‖W_{l+1}[:,k]‖²``.
Convolutions: the same per output channel (``W_l[k]`` the whole filter, ``W_{l+1}[:,k]`` every weight
reading channel k, also through a flatten into a Linear layer). The sign rules use the ``B`` of the
current step; DFA's law holds for its last hidden layer with ``D_L`` as ``B``.

Pairs are found from the order in which modules run on one forward pass (:func:`find_pairs`);
activations applied with ``torch.nn.functional`` inside a ``forward`` are invisible to that trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from falign.diagnostics.angles import inner
from falign.nn.layers import FeedbackLayer

HOMOGENEOUS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Identity, nn.LeakyReLU, nn.Flatten, nn.Dropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
NORMALISATION: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
)
# Rules whose feedback is fixed (or a function of sign(W) only) between steps: the law is exact.
EXACT_RULES = ("fa", "usf", "frsf")


@dataclass
class LayerPair:
    """Two converted layers that run one after the other, and what runs between them."""

    name_in: str
    name_out: str
    layer_in: FeedbackLayer
    layer_out: FeedbackLayer
    between: list[str] = field(default_factory=list)
    homogeneous: bool = True
    normalisation: bool = False
    last: bool = False  # layer_out is the model's last converted layer

    @property
    def key(self) -> str:
        return f"{self.name_in}->{self.name_out}"

    @property
    def units(self) -> int:
        return self.layer_in.weight.shape[0]


def find_pairs(model: nn.Module, example: Tensor) -> list[LayerPair]:
    """Consecutive converted layers in execution order on ``example``, with compatible shapes.

    Records every leaf module's call during one ``no_grad`` forward; the leaves between two converted
    layers decide ``homogeneous`` and ``normalisation``. Pairs whose outgoing layer does not read the
    incoming layer's units one-to-one (shape mismatch, grouped convolutions) are skipped.
    """
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    converted = [i for i, m in enumerate(order) if isinstance(m, FeedbackLayer)]
    pairs = []
    for a, b in zip(converted[:-1], converted[1:]):
        lin, lout = order[a], order[b]
        if _column_view(lin, lout) is None:
            continue
        between = order[a + 1 : b]
        pairs.append(LayerPair(
            names[lin], names[lout], lin, lout, [type(m).__name__ for m in between],
            homogeneous=all(isinstance(m, (*HOMOGENEOUS, *NORMALISATION)) for m in between),
            normalisation=any(isinstance(m, NORMALISATION) for m in between),
            last=(b == converted[-1]),
        ))
    return pairs


def _column_view(lin: nn.Module, lout: nn.Module):
    """A function mapping a tensor of ``lout``'s weight shape to ``(K, ·)`` rows, row k = entries
    that read unit k of ``lin``; ``None`` when the layers are not joined one unit to one column."""
    k = lin.weight.shape[0]
    w_out = lout.weight
    if getattr(lout, "groups", 1) != 1:
        return None
    if w_out.dim() == 2:  # Linear reads k units, or k channels flattened (channel-major)
        n_in = w_out.shape[1]
        if n_in == k:
            return lambda t: t.t()
        if lin.weight.dim() > 2 and n_in % k == 0:
            s = n_in // k
            return lambda t: t.reshape(t.shape[0], k, s).transpose(0, 1).reshape(k, -1)
        return None
    if w_out.dim() > 2 and w_out.shape[1] == k:
        return lambda t: t.transpose(0, 1).reshape(k, -1)
    return None


def _incoming_sq(layer: FeedbackLayer) -> Tensor:
    w = layer.weight.detach()
    w = w.reshape(w.shape[0], -1)
    sq = inner(w, w, 1)
    if layer.bias is not None:
        sq = sq + layer.bias.detach().double().pow(2)  # small: per unit, no reduction
    return 0.5 * sq


def pair_quantities(pair: LayerPair) -> dict[str, Tensor]:
    """Per-unit terms of one pair (float64, shape ``(K,)``).

    ``incoming`` = ½(‖W_l[k]‖² + b_l[k]²); ``coupling`` = ⟨B_{l+1}[:,k], W_{l+1}[:,k]⟩ (absent when
    the outgoing layer has no ``B`` of W's shape); ``outgoing`` = ½‖W_{l+1}[:,k]‖²; ``q`` =
    incoming − coupling (the FA law); ``q_balanced`` = incoming − outgoing (backprop's law).
    """
    cols = _column_view(pair.layer_in, pair.layer_out)
    w_out = cols(pair.layer_out.weight.detach())
    incoming = _incoming_sq(pair.layer_in)
    out = {"incoming": incoming, "outgoing": 0.5 * inner(w_out, w_out, 1)}
    out["q_balanced"] = incoming - out["outgoing"]
    b = pair.layer_out.current_feedback()
    if b is not None and b.shape == pair.layer_out.weight.shape:
        out["coupling"] = inner(cols(b), w_out, 1)
        out["q"] = incoming - out["coupling"]
    return out


def conservation(pairs: list[LayerPair]) -> dict[str, dict[str, Tensor]]:
    """:func:`pair_quantities` for every pair, keyed ``"in->out"``."""
    return {p.key: pair_quantities(p) for p in pairs}


def drift(now: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """How far the conserved quantities moved since ``ref``.

    ``max_drift``: ``max_k |Q_k − Q_k(ref)|``; ``sum_drift``: ``|Σ_k Q_k − Σ_k Q_k(ref)|`` (the layer
    sum); ``scale``: ``max_k max(incoming_k, |coupling_k|)`` now, the size of the terms that cancel;
    ``relative``: ``max_drift / scale``. The same with a ``balanced_`` prefix for backprop's law.
    """
    out: dict[str, float] = {}
    for key, prefix, other in (("q", "", "coupling"), ("q_balanced", "balanced_", "outgoing")):
        if key not in now or key not in ref:
            continue
        d = (now[key] - ref[key]).abs()
        scale = float(torch.maximum(now["incoming"], now[other].abs()).max())
        out[f"{prefix}max_drift"] = float(d.max())
        out[f"{prefix}sum_drift"] = float((now[key].sum() - ref[key].sum()).abs())
        out[f"{prefix}scale"] = scale
        out[f"{prefix}relative"] = float(d.max()) / scale if scale > 0 else math.nan
        out[f"{prefix}sum"] = float(now[key].sum())
    return out


def conservation_assumptions(pairs: list[LayerPair], rule: str, *, optimizer: str = "sgd",
                             momentum: float = 0.0, weight_decay: float = 0.0,
                             single_lr: bool = True) -> dict[str, Any]:
    """Which of the law's assumptions a run satisfies, per pair, and whether drift is expected.

    The law (for the rule's own quantity; backprop's balancedness under ``bp``) needs: positively
    homogeneous activations between the pair, no normalisation layer between them, plain SGD without
    momentum or weight decay, one learning rate for every layer, and feedback that does not change
    between steps except through ``sign(W)`` (``fa``, ``usf``, ``frsf``; ``dfa`` for its last hidden
    layer; ``bp`` for balancedness). Even then SGD drifts by ``O(η)`` over a fixed time horizon.
    """
    run_reasons = []
    if optimizer != "sgd":
        run_reasons.append(f"optimizer {optimizer} is not plain SGD")
    if momentum:
        run_reasons.append(f"momentum {momentum}")
    if weight_decay:
        run_reasons.append(f"weight decay {weight_decay}")
    if not single_lr:
        run_reasons.append("learning rates differ between layers or change over time")
    if rule in ("kp", "wm"):
        run_reasons.append(f"{rule} learns its feedback, so B changes between steps")
    if rule == "brsf":
        run_reasons.append("brsf redraws its feedback every step")
    per_pair = {}
    for p in pairs:
        reasons = list(run_reasons)
        if not p.homogeneous:
            reasons.append(f"activation between the pair is not positively homogeneous ({', '.join(p.between)})")
        if p.normalisation:
            reasons.append("a normalisation layer sits between the pair")
        if rule == "dfa" and not p.last:
            reasons.append("dfa's law covers only its last hidden layer")
        quantity = "balancedness" if rule == "bp" else "feedback"
        per_pair[p.key] = {"holds": not reasons, "quantity": quantity, "between": p.between, "reasons": reasons}
    return {"holds": bool(per_pair) and all(v["holds"] for v in per_pair.values()), "run_reasons": run_reasons,
            "pairs": per_pair}
