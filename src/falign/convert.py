"""``falign.convert``: turn any ``nn.Module`` into one trained by a feedback-alignment-family rule.

Conversion is driven by :data:`LAYER_MAP`, a ``{PyTorch layer type: converted layer type}`` map. A
module is converted when its type is in the map, or is a subclass of a type in the map that does not
override ``forward`` (a parametrized layer — spectral or weight norm —, a pruned layer, a user subclass
that only adds attributes). Conversion changes the module's class in place (on a deep copy unless
``inplace=True``): parameters, buffers, hooks, parametrizations and other attributes stay as they are,
and a module used in several places (``nn.ModuleList([lin] * 3)``, one layer under two names) is
converted once and stays shared. Everything else keeps backpropagating, by this policy:

- modules without parameters of their own (activations, pooling, dropout, flatten, containers,
  residual additions written in ``forward``) pass signals on by the ordinary chain rule;
- normalisation layers and ``PReLU`` (per-channel affine or elementwise parameters, no weight
  transport) keep their exact gradients: :data:`KEPT_ON_BACKPROP`;
- ``nn.Embedding`` and ``nn.EmbeddingBag`` (:data:`LOCAL_GRADIENT`) are kept as they are: their input is
  indices, so there is no input signal to replace and their weight gradient is already local. A weight tied
  between an embedding and the output layer stays one Parameter and receives both gradients (the report
  names the tie);
- ``nn.MultiheadAttention`` and ``nn.RNN``/``nn.GRU``/``nn.LSTM`` are converted *containers*
  (:mod:`falign.nn.attention`, :mod:`falign.nn.recurrent`): they keep their parameters and gain one feedback
  view per transported weight;
- any other module with parameters of its own (``nn.LSTMCell``, a block holding a
  layer-scale ``gamma``, a subclass of ``nn.Linear`` with its own ``forward``, ...) raises
  :class:`ConversionError` naming every such module at once, unless ``unsupported="backprop"``: then
  its own parameters get exact gradients and its children are still converted. Modules whose ``forward``
  reads their children's weights directly (:data:`OPAQUE`: a subclass of ``nn.MultiheadAttention`` or of
  a recurrent layer with its own ``forward``) are left whole.

The *output layer* is the converted layer that produces the model's output. It is found on the first
forward pass, whose autograd graph is walked back from the output to the nearest converted layer. Where that
call cannot tell it in time (the direct rules, which size their feedback matrices from the output's size
before their layers run; ``output_signal="backprop"``; a first call without gradients or under
``torch.compile``) and with ``example_input=``, a probe does it: one extra forward pass in eval mode with
gradients on and the model's forward hooks on (they see that call twice). Under ``torch.jit.trace`` nothing
is looked for (the trace records the plain forward pass); the eager model looks at its own first call.

:func:`conversion_report` tells afterwards what was converted and what was left on backprop.
"""

from __future__ import annotations

import collections
import copy
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from falign.errors import FalignError
from falign.functional import ErrorTap
from falign.nn import probe as _probe
from falign.nn.attention import FAMultiheadAttention
from falign.nn.containers import FeedbackContainer
from falign.nn.layers import (
    FAConv1d,
    FAConv2d,
    FAConv3d,
    FAConvTranspose1d,
    FAConvTranspose2d,
    FAConvTranspose3d,
    FALinear,
    FeedbackLayer,
)
from falign.nn.recurrent import FAGRU, FALSTM, FARNN
from falign.rules import FeedbackInit, FeedbackRule, Signal, get_rule
from falign.seeding import check_seed, mix_seed

__all__ = [
    "KEPT_ON_BACKPROP",
    "LAYER_MAP",
    "LOCAL_GRADIENT",
    "OPAQUE",
    "ConversionError",
    "ConversionReport",
    "conversion_report",
    "convert",
    "feedback_layers",
    "install_error_tap",
    "set_target",
    "unconvert",
    "uses_target",
]

LAYER_MAP: dict[type[nn.Module], type[FeedbackLayer] | type[FeedbackContainer]] = {
    nn.Linear: FALinear,
    nn.Conv1d: FAConv1d,
    nn.Conv2d: FAConv2d,
    nn.Conv3d: FAConv3d,
    nn.ConvTranspose1d: FAConvTranspose1d,
    nn.ConvTranspose2d: FAConvTranspose2d,
    nn.ConvTranspose3d: FAConvTranspose3d,
    nn.MultiheadAttention: FAMultiheadAttention,
    nn.RNN: FARNN,
    nn.GRU: FAGRU,
    nn.LSTM: FALSTM,
}

KEPT_ON_BACKPROP: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    KEPT_ON_BACKPROP = (*KEPT_ON_BACKPROP, nn.RMSNorm)

# Modules whose input is indices: there is no input signal for a rule to replace, so their weight gradient
# (the signal that reaches their output, scattered to the rows looked up) is already local. Kept as they are.
LOCAL_GRADIENT: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

# Modules whose forward reads their children's parameters directly (converting a child would change
# nothing): left whole, with every parameter they hold listed. (nn.MultiheadAttention has its converted
# version; a subclass of it with its own forward is such a module.)
OPAQUE: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.RNNBase)


ROOT_NAME = "(root)"
"""The name the conversion report gives the model itself (its own parameters, e.g. a ViT's ``cls_token``)."""


OUTPUT_SIGNALS = ("rule", "backprop")
"""What the output layer's input signal uses: the rule's feedback, or backprop's ``W`` (``convert(output_signal=)``)."""


class ConversionError(FalignError, TypeError):
    """A module with parameters that no converted layer can stand in for."""


@dataclass
class LayerRecord:
    """One line of a :class:`ConversionReport`: one *use* of a module (a shared module has several)."""

    name: str
    type: str
    status: str  # "converted", "kept-backprop", "unsupported-backprop"
    rule: str
    note: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` did, layer by layer (``str(report)`` is a table).

    ``output_layer`` is ``None`` until the first forward pass has found it (unless it was given).
    """

    rule: str
    output_layer: str | None
    layers: list[LayerRecord] = field(default_factory=list)
    output_layer_source: str = "found on the first forward pass"

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.layers if r.status == "converted"]

    @property
    def left_on_backprop(self) -> list[str]:
        """Modules with parameters that kept plain backprop (normalisation or unsupported)."""
        return [r.name for r in self.layers if r.status != "converted"]

    @property
    def unsupported(self) -> list[str]:
        return [r.name for r in self.layers if r.status == "unsupported-backprop"]

    def __str__(self) -> str:
        rows = [("layer", "type", "status", "rule", "note")]
        rows += [(r.name, r.type, r.status, r.rule, r.note) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        table = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
        output = self.output_layer or "not known yet (found on the first forward pass)"
        return f"{table}\noutput layer: {output}"


def _own_parameters(module: nn.Module) -> list[str]:
    return [k for k, v in module._parameters.items() if v is not None]


def _overrides_forward(cls: type, base: type) -> bool:
    """Whether a class between ``cls`` and ``base`` in the MRO defines its own forward computation."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if any(name in vars(klass) for name in ("forward", "_conv_forward")):
            return True
    return False


def _target(child: nn.Module, map_: dict) -> type[FeedbackLayer] | None:
    if isinstance(child, (FeedbackLayer, FeedbackContainer)):
        return next(cls for cls in map_.values() if isinstance(child, cls.torch_base) and isinstance(child, cls))
    if type(child) in map_:
        return map_[type(child)]
    for base, cls in map_.items():
        if isinstance(child, base) and not _overrides_forward(type(child), base):
            return cls
    return None


def _lazy(child: nn.Module) -> bool:
    return isinstance(child, nn.modules.lazy.LazyModuleMixin) and child.has_uninitialized_params()


class _Plan:
    """One walk over every path to every module (a shared module is met once per use)."""

    def __init__(self, map_: dict) -> None:
        self.map = map_
        self.records: list[LayerRecord] = []
        self.layers: list[tuple[str, nn.Module, type[FeedbackLayer]]] = []  # unique, first-use order
        self.first: dict[int, str] = {}
        self.problems: list[str] = []

    def _record(self, name: str, child: nn.Module, status: str, note: str) -> None:
        self.records.append(LayerRecord(name, type(child).__name__, status, "bp", note))

    def _unsupported(self, name: str, child: nn.Module, params: list[str], why: str, again: bool) -> None:
        if not again:
            self.problems.append(f"{name!r} ({type(child).__name__}, parameters: {', '.join(params)}): {why}")
        self._record(name, child, "unsupported-backprop", f"{why}; parameters {', '.join(params)} trained by "
                                                          f"backprop")

    def walk_model(self, model: nn.Module) -> None:
        """Plan the whole model. The root is a module like any other: its own parameters are reported or
        refused exactly as a child's would be (it cannot be a converted layer itself: :func:`convert` refuses
        a bare layer), and its children are walked unless it is :data:`OPAQUE`."""
        self.first[id(model)] = ROOT_NAME
        self._visit(ROOT_NAME, model, None, again=False, shared="", path=())

    def walk(self, module: nn.Module, prefix: str = "", path: tuple[int, ...] = ()) -> None:
        for attr, child in module._modules.items():
            if child is None or id(child) in path:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            again = id(child) in self.first
            self.first.setdefault(id(child), name)
            shared = f"same module as {self.first[id(child)]!r}" if again else ""
            target = None if _lazy(child) else _target(child, self.map)
            self._visit(name, child, target, again, shared, path)

    def _visit(self, name: str, child: nn.Module, target: type[FeedbackLayer] | None, again: bool, shared: str,
               path: tuple[int, ...]) -> None:
        """Record one use of ``child`` (named ``name``; :data:`ROOT_NAME` for the root) and walk into it."""
        if target is not None:
            if not again:
                self.layers.append((name, child, target))
            note = "; ".join(n for n in (getattr(target, "report_note", ""), shared) if n)
            self.records.append(LayerRecord(name, type(child).__name__, "converted", "", note))
        elif _lazy(child):
            self._unsupported(name, child, _own_parameters(child),
                              "lazy layer not initialised yet: run one forward pass, then convert", again)
        elif isinstance(child, LOCAL_GRADIENT):
            note = ("input is indices: no input signal to replace, its weight gradient is already local (the "
                    "signal the rule sends to its output, added to the rows looked up)")
            self._record(name, child, "kept-backprop", f"{note}; {shared}" if shared else note)
        elif isinstance(child, KEPT_ON_BACKPROP):
            note = "normalisation/elementwise parameters: exact gradient"
            self._record(name, child, "kept-backprop", f"{note}; {shared}" if shared else note)
        elif isinstance(child, OPAQUE):
            params = [n for n, _ in child.named_parameters()]
            self._unsupported(name, child, params, "no feedback version (its forward reads the weights of "
                                                   "its children directly)", again)
        else:
            own = _own_parameters(child)
            if own:
                why = ("a subclass that overrides forward" if any(isinstance(child, b) for b in self.map)
                       else "no feedback version")
                self._unsupported(name, child, own, why, again)
            self.walk(child, "" if name == ROOT_NAME else name, (*path, id(child)))


def _note_tied_parameters(model: nn.Module, records: list[LayerRecord]) -> None:
    """Say in the report where two different modules hold the same Parameter (weight tying, e.g. an
    embedding and the output layer of a language model): it stays one Parameter after conversion, and its
    gradient is the sum of both modules' local gradients."""
    owners: dict[int, list[str]] = {}
    seen_modules: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{name or ROOT_NAME}.{pname}")
    tied = {full: others for names in owners.values() if len(names) > 1
            for full in names for others in [[n for n in names if n != full]]}
    for record in records:
        notes = [f"{full} is tied to {', '.join(others)} (one Parameter: its gradient is the sum of both uses)"
                 for full, others in tied.items() if full.rsplit(".", 1)[0] == record.name]
        if notes:
            record.note = "; ".join([record.note, *notes]) if record.note else "; ".join(notes)


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies pruned layers (their computed ``weight`` is not a leaf tensor,
    which deepcopy refuses; the forward pre-hook of pruning recomputes it anyway)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf and not isinstance(value, nn.Parameter):
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def convert(
    model: nn.Module,
    rule: str | FeedbackRule = "fa",
    *,
    feedback_init: str = "kaiming_uniform",
    feedback_scale: float = 1.0,
    seed: int = 0,
    output_signal: str = "rule",
    output_layer: str | None = None,
    output_features: int | None = None,
    unsupported: str = "error",
    layer_map: dict[type[nn.Module], type[FeedbackLayer]] | None = None,
    inplace: bool = False,
    example_input: Any = None,
    **rule_options: Any,
) -> nn.Module:
    """Convert every Linear/Conv layer of ``model`` to ``rule``; returns the converted model.

    Args:
        model: any ``nn.Module`` (nested, ``Sequential``, residual, shared modules, ...).
        rule: a name from :func:`falign.available_rules` or a rule instance.
        feedback_init: distribution of the feedback matrices (:class:`~falign.rules.FeedbackInit`).
        feedback_scale: multiplies that distribution's scale.
        seed: every feedback matrix is reproducible from it (the ``i``-th distinct layer, in the order
            the modules are first met, uses ``mix_seed(seed, i)``).
        output_signal: ``"rule"`` (default) or ``"backprop"``: whether the output layer's *input
            signal* uses the rule or ``g W``. Its weight gradient is always the true local one.
        output_layer: name of the output layer (default: found from the first forward pass: the converted
            layer nearest the output in the autograd graph).
        output_features: for the direct rules (``dfa``), the number of output features the model must
            produce (a check; ``D`` is sized from the output measured on the first forward pass).
        unsupported: ``"error"`` (default) or ``"backprop"`` for modules with parameters that have no
            feedback version (their own parameters then get exact gradients; their children are converted).
        layer_map: extra ``{type: converted type}`` entries, e.g. for a user's ``nn.Linear`` subclass
            with its own ``forward`` (whose forward the converted layer's then replaces).
        inplace: modify ``model`` itself instead of a deep copy.
        example_input: an input (or a tuple of positional inputs) to find the output layer and the
            output size now rather than on the first forward pass.
        **rule_options: options of the rule's constructor (e.g. ``wm``'s mirror ``lr``).

    Returns:
        The converted model (``model`` itself when ``inplace``). Weights are unchanged.

    Example::

        >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> fa_net = falign.convert(net, "fa", seed=0)
        >>> print(falign.conversion_report(fa_net))
    """
    rule_obj = get_rule(rule, **rule_options)
    if output_signal not in OUTPUT_SIGNALS:
        raise ValueError(f"output_signal must be 'rule' or 'backprop', got {output_signal!r}")
    if unsupported not in ("error", "backprop"):
        raise ValueError(f"unsupported must be 'error' or 'backprop', got {unsupported!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    check_seed(seed)
    map_ = {**LAYER_MAP, **(layer_map or {})}
    if _target(model, map_) is not None:
        raise ConversionError("convert a model that contains the layer (e.g. nn.Sequential(layer)), "
                              "not a bare layer; or use FALinear.from_module")

    plan = _Plan(map_)
    plan.walk_model(model)
    if plan.problems and unsupported == "error":
        raise ConversionError(
            f"cannot convert {len(plan.problems)} module(s) of {type(model).__name__}: "
            + "; ".join(plan.problems)
            + ". Pass unsupported='backprop' to leave them on backprop (their own parameters then get exact "
              "gradients, their children are still converted), or add a type to layer_map=")
    if not plan.layers:
        raise ConversionError(f"{type(model).__name__} contains no layer falign can convert "
                              f"(types: {', '.join(t.__name__ for t in map_)})")
    _note_tied_parameters(model, plan.records)
    names = [r.name for r in plan.records if r.status == "converted"]
    if output_layer is not None and output_layer not in names:
        raise ValueError(f"output_layer {output_layer!r} is not a convertible layer; candidates: {names}")

    if not inplace:
        index = {id(m): i for i, m in enumerate(model.modules())}
        model = _deepcopy(model)
        copies = list(model.modules())
        plan.layers = [(name, copies[index[id(child)]], target) for name, child, target in plan.layers]
    for old in getattr(model, "_falign_root_handles", ()):  # converted again: the old hooks go
        old.remove()

    tap = ErrorTap() if rule_obj.direct else None
    init = FeedbackInit(feedback_init, feedback_scale)
    for number, (_, child, target) in enumerate(plan.layers):
        target.convert_in_place(child, rule=rule_obj, init=init, seed=mix_seed(seed, number), error_tap=tap)

    for record in plan.records:
        if record.status == "converted":
            record.rule = rule_obj.name
    report = ConversionReport(rule_obj.name, output_layer, plan.records,
                              "given" if output_layer is not None else "found on the first forward pass")
    setattr(model, "falign_report", report)  # noqa: B010  # a plain attribute, not a parameter or module
    root = _Root(tap, report, output_signal, output_features)
    if output_layer is not None:
        root.set_output_layer(model, cast(FeedbackLayer, model.get_submodule(output_layer)))  # checked above
    root.install(model, probe=tap is not None or output_layer is None)
    if example_input is not None:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        root.probe(model, args, {})
    return model


class _Root:
    """The hooks :func:`convert` installs on the model's root: the one-time probe of the first forward
    pass (output layer, output size) and, for ``dfa``, the error tap's session around every forward pass."""

    _watching: tuple[list, dict, list] | None = None  # during a first call that finds the output layer itself

    def __init__(self, tap: ErrorTap | None, report: ConversionReport | None, output_signal: str = "rule",
                 output_features: int | None = None) -> None:
        self.tap = tap
        self.report = report
        self.output_signal = output_signal
        self.output_features = output_features
        self.probed = False

    def install(self, model: nn.Module, probe: bool) -> None:
        self.probed = not probe
        handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                   model.register_forward_hook(self._post, always_call=True)]
        setattr(model, "_falign_root_handles", handles)  # noqa: B010  # plain attributes of the root
        setattr(model, "_falign_root", self)  # noqa: B010

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.jit.is_tracing():  # a trace records the plain forward pass: no probe, no error tap in it
            return
        if not self.probed:
            if self._can_watch():
                self._watch(module)
            else:
                self.probe(module, args, kwargs)
        if self.tap is not None:
            self.tap.begin()

    def _can_watch(self) -> bool:
        """Whether the output layer can be read off this (first) call's own autograd graph instead of a
        separate probe pass: nothing has to be known before the layers run (no direct rule's ``D`` to size,
        no output layer to switch to backprop), and the call records a graph (eager, gradients on)."""
        return (self.tap is None and self.output_signal == "rule" and torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def _watch(self, model: nn.Module) -> None:
        """Record, during the model's first call, which converted layer produced which autograd node; the
        root's forward hook then finds the output layer from the call's output (so the model, and its
        forward hooks, run once)."""
        self.probed = True
        nodes: dict[Any, FeedbackLayer] = {}
        run: list[FeedbackLayer] = []

        def record(layer: Any, args: tuple, out: Any) -> None:
            run.append(layer)
            for t in tree_leaves(out):
                if isinstance(t, Tensor) and t.grad_fn is not None:
                    nodes[t.grad_fn] = layer

        handles = [m.register_forward_hook(record, prepend=True) for m in feedback_layers(model)]
        self._watching = (handles, nodes, run)

    def _found(self, model: nn.Module, output: Any) -> None:
        assert self._watching is not None
        handles, nodes, run = self._watching
        self._watching = None
        for h in handles:
            h.remove()
        if output is None:  # the first call raised: look again at the next one
            self.probed = False
            return
        tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        layer = _nearest_layer([t.grad_fn for t in tensors if t.grad_fn is not None], nodes)
        if layer is None and run:
            layer = run[-1]  # no autograd graph (every parameter frozen): the last converted layer run
        if layer is not None and (self.report is None or self.report.output_layer is None):
            self.set_output_layer(model, layer)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._watching is not None:
            self._found(module, output)
        if self.tap is None or torch.jit.is_tracing():
            return None
        if output is None:  # the forward raised (always_call hook)
            self.tap.abort()
            return None
        if not isinstance(output, Tensor):
            self.tap.abort()
            raise TypeError(
                f"the direct rules need the model to return one tensor (its output error is projected), got "
                f"{type(output).__name__}. Convert a wrapper whose forward returns that tensor and compute the loss "
                f"outside the model, e.g. for a HuggingFace classifier: class Logits(nn.Module): def forward(self, "
                f"input_ids): return self.model(input_ids=input_ids).logits (without labels=, whose loss would be "
                f"computed before the error could be recorded)")
        return self.tap.end(output)

    @torch.compiler.disable
    def probe(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """One forward pass in eval mode with gradients on: which converted layer produces the output, and
        the output's size (for dfa). Runs once, where the first call cannot tell these itself (a direct
        rule, whose ``D`` must exist before its layers run; ``output_signal="backprop"``; a first call without
        gradients or under ``torch.compile``; ``example_input=``), with the model's forward hooks on (a hook
        may change what a layer receives or returns, so the probe must see it): they see that call twice;
        touches no parameter, buffer or running statistic."""
        self.probed = True
        nodes: dict[Any, FeedbackLayer] = {}
        inputs: list[tuple[FeedbackLayer, Tensor]] = []

        def record(layer: FeedbackLayer, x: Tensor) -> Tensor:
            out = layer.plain_forward(x)
            inputs.append((layer, x))
            if out.grad_fn is not None:
                nodes[out.grad_fn] = layer
            return out

        with _probe.measuring(model), _probe.probing(record):
            output = model.forward(*args, **kwargs)
        tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        layer = _nearest_layer([t.grad_fn for t in tensors if t.grad_fn is not None], nodes)
        if layer is None and inputs:
            layer = inputs[-1][0]  # no autograd graph (every parameter frozen): the last converted layer run
        if layer is not None and (self.report is None or self.report.output_layer is None):
            self.set_output_layer(model, layer)
        if self.tap is not None and tensors and inputs:
            self.tap.output_sizes = _output_sizes(tensors[0], inputs[0], self.output_features)
            for layer, x in inputs:  # the direct rules' D are made now (a layer not run here: at its first call)
                if layer.rule.direct and not layer._direct_planned:
                    layer._plan_direct(x)

    def set_output_layer(self, model: nn.Module, layer: FeedbackLayer) -> None:
        if self.report is not None:
            name = next((n for n, m in model.named_modules() if m is layer), None)  # also inside a container
            self.report.output_layer = name
            for r in self.report.layers:
                if r.status == "converted" and name is not None and (r.name == name or name.startswith(r.name + ".")):
                    r.note = ("output layer: input signal by backprop" if self.output_signal == "backprop"
                              else "output layer") + (f"; {r.note}" if r.note else "")
        if self.output_signal == "backprop" and layer.rule.has_feedback:
            backprop = get_rule("bp")
            layer.setup_feedback(backprop, layer.feedback_init, layer.feedback_seed)
            if self.report is not None:
                for r in self.report.layers:
                    if r.name == self.report.output_layer:
                        r.rule = backprop.name


def _nearest_layer(roots: list[Any], nodes: dict[Any, FeedbackLayer]) -> FeedbackLayer | None:
    """Breadth-first from the output's autograd nodes to the nearest node a converted layer produced."""
    queue = collections.deque(roots)
    seen = {id(r) for r in roots}
    while queue:
        node = queue.popleft()
        if node in nodes:
            return nodes[node]
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                queue.append(nxt)
    return None


def _output_sizes(output: Tensor, first: tuple[FeedbackLayer, Tensor], expected: int | None) -> tuple[int, tuple]:
    """``(entries per sample, positions)`` of the model output, the batch read off the first converted layer's
    input (``(N, …)``; a 1-D Linear input or an unbatched conv input is one sample)."""
    layer, x = first
    unbatched = x.dim() == (1 if layer.weight.dim() == 2 else layer.weight.dim() - 1)
    n = 1 if unbatched else x.shape[0]
    shape = tuple(output.shape)
    if not unbatched and shape and shape[0] == n:
        sizes = (math.prod(shape[1:]), shape[1:-1])
    else:
        sizes = (math.prod(shape), shape[:-1])
    if expected is not None and (not shape or shape[-1] != expected) and sizes[0] != expected:
        raise ValueError(f"the model's output has shape {shape} but output_features={expected} was given")
    return sizes


def install_error_tap(model: nn.Module, tap: ErrorTap | None = None, output_features: int | None = None) -> ErrorTap:
    """Give a model assembled by hand from direct-rule layers (``FALinear(rule='dfa')``) what :func:`convert`
    gives a converted one: an :class:`~falign.functional.ErrorTap` on its output shared by those layers, and
    the probe of its first forward pass that sizes their feedback matrices."""
    tap = tap or ErrorTap()
    for layer in feedback_layers(model):
        if layer.rule.direct:
            layer.error_tap = tap
    for old in getattr(model, "_falign_root_handles", ()):
        old.remove()
    _Root(tap, getattr(model, "falign_report", None), output_features=output_features).install(model, probe=True)
    return tap


def unconvert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain PyTorch model with the weights of a converted one, for export and inference.

    Every converted layer becomes the module it was converted from again (``nn.Linear``, a parametrized or
    subclassed layer, ...) with the same parameters and hooks; feedback matrices, the rules' buffers and
    falign's hooks on the root are removed, so ``state_dict`` has the plain model's keys.

    Example::

        plain = falign.unconvert(model)
        torch.save(plain.state_dict(), "plain.pt")      # loads into the unconverted architecture
    """
    if not inplace:
        model = _deepcopy(model)
    for handle in getattr(model, "_falign_root_handles", ()):
        handle.remove()
    for name in ("_falign_root_handles", "_falign_root", "falign_report"):
        model.__dict__.pop(name, None)
    for module in list(model.modules()):
        if isinstance(module, FeedbackContainer):  # first: its views go with it
            module.unconvert_in_place()
    for module in list(model.modules()):
        if isinstance(module, FeedbackLayer):
            module.unconvert_in_place()
    return model


def uses_target(model: nn.Module) -> bool:
    """Whether a layer of ``model`` follows a rule that projects the target (it needs :func:`set_target`)."""
    return any(layer.rule.signal is Signal.TARGET for layer in feedback_layers(model))


def set_target(model: nn.Module, target: Tensor) -> None:
    """Give the rules that project the target (``rule.signal`` is ``Signal.TARGET``) the target of the next
    forward pass of ``model``: class indices ``(N,)`` / ``(N, T)`` or a tensor of the output's shape
    (one-hot or soft targets). Call it before each forward pass; it does nothing for other rules.

    Example::

        falign.set_target(model, y)
        loss = F.cross_entropy(model(x), y)
    """
    root = root_of(model)
    if root is None:
        raise ValueError("set_target needs a model produced by falign.convert")
    if root.tap is not None:
        root.tap.target = target


def root_of(model: nn.Module) -> _Root | None:
    """The hooks :func:`convert` installed on ``model``'s root (its error tap, report and probe), or ``None`` for a
    model ``convert`` did not produce."""
    root = getattr(model, "_falign_root", None)  # through a wrapper's __getattr__ too (torch.compile's module)
    return root if isinstance(root, _Root) else None


def error_tap_of(model: nn.Module) -> ErrorTap | None:
    """The error tap of a model converted with a direct rule (records each forward pass's output error), else
    ``None``."""
    root = root_of(model)
    return None if root is None else root.tap


def feedback_layers(model: nn.Module) -> list[FeedbackLayer]:
    """Every converted layer of ``model`` (each once, also when shared), in module order."""
    return [m for m in model.modules() if isinstance(m, FeedbackLayer)]


def conversion_report(model: nn.Module) -> ConversionReport:
    """What :func:`convert` did to ``model``: converted layers, rules, what stayed on backprop.

    Example::

        >>> report = falign.conversion_report(model)
        >>> report.converted, report.left_on_backprop
    """
    report = getattr(model, "falign_report", None)
    if not isinstance(report, ConversionReport):
        raise ValueError("this model was not produced by falign.convert")
    return report
