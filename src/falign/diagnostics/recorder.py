"""Diagnostics recorded during training every ``k`` steps (``falign train --diagnostics-every k``)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from falign.convert import conversion_report
from falign.diagnostics.alignment import (
    backprop_gradients,
    error_signal_alignment,
    gradient_alignment,
    named_feedback_layers,
    weight_alignment,
)
from falign.diagnostics.decomposition import loss_decomposition
from falign.diagnostics.law import LayerPair, conservation, drift, find_pairs
from falign.diagnostics.reference import choose_reference, effective_rank
from falign.functional import backprop_mode
from falign.nn.containers import FeedbackView


class _Capture:
    """Error signals ``δ_l`` (gradients at each converted layer's output) of two backward passes."""

    def __init__(self) -> None:
        self.passes: list[dict[str, Tensor]] = [{}]

    def hook_for(self, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self.passes[-1][name] = grad.detach()
        return hook

    def next_pass(self) -> None:
        self.passes.append({})


class DiagnosticsRecorder:
    """Measures alignment, conservation and the loss-rate decomposition at one training step.

    Usage (what the trainer does)::

        rec = DiagnosticsRecorder(model, margin=0.1)

        def loss_and_output():
            output = model(x)
            return F.cross_entropy(output, y), output

        optimizer.zero_grad()
        loss, output, record = rec.step(loss_and_output, example=x)   # the rule's gradients are in .grad
        optimizer.step()

    :meth:`step` runs one forward pass and two backward passes through the same graph: the rule's
    (leaving its gradients in ``.grad`` for the optimiser) and the true one in backprop mode (one extra
    vector-Jacobian product). Given ``float64_loss``, it also recomputes the true gradient with a float64 copy of
    the model to check it against the floating-point floor (``record["reference"]``; the trainer does this unless
    ``--no-reference-check``). The first record is the reference point of the conservation drift.
    ``reduce`` averages the true gradients across data-parallel ranks (the rule's are averaged by DDP).
    """

    def __init__(self, model: nn.Module, margin: float = 0.1,
                 reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> None:
        self.model = model
        self.margin = margin
        self.reduce = reduce  # data-parallel: average the true gradients over ranks
        self.layers = named_feedback_layers(model)
        self.params = {n: p for n, p in model.named_parameters() if not n.endswith("feedback_weight")}
        # by identity: a Parameter tied between two modules (an embedding and the output layer) is listed by
        # named_parameters under its first name only, and belongs to the layer with feedback
        name_of = {id(p): n for n, p in self.params.items()}
        layer_of = {}
        for lname, layer in self.layers.items():
            for pname in ("weight", "bias"):
                param = getattr(layer, pname, None)
                if param is not None and id(param) in name_of:
                    layer_of[name_of[id(param)]] = lname
        # (parameter name, rows) of each layer's weight; a view of a converted container (attention's q/k/v
        # blocks, a recurrent layer's W_ih/W_hh) reads its block of the container's parameter
        self.weight_names: dict[str, tuple[str, tuple[int, int] | None]] = {}
        for lname, layer in self.layers.items():
            if isinstance(layer, FeedbackView):
                owner = lname.rsplit(".feedback.", 1)[0]
                pname, rows = layer.weight_source()
                full = f"{owner}.{pname}" if owner != lname else pname
                if full in self.params:
                    self.weight_names[lname] = (full, rows)
                    layer_of.setdefault(full, lname)
            elif id(layer.weight) in name_of:
                self.weight_names[lname] = (name_of[id(layer.weight)], None)
        self.groups: dict[str, list[str]] = {}
        for pname in self.params:
            self.groups.setdefault(layer_of.get(pname, "other (no feedback)"), []).append(pname)
        self.pairs: list[LayerPair] | None = None
        self.reference: dict[str, dict[str, Tensor]] | None = None

    @contextlib.contextmanager
    def _capture(self) -> Iterator[_Capture]:
        cap = _Capture()

        def on_forward(name: str):
            def hook(module: nn.Module, inputs: Any, out: Tensor) -> None:
                if out.requires_grad:
                    out.register_hook(cap.hook_for(name))
            return hook

        handles = [layer.register_forward_hook(on_forward(name)) for name, layer in self.layers.items()]
        try:
            yield cap
        finally:
            for h in handles:
                h.remove()

    def step(self, compute_loss: Callable[[], tuple[Tensor, Tensor]], example: Tensor,
             float64_loss: Callable[[nn.Module], Tensor] | None = None) -> tuple[Tensor, Tensor, dict]:
        """Forward + rule backward (gradients stay in ``.grad``) + true backward; returns
        ``(loss, output, record)``. ``compute_loss`` returns ``(loss, output)``.

        ``float64_loss(model64)``, given, returns the same batch's loss computed by a float64 copy of the model;
        its backprop gradient checks the float32 reference against the floating-point floor
        (:func:`~falign.diagnostics.reference.choose_reference`; the copy leaves the model and its feedback state
        untouched). Without it the record's ``reference`` says "not checked"."""
        if self.pairs is None:
            self.pairs = find_pairs(self.model, example[:2])
        with self._capture() as cap:
            loss, output = compute_loss()
            loss.backward(retain_graph=True)
            cap.next_pass()
            true = backprop_gradients(loss, self.params)
        if self.reduce is not None:
            true = self.reduce(true)
        rule = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params.items()}
        true64 = None
        if float64_loss is not None and self.reduce is None:
            true64 = self.float64_gradients(float64_loss)
        record = self.measure(rule, true, cap.passes[0], cap.passes[1], true64)
        record["loss"] = float(loss.detach())
        return loss.detach(), output.detach(), record

    def float64_gradients(self, float64_loss: Callable[[nn.Module], Tensor]) -> dict[str, Tensor]:
        """Backprop's gradients of a float64 copy of the model (same weights, feedback, batch)."""
        model64 = copy.deepcopy(self.model).double()
        params64 = dict(model64.named_parameters())
        names = [n for n in self.params if n in params64]
        with backprop_mode(), torch.autocast(example_device(params64), enabled=False):
            loss = float64_loss(model64)
            grads = torch.autograd.grad(loss, [params64[n] for n in names], allow_unused=True)
        return {n: (torch.zeros_like(params64[n]) if g is None else g) for n, g in zip(names, grads)}

    @property
    def output_layer(self) -> str | None:
        """The model's output layer (known once a forward pass has run)."""
        return conversion_report(self.model).output_layer

    def _output_group(self) -> str:
        output = self.output_layer
        if output is None:
            raise RuntimeError("the model's output layer is not known yet: run one forward pass of the converted "
                               "model (or convert with example_input=) before recording")
        return output

    def state_dict(self) -> dict[str, Any]:
        """The conservation reference point (saved in checkpoints so a resumed run's drift is exact)."""
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]

    def measure(self, rule: dict[str, Tensor], true: dict[str, Tensor], signals_rule: dict[str, Tensor],
                signals_true: dict[str, Tensor], true64: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """One record: alignment per layer (weights, gradients, error signals), conservation drift, the loss-rate
        decomposition, the effective rank of each layer's error signal under the rule and under backprop, and
        the validity of the backprop reference per layer (``reference``; with ``true64`` a gradient angle whose
        reference is rounding noise is ``nan``, undefined)."""
        def block(grads: dict[str, Tensor], key: str, rows: tuple[int, int] | None) -> Tensor:
            return grads[key] if rows is None else grads[key][rows[0]:rows[1]]

        wkey = {lname: self.weight_names[lname] for lname in self.layers if lname in self.weight_names}
        grads_rule = {l: block(rule, k, rows) for l, (k, rows) in wkey.items() if k in rule}
        grads_true = {l: block(true, k, rows) for l, (k, rows) in wkey.items() if k in true}
        quantities = conservation(self.pairs or [])
        if self.reference is None:
            self.reference = quantities
        reference: dict[str, Any] = {}
        if true64 is not None:
            for lname, (k, rows) in wkey.items():
                if k in true and k in true64:
                    chosen, reference[lname] = choose_reference(block(true, k, rows), block(true64, k, rows))
                    grads_true[lname] = chosen
        return {
            "weight_alignment": weight_alignment(self.model),
            "gradient_alignment": gradient_alignment(grads_rule, grads_true),
            "reference": reference if true64 is not None else "not checked",
            "signal_rank": {k: effective_rank(v) for k, v in signals_rule.items()},
            "signal_rank_bp": {k: effective_rank(v) for k, v in signals_true.items()},
            "signal_alignment": error_signal_alignment(signals_rule, signals_true),
            "conservation": {k: drift(q, self.reference[k]) for k, q in quantities.items()},
            "decomposition": loss_decomposition(rule, true, self.groups, self._output_group(), self.margin),
        }


def example_device(params: Mapping[str, Tensor]) -> str:
    """The device type of the first parameter (``cpu`` for a model without any)."""
    return next(iter(params.values())).device.type if params else "cpu"


def jsonable(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` (JSON has no NaN) recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A diagnostics record as flat ``{name: number}`` scalars for a logger (TensorBoard, Lightning's logger):
    ``gradient_alignment/<layer>``, ``signal_alignment/<layer>``, ``weight_alignment/<layer>`` (degrees),
    ``conservation_max_drift/<pair>``, ``decomposition/<layer>``, ``decomposition/rho`` and ``loss``.
    Undefined values (``None``, NaN: an angle whose backprop reference was rounding noise) are left out."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[name] = float(value)

    for kind in ("gradient_alignment", "signal_alignment"):
        for layer, value in (record.get(kind) or {}).items():
            put(f"{kind}/{layer}", value)
    for layer, value in (record.get("weight_alignment") or {}).items():
        put(f"weight_alignment/{layer}", value.get("angle") if isinstance(value, dict) else value)
    for pair, value in (record.get("conservation") or {}).items():
        if isinstance(value, dict):
            put(f"conservation_max_drift/{pair}", value.get("max_drift"))
    decomposition = record.get("decomposition") or {}
    for layer, value in (decomposition.get("terms") or {}).items():
        put(f"decomposition/{layer}", value)
    put("decomposition/rho", decomposition.get("rho"))
    put("loss", record.get("loss"))
    return out
