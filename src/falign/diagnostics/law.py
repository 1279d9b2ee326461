"""The per-neuron conservation law of feedback alignment (Robertson & Koyejo, ICML 2024, Thm 5.2).

For hidden neuron ``k`` between converted layers ``l`` and ``l+1`` joined by a positively homogeneous
activation (ReLU, identity, max/average pooling, flatten), under gradient flow with one learning rate:

    Q_{l,k} = ½ (‖W_l[k,:]‖² + b_l[k]²) − ⟨B_{l+1}[:,k], W_{l+1}[:,k]⟩        is constant in time.

Backprop's counterpart (Du, Hu & Lee 2018) is the balancedness ``½(‖W_l[k,:]‖² + b_l[k]²) − ½‖W_{l+1}[:,k]‖²``.
Convolutions: the same per output channel (``W_l[k]`` the whole filter, ``W_{l+1}[:,k]`` every weight
reading channel k, also through a flatten into a Linear layer). The sign rules use the ``B`` of the
current step; DFA's law holds for its last hidden layer with ``D_L`` as ``B``.

Pairs are found from how layers connect (:func:`find_pairs`): the autograd graph of one forward pass is
walked back from each converted layer's input to the converted layer that produced it. A pair needs a
single chain of elementwise or per-channel operations (activations, pooling, reshapes, normalisation)
with no merge (residual additions, concatenations) and no branching off; every other converted layer is
reported "law not applicable" with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from falign.diagnostics.angles import inner
from falign.nn import probe as _probe
from falign.nn.layers import FeedbackLayer
from falign.rules import FeedbackRule, Law, get_rule

# Autograd nodes (``type(grad_fn).__name__`` without the ``Backward<k>`` suffix) allowed on the path between
# two paired layers. Positively homogeneous ones keep the law exact; the others keep the pairing (each unit
# still maps to one unit) but break exactness; anything else makes the pair "law not applicable".
HOMOGENEOUS_OPS = frozenset({
    "Relu", "Threshold", "LeakyRelu", "PreluKernel", "View", "Reshape", "ReshapeAlias", "UnsafeView", "Alias",
    "Squeeze", "SqueezeDim", "SqueezeDims", "Unsqueeze", "Clone", "ToCopy", "Mean",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "MaxPool1D", "MaxPool2D",
    "AvgPool1D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
    "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
})
NONHOMOGENEOUS_OPS = frozenset({
    "Tanh", "Sigmoid", "Gelu", "Silu", "Elu", "Softplus", "Hardtanh", "Hardswish", "Hardsigmoid", "Mish",
    "LogSigmoid", "Celu", "Selu", "Softsign", "Tanhshrink",
})
NORMALISATION_OPS = frozenset({
    "NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm", "NativeLayerNorm", "NativeGroupNorm",
    "BatchNorm", "LayerNorm", "GroupNorm",
})


def op_name(node: Any) -> str:
    """``ReluBackward0`` → ``Relu``."""
    return re.sub(r"Backward\d*$", "", type(node).__name__)


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


def find_pairs(model: nn.Module, example: Any, *, not_applicable: dict[str, str] | None = None) -> list[LayerPair]:
    """Pairs of converted layers joined by a chain of elementwise operations, from one forward pass.

    Runs ``model(example)`` once in eval mode with gradients enabled (no parameter or running statistic
    changes), and walks the autograd graph back from each converted layer's input: the chain must reach
    another converted layer's output through operations of :data:`HOMOGENEOUS_OPS`,
    :data:`NONHOMOGENEOUS_OPS` or :data:`NORMALISATION_OPS` only, with one input each and no other
    consumer (no residual addition, concatenation or branch). Pairs whose outgoing layer does not read the
    incoming layer's units one-to-one (grouped convolutions) are left out too.

    ``not_applicable``, when given, receives ``{layer name: reason}`` for every converted layer that is not
    the outgoing layer of a pair (its incoming neurons have no conservation law here).
    """
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    calls: dict[int, list[tuple[Tensor, Any]]] = {}
    layers: dict[int, FeedbackLayer] = {}
    order: list[int] = []

    def pre(module, args):
        if _probe.active() is None:
            calls.setdefault(id(module), []).append([args[0] if args else None, None])

    def post(module, args, out):
        if _probe.active() is None and calls.get(id(module)) and isinstance(out, Tensor):
            calls[id(module)][-1][1] = out.grad_fn
            order.append(id(module))

    hooks = []
    for m in model.modules():
        if isinstance(m, FeedbackLayer):
            layers[id(m)] = m
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with _probe.measuring(model):
            output = model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for h in hooks:
            h.remove()
    roots = [t.grad_fn for t in tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None]
    consumers = _consumers(roots)
    producers = {}
    for key, made in calls.items():
        if len(made) == 1 and made[0][1] is not None:
            producers[made[0][1]] = key
    last = order[-1] if order else None
    report = getattr(model, "falign_report", None)
    if report is not None and report.output_layer is not None:
        last = id(model.get_submodule(report.output_layer))
    pairs = []
    reasons = {}
    for key in dict.fromkeys(order):
        name = names.get(key, "?")
        if len(calls[key]) != 1:
            reasons[name] = f"the layer runs {len(calls[key])} times in one forward pass"
            continue
        x = calls[key][0][0]
        found, between, why = _walk_back(x, producers, consumers)
        if found is None:
            reasons[name] = why
            continue
        lin, lout = layers[found], layers[key]
        if _column_view(lin, lout) is None:
            reasons[name] = f"{names[found]}'s units are not read one to one (shapes or groups)"
            continue
        pairs.append(LayerPair(
            names[found], name, lin, lout, between,
            homogeneous=all(op in HOMOGENEOUS_OPS or op in NORMALISATION_OPS for op in between),
            normalisation=any(op in NORMALISATION_OPS for op in between),
            last=(key == last),
        ))
    if not_applicable is not None:
        not_applicable.update(reasons)
    return pairs


def _consumers(roots: list[Any]) -> dict[Any, int]:
    """How many edges of the autograd graph (from ``roots``) lead into each node."""
    count: dict[Any, int] = {}
    stack, seen = list(roots), {id(r) for r in roots}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            count[nxt] = count.get(nxt, 0) + 1
            if id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return count


def _walk_back(x: Any, producers: dict[Any, int], consumers: dict[Any, int]) -> tuple[int | None, list[str], str]:
    """From a layer input back to the converted layer that produced it: ``(producer, ops between, reason)``."""
    if not isinstance(x, Tensor) or x.grad_fn is None:
        return None, [], "its input is not produced by another layer (model input, or no gradient)"
    node, between = x.grad_fn, cast(list[str], [])
    while True:
        if node in producers:
            if consumers.get(node, 0) > 1:
                return None, between, "the previous layer's output is also used elsewhere (a branch or skip)"
            return producers[node], list(reversed(between)), ""
        op = op_name(node)
        if op not in HOMOGENEOUS_OPS and op not in NONHOMOGENEOUS_OPS and op not in NORMALISATION_OPS:
            article = "an" if op[:1] in "AEIOU" else "a"
            return None, between, f"{article} {op} operation joins it to the previous layer (not elementwise)"
        parents = [n for n, _ in node.next_functions if n is not None and op_name(n) != "AccumulateGrad"]
        if len(parents) != 1:
            return None, between, f"{op} merges {len(parents)} inputs before this layer"
        if consumers.get(node, 0) > 1:
            return None, between, f"the output of {op} is also used elsewhere (a branch)"
        between.append(op)
        node = parents[0]


def _column_view(lin: FeedbackLayer, lout: FeedbackLayer) -> Callable[[Tensor], Tensor] | None:
    """A function mapping a tensor of ``lout``'s weight shape to ``(K, ·)`` rows, row k = entries
    that read unit k of ``lin``; ``None`` when the layers are not joined one unit to one column."""
    if getattr(lin, "transposed", False) and getattr(lin, "groups", 1) != 1:
        return None
    k = _units(lin)
    w_out = lout.weight
    if getattr(lout, "groups", 1) != 1:
        return None
    if getattr(lout, "transposed", False):  # (C_in, C_out, *kernel): unit k is read by the entries [k]
        return (lambda t: t.reshape(k, -1)) if w_out.shape[0] == k else None
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


def _units(layer: FeedbackLayer) -> int:
    """How many units (output features or channels) a layer has: a transposed convolution's weight is
    ``(C_in, C_out/groups, *kernel)``."""
    w = layer.weight
    return int(w.shape[1] * getattr(layer, "groups", 1) if getattr(layer, "transposed", False) else w.shape[0])


def _incoming_sq(layer: FeedbackLayer) -> Tensor:
    w = layer.weight.detach()
    if getattr(layer, "transposed", False):  # unit k's incoming weights are W[:, k]
        w = w.transpose(0, 1)
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
    assert cols is not None, "pairs are made only of layers joined one unit to one column"
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


def conservation_assumptions(pairs: list[LayerPair], rule: str | FeedbackRule, *, optimizer: str = "sgd",
                             momentum: float = 0.0, weight_decay: float = 0.0,
                             single_lr: bool = True, not_applicable: dict[str, str] | None = None) -> dict[str, Any]:
    """Which of the law's assumptions a run satisfies, per pair, and whether drift is expected.

    The law (for the rule's own quantity; backprop's balancedness under ``bp``) needs: positively
    homogeneous activations between the pair, no normalisation layer between them, plain SGD without
    momentum or weight decay, one learning rate for every layer, and a rule for which it holds
    (``rule.law``: exact for feedback that changes at most through ``sign(W)``; for the last hidden layer
    only under ``dfa``; none for rules whose feedback is learned or redrawn). Even then SGD drifts by
    ``O(η)`` over a fixed time horizon. ``not_applicable`` (from :func:`find_pairs`) lists the layers that
    are in no pair, with the reason.
    """
    rule = get_rule(rule)
    run_reasons = []
    if optimizer != "sgd":
        run_reasons.append(f"optimizer {optimizer} is not plain SGD")
    if momentum:
        run_reasons.append(f"momentum {momentum}")
    if weight_decay:
        run_reasons.append(f"weight decay {weight_decay}")
    if not single_lr:
        run_reasons.append("learning rates differ between layers or change over time")
    if rule.law is Law.NONE:
        run_reasons.append(f"the law does not hold under {rule.name}: its feedback is "
                           f"{rule.feedback.value} and its signal is {rule.signal.value}")
    per_pair = {}
    for p in pairs:
        reasons = list(run_reasons)
        if not p.homogeneous:
            reasons.append(f"activation between the pair is not positively homogeneous ({', '.join(p.between)})")
        if p.normalisation:
            reasons.append("a normalisation layer sits between the pair")
        if rule.law is Law.LAST_HIDDEN and not p.last:
            reasons.append(f"{rule.name}'s law covers only its last hidden layer")
        quantity = "balancedness" if rule.law is Law.BALANCEDNESS else "feedback"
        per_pair[p.key] = {"holds": not reasons, "quantity": quantity, "between": p.between, "reasons": reasons}
    return {"holds": bool(per_pair) and all(v["holds"] for v in per_pair.values()), "run_reasons": run_reasons,
            "pairs": per_pair, "not_applicable": dict(not_applicable or {})}
