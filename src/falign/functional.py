"""Autograd functions with an explicit feedback matrix.

Every function here computes the ordinary forward pass of a linear or convolutional layer and
replaces only the signal sent back to the layer's *input*. The weight and bias gradients stay the
exact local ones that backpropagation computes, so a rule changes nothing but how errors travel.

Conventions (``nn.Linear``): ``y = x Wᵀ + b`` with ``W ∈ R^{out×in}`` and ``g = ∂L/∂y``.

=====================  ====================  ============================
quantity               backprop              feedback rule
=====================  ====================  ============================
signal to the input    ``g W``               ``g B`` (``B`` of W's shape)
weight gradient        ``gᵀ x``              ``gᵀ x``
bias gradient          ``Σ_n g``             ``Σ_n g``
=====================  ====================  ============================

Convolutions use the transposed convolution with ``B`` in place of ``W`` for the input signal.
Passing ``feedback=weight`` reproduces backpropagation exactly. When ``feedback`` itself requires a
gradient (Kolen–Pollack), it receives exactly the weight gradient.

The direct rules replace the input signal by ``q D`` where ``q`` is known at the model's output: the
error ``e = ∂L/∂output`` recorded, per forward pass, by the :class:`ErrorTap` of the model's output, or
the target. When ``D`` requires a gradient (direct Kolen–Pollack) it receives ``∂⟨q D, x⟩/∂D``.

The functions use the ``setup_context`` form of :class:`torch.autograd.Function`, so ``torch.func``
transforms (``grad``, ``vmap`` for per-example gradients) run through them. In plain eager mode,
:func:`feedback_linear` and :func:`feedback_conv` take a faster path to the same numbers: PyTorch's own
``F.linear``/convolution under saved-tensor hooks that hand the op's backward ``B`` where it saved ``W``
(:class:`_SwapSaved`), so the whole backward runs in PyTorch's C++ autograd.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.graph import saved_tensors_hooks

__all__ = [
    "PER_POSITION",
    "PER_SAMPLE",
    "ErrorSession",
    "ErrorTap",
    "FeedbackSource",
    "backprop_mode",
    "direct_feedback_conv",
    "direct_feedback_linear",
    "double_backward",
    "feedback_conv",
    "feedback_linear",
]


def _weight_grad_linear(g: Tensor, x: Tensor) -> Tensor:
    return g.reshape(-1, g.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


def _bias_grad_linear(g: Tensor) -> Tensor:
    return g.reshape(-1, g.shape[-1]).sum(0)


FeedbackSource = Tensor | Callable[[Tensor], Tensor]
"""``B`` itself, or a function ``W ↦ B`` evaluated in the backward pass (at the forward's ``W``)."""


def _split(feedback: FeedbackSource, weight: Tensor) -> tuple[Tensor | None, Callable[[Tensor], Tensor] | None]:
    if isinstance(feedback, Tensor):
        if feedback.shape != weight.shape:
            raise ValueError(f"feedback shape {tuple(feedback.shape)} != weight shape {tuple(weight.shape)}")
        return feedback, None
    if not callable(feedback):
        raise TypeError(f"feedback must be a tensor or a callable W -> B, got {type(feedback).__name__}")
    return None, feedback


class _Function(Function):
    """``torch.autograd.Function`` in the ``setup_context`` form; falign calls its subclasses through
    :func:`apply_function`."""

    generate_vmap_rule = True


def apply_function(function: type[Function], *args: Any) -> Any:
    """``function.apply(*args)``, fast in eager mode.

    ``Function.apply`` binds the arguments to ``forward``'s signature with ``inspect`` on every call when
    ``setup_context`` is defined — tens of microseconds per layer per step. falign always passes every
    argument positionally, so in eager mode this calls the C++ entry point directly (which runs ``forward``
    and then ``setup_context``); inside ``torch.func`` transforms and ``torch.compile`` it calls
    ``function.apply``, PyTorch's full path (which dynamo and functorch know).
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(Function, function).apply(*args)  # type: ignore[misc]  # the C++ entry point (see above)


_BACKPROP_MODE = 0


@contextlib.contextmanager
def backprop_mode() -> Iterator[None]:
    """Backward passes run inside this context use ``B = W`` in every feedback function: the true
    gradient (backprop) through a graph built by a converted model.

    With ``loss.backward(retain_graph=True)`` first (the rule's gradients), one more
    ``torch.autograd.grad(loss, ...)`` inside this context gives the true gradients at the same
    weights and batch without a second forward pass or a copy of the model. The direct rules send
    ``g W``; nothing is drawn or recorded. Process-wide; not for concurrent backward passes.
    """
    global _BACKPROP_MODE
    _BACKPROP_MODE += 1
    try:
        yield
    finally:
        _BACKPROP_MODE -= 1


def _feedback_for_backward(weight: Tensor, feedback: Tensor | None, feedback_fn) -> Tensor:
    """``W`` in backprop mode, else ``B`` as given or made from the saved ``W`` (in ``W``'s dtype, which under
    autocast is the lower precision)."""
    if _BACKPROP_MODE:
        return weight
    if feedback_fn is None:
        assert feedback is not None, "a feedback function gets B or a function making it"
        return feedback
    b = feedback_fn(weight)
    return b if b.dtype == weight.dtype else b.to(weight.dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products and convolutions in on this device now; ``None`` when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _cast(t, dtype: torch.dtype):
    return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype else t


def _autocast(function, x: Tensor, weight: Tensor, bias: Tensor | None, feedback, *rest):
    """``function.apply`` as autocast runs ``F.linear`` and the convolutions: under ``torch.autocast`` the input,
    weight, bias and feedback are cast (differentiably, so parameters still get float32 gradients) to the
    autocast dtype and the layer — forward and the rule's backward — runs in it; otherwise unchanged."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return apply_function(function, x, weight, bias, feedback, *rest)
    with torch.autocast(x.device.type, enabled=False):
        return apply_function(function, _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype),
                              _cast(feedback, dtype), *rest)


# ---- the eager fast path: PyTorch's own backward with B where it saved W ----------------------------------
# Private autograd state, feature-detected: without it (another torch), every call takes the Function path.
_hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_FAST = _hooks_enabled is not None and _top_hooks is not None
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)  # unknown: Function path
_warned_no_swap: set[str] = set()  # the kinds of op that warned
_DOUBLE_BACKWARD = 0


@contextlib.contextmanager
def double_backward() -> Iterator[None]:
    """Forward passes run inside this context build a graph whose backward can be differentiated again: a
    ``create_graph=True`` backward (gradient penalties, Hessian-vector products) differentiates the rule's signal
    ``g B`` once more, ``B`` a constant.

    Outside it, eager forward passes of :func:`feedback_linear` and :func:`feedback_conv` take the faster
    saved-tensor path, whose backward refuses ``create_graph=True`` with an error naming this context (PyTorch
    would let ``∂/∂W`` flow through the ``B`` it was handed in ``W``'s place). ``torch.func`` transforms need no
    context: they always take the ``autograd.Function`` path. Process-wide; nests.
    """
    global _DOUBLE_BACKWARD
    _DOUBLE_BACKWARD += 1
    try:
        yield
    finally:
        _DOUBLE_BACKWARD -= 1


def _fast_path(x: Tensor, feedback: Tensor | None) -> bool:
    """Whether this call may take the saved-tensor path: ``x`` needs a gradient, ``B`` needs none (Kolen–Pollack's
    ``∂B`` comes from the Function) and :func:`_fast_ok`."""
    return x.requires_grad and (feedback is None or not feedback.requires_grad) and _fast_ok()


def _fast_ok() -> bool:
    """Eager, grad mode on, no other saved-tensor hooks (the user's ``save_on_cpu``, activation checkpointing:
    theirs see every tensor), not inside :func:`double_backward`. Under ``torch.compile``, ``torch.func``
    transforms, tracing or autocast the Function path runs."""
    return (_FAST and not _DOUBLE_BACKWARD and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and not torch.jit.is_tracing() and not _any_autocast()
            and _hooks_enabled() and _top_hooks(False) is None)  # type: ignore[misc]


class _Swap:
    """One weight ``W`` whose saved copy the backward reads as ``B``: ``feedback``, or ``feedback_fn(W)`` built
    from the saved ``W`` in the backward (the sign rules); ``found`` once the op saved it."""

    __slots__ = ("feedback", "feedback_fn", "found", "version_b", "weight")

    def __init__(self, weight: Tensor, feedback: Tensor | None, feedback_fn: Callable[[Tensor], Tensor] | None):
        self.weight, self.feedback, self.feedback_fn, self.found = weight, feedback, feedback_fn, False
        self.version_b = None if feedback is None else feedback._version


class _SwapSaved:
    """Saved-tensor hooks for one call of ``F.linear``, a convolution or PyTorch's fused LSTM layer: where the op
    saves a weight ``W`` (or its transpose, as ``F.linear``'s matrix product does), the backward unpacks ``B`` (or
    ``Bᵀ``), so PyTorch's own backward formula computes the input (and across-time) signal through ``B`` and, from
    the saved activations, the exact ``∂W``, ``∂b``. In :func:`backprop_mode` the saved ``W`` itself.

    Saved-tensor hooks turn off autograd's check that a saved tensor was not changed in place before the backward,
    so the hooks do it (same error). With ``detach``, every other saved tensor is kept detached: an op that saves
    its own outputs (the LSTM layer) would otherwise hold itself in a reference cycle through its graph.
    """

    __slots__ = ("detach", "swaps")

    def __init__(self, swaps: Sequence[_Swap], detach: bool = False):
        self.swaps, self.detach = swaps, detach

    @property
    def swapped(self) -> bool:
        """Whether the op saved every weight where the hooks look for it."""
        return all(s.found for s in self.swaps)

    def pack(self, t: Tensor) -> tuple:
        for s in self.swaps:
            if t is s.weight:
                s.found = True
                return (t, t._version, s, False)
        base = t._base  # only a view can be Wᵀ (one property read, not one per weight)
        if base is not None and t.dim() == 2:
            for s in self.swaps:
                w = s.weight
                if (base is w or t.data_ptr() == w.data_ptr()) \
                        and t.shape[0] == w.shape[1] and t.shape[1] == w.shape[0] \
                        and t.stride(0) == w.stride(1) and t.stride(1) == w.stride(0):  # Wᵀ, a view of W
                    s.found = True
                    return (t, t._version, s, True)
        return (t.detach() if self.detach else t, t._version, None, False)

    @staticmethod
    def unpack(packed: tuple) -> Tensor:
        t, version, swap, transposed = packed
        if t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a tensor of shape {tuple(t.shape)} saved by a falign layer is at version {t._version}; expected "
                f"version {version} instead (the in-place change came between the forward and the backward pass)")
        if swap is None or _BACKPROP_MODE:
            return t
        if torch.is_grad_enabled():  # a create_graph backward: PyTorch re-attaches W's gradient edge to what we return
            raise RuntimeError(
                "falign: this backward builds a graph (create_graph=True) through a layer whose forward pass took "
                "falign's fast path, whose rule signal cannot be differentiated again; run the forward pass inside "
                "`with falign.functional.double_backward():` (gradient penalties, Hessian-vector products)")
        feedback = swap.feedback
        if feedback is not None and feedback._version != swap.version_b:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"the feedback matrix B of shape {tuple(feedback.shape)} is at version {feedback._version}; expected "
                f"version {swap.version_b} instead (B changed between the forward and the backward pass)")
        b = _feedback_for_backward(swap.weight, feedback, swap.feedback_fn)
        return b.t() if transposed else b


def _swap_saved_call(op: Callable[..., Any], swaps: Sequence[_Swap], *args: Any,
                     detach: bool = False) -> tuple[Any, bool]:
    """``(op(*args), every weight of swaps found)`` with the op's saved weights swapped for their ``B`` in its
    backward (:class:`_SwapSaved`). Callers check :func:`_fast_path` first."""
    hooks = _SwapSaved(swaps, detach)
    with saved_tensors_hooks(hooks.pack, hooks.unpack):
        result = op(*args)
    return result, hooks.swapped


def _swapped(op: Callable[..., Tensor], function: type[Function], x: Tensor, weight: Tensor, bias: Tensor | None,
             feedback: Tensor | None, feedback_fn: Callable[[Tensor], Tensor] | None, *rest: Any) -> Tensor:
    """``op(x, W, b, *rest)`` whose backward uses ``B`` for the input signal (:class:`_SwapSaved`); if the op did not
    save ``W`` where the hooks recognise it (another torch's formula), the Function path, with one warning."""
    y, swapped = _swap_saved_call(op, (_Swap(weight, feedback, feedback_fn),), x, weight, bias, *rest)
    if swapped:
        return y
    warn_no_swap("linear/convolution")
    return apply_function(function, x, weight, bias, feedback, feedback_fn, *rest)


def warn_no_swap(what: str) -> None:
    """Once per process and kind of op: the fast path found no saved weight to swap and the Function path runs
    instead."""
    if what not in _warned_no_swap:
        _warned_no_swap.add(what)
        warnings.warn(f"falign: this torch's {what} backward did not save the weight where falign's fast path looks "
                      f"for it; using the slower autograd.Function path", RuntimeWarning, stacklevel=4)


class _FeedbackLinear(_Function):
    @staticmethod
    def forward(x, weight, bias, feedback, feedback_fn):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback, feedback_fn = inputs
        # A lazy B is built in the backward from the saved W, so autograd's version check still
        # catches an in-place change of W between forward and backward.
        ctx.save_for_backward(x, weight, feedback)
        ctx.feedback_fn = feedback_fn
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, feedback = ctx.saved_tensors
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        grad_x = g.matmul(_feedback_for_backward(weight, feedback, ctx.feedback_fn)) if need_x else None
        grad_w = _weight_grad_linear(g, x) if (need_w or need_fb) else None
        grad_b = _bias_grad_linear(g) if (ctx.has_bias and need_b) else None
        # Kolen-Pollack: B receives W's gradient; autograd gives each parameter its own copy.
        return grad_x, grad_w if need_w else None, grad_b, grad_w if need_fb else None, None


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: FeedbackSource) -> Tensor:
    """Linear map whose input gradient uses ``feedback`` in place of ``weight``.

    Forward: ``y = x Wᵀ + b``. Backward: ``∂x = g B``, ``∂W = gᵀ x``, ``∂b = Σ g`` (summed over
    every leading dimension), and ``∂B = gᵀ x`` when ``B`` requires a gradient.

    ``feedback`` is ``B`` itself or a function ``W ↦ B`` called in the backward pass only when the
    input gradient is needed (used by the sign-concordant rules, which derive ``B`` from ``W``).

    Shape:
        - x: ``(*, in)``, any number of leading dimensions
        - weight, B: ``(out, in)``; bias: ``(out,)`` or ``None``
        - output: ``(*, out)``
    """
    tensor, fn = _split(feedback, weight)
    if _fast_path(x, tensor):
        return _swapped(F.linear, _FeedbackLinear, x, weight, bias, tensor, fn)
    return _autocast(_FeedbackLinear, x, weight, bias, tensor, fn)


class _FeedbackConv(_Function):
    @staticmethod
    def forward(x, weight, bias, feedback, feedback_fn, stride, padding, dilation, groups, transposed=False,
                output_padding=None):
        return _convolution(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback, feedback_fn, stride, padding, dilation, groups, *rest = inputs
        transposed, output_padding = [*rest, False, None][:2]
        ctx.save_for_backward(x, weight, feedback)
        ctx.feedback_fn = feedback_fn
        ctx.conf = (stride, padding, dilation, groups, None if bias is None else [bias.shape[0]], transposed,
                    output_padding)

    @staticmethod
    def backward(ctx, g):
        stride, padding, dilation, groups, bias_sizes, transposed, output_padding = ctx.conf
        x, weight, feedback = ctx.saved_tensors
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        matrix = _feedback_for_backward(weight, feedback, ctx.feedback_fn) if need_x else weight
        mask = [need_x, need_w or need_fb, bias_sizes is not None and need_b]
        n = weight.dim() - 2
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x, matrix, bias_sizes, stride, padding, dilation, transposed, output_padding or [0] * n, groups,
            mask
        )
        return (grad_x, grad_w if need_w else None, grad_b, grad_w if need_fb else None, None,
                None, None, None, None, None, None)


def feedback_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: FeedbackSource,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    transposed: bool = False,
    output_padding: Sequence[int] | None = None,
) -> Tensor:
    """N-d convolution (1d, 2d, 3d) whose input gradient is the transposed convolution with ``B``; with
    ``transposed=True`` a transposed convolution whose input gradient is the convolution with ``B``.

    ``padding`` is numeric and symmetric; callers pad the input first for other padding modes.
    The weight and bias gradients are backprop's local ones; ``∂B = ∂W`` when ``B`` requires grad.
    ``feedback`` is ``B`` or a function ``W ↦ B`` evaluated in the backward pass.

    Shape:
        - x: ``(N, C_in, *spatial)``; weight, B: ``(C_out, C_in/groups, *kernel)`` (transposed:
          ``(C_in, C_out/groups, *kernel)``)
        - output: ``(N, C_out, *spatial_out)``
    """
    tensor, fn = _split(feedback, weight)
    rest = (list(stride), list(padding), list(dilation), groups, transposed,
            list(output_padding) if output_padding is not None else None)
    if _fast_path(x, tensor):
        return _swapped(_convolution, _FeedbackConv, x, weight, bias, tensor, fn, *rest)
    return _autocast(_FeedbackConv, x, weight, bias, tensor, fn, *rest)


def _convolution(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, transposed: bool, output_padding: list[int] | None) -> Tensor:
    """``torch.convolution`` in :class:`_FeedbackConv`'s argument order."""
    return torch.convolution(x, weight, bias, stride, padding, dilation, transposed,
                             output_padding or [0] * (weight.dim() - 2), groups)


# ---- direct rules --------------------------------------------------------------------------------------
class ErrorTap:
    """The output error ``e = ∂L/∂output`` (and the target) of a converted model, for the direct rules.

    One tap is shared by a model's direct-rule layers. Every forward pass of the model's root opens an
    :class:`ErrorSession` (:meth:`begin`, a forward pre-hook installed by :func:`falign.convert`), the
    layers that run inside it keep a reference to it, and :meth:`end` (a forward hook) passes the output
    through an identity autograd node that records, in the backward, the incoming gradient into that
    session before any layer's backward runs. A layer's backward therefore always reads the error of its
    own forward pass: two forward passes before their backward passes are safe, and a converted
    submodule called on its own (no session) raises instead of reusing a stale error. The target given
    by :func:`falign.set_target` before a forward pass is kept by that pass's session.

    ``output_sizes`` is ``(entries per sample, positions)`` of the model's output, measured on the first
    forward pass by the probe of :func:`falign.convert` (``positions`` are the dimensions between the
    batch and the features, e.g. ``(T,)`` for a ``(N, T, C)`` output); direct-rule layers size their
    feedback matrices from it.
    """

    def __init__(self) -> None:
        self._open: list[ErrorSession] = []
        self.output_sizes: tuple[int, tuple[int, ...]] | None = None
        self.target: Tensor | None = None

    def begin(self) -> None:
        session = ErrorSession()
        session.target, self.target = self.target, None
        self._open.append(session)

    def end(self, output: Tensor) -> Tensor:
        session = self._open.pop() if self._open else None
        if session is None or not isinstance(output, Tensor) or not output.requires_grad:
            return output
        return apply_function(_Tap, output, session)

    def close(self) -> ErrorSession | None:
        """Close the innermost session without tapping an output, and return it: a pipeline stage whose output
        is not the model's fills in ``session.error`` itself (:mod:`falign.app.pipeline`)."""
        return self._open.pop() if self._open else None

    def abort(self) -> None:
        """Close the innermost session after a forward pass that raised."""
        if self._open:
            self._open.pop()

    @property
    def current(self) -> ErrorSession | None:
        """The session of the forward pass running now (``None`` outside the model's forward)."""
        return self._open[-1] if self._open else None

    def __getstate__(self):  # sessions and targets are transient: never saved or copied
        return {"_open": [], "output_sizes": self.output_sizes, "target": None}


OUTSIDE_FORWARD_CAUSES = (
    "e.g. torch.utils.checkpoint.checkpoint_sequential(model, ...) calls the layers without the model, and "
    "torch.utils.checkpoint with use_reentrant=True recomputes them in the backward pass: checkpoint inside the "
    "model's forward with use_reentrant=False, which the direct rules support")


class ErrorSession:
    """The output error (filled in by the backward) and the target of one forward pass."""

    __slots__ = ("error", "target")

    def __init__(self) -> None:
        self.error: Tensor | None = None
        self.target: Tensor | None = None

    @staticmethod
    def read(session: ErrorSession | None) -> Tensor:
        if session is None:
            raise RuntimeError(
                "direct feedback: this layer ran outside a forward pass of the converted model (a submodule "
                f"called on its own; {OUTSIDE_FORWARD_CAUSES}), so there is no output error to project. Call the "
                "whole model, or compute true gradients inside falign.functional.backprop_mode()."
            )
        if session.error is None:
            raise RuntimeError(
                "direct feedback: no output error was recorded for this forward pass: the backward did not "
                "start from the model's output (e.g. a loss on an intermediate activation). The direct rules "
                "project the error of the model output; use falign.functional.backprop_mode() for other "
                "gradients."
            )
        return session.error


class _Tap(_Function):
    @staticmethod
    def forward(output, session):
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.session = inputs[1]

    @staticmethod
    def backward(ctx, g):
        # Under create_graph the error keeps its graph, so a double backward differentiates q·D as well.
        ctx.session.error = g if torch.is_grad_enabled() else g.detach()
        return g, None


PER_POSITION, PER_SAMPLE = "per-position", "per-sample"

Projector = Callable[[ErrorSession | None, int], Tensor]
"""``(session, n_out) ↦ q``: the quantity a direct rule projects (the output error, or the target)."""


def _per_position(q: Tensor, x_shape: torch.Size, n_out: int) -> Tensor:
    if q.shape[:-1] != x_shape[:-1] and q.numel() == x_shape[:-1].numel() * n_out:
        q = q.reshape(*x_shape[:-1], n_out)  # e.g. an (N,) output of one feature per sample
    if q.shape[:-1] != x_shape[:-1]:
        raise RuntimeError(f"direct feedback: the output error has shape {tuple(q.shape)} but this layer's input "
                           f"has shape {tuple(x_shape)}; per-position feedback needs the same leading dimensions")
    return q


def _per_sample(q: Tensor, x_shape: torch.Size, entries: int) -> Tensor:
    n = x_shape[0] if len(x_shape) > 1 else 1
    per_sample = q.numel() // n if n else entries
    if per_sample != entries or (n and q.numel() % n):
        raise RuntimeError(
            f"direct feedback: the output error has {per_sample} features per sample (shape {tuple(q.shape)}) but "
            f"this layer's feedback matrix was sized for {entries} at the first forward pass; the output size of "
            f"a model trained by a direct rule must stay fixed")
    return q.reshape(n, entries)


def _project(q: Tensor, feedback: Tensor, x_shape: torch.Size, mode: str) -> Tensor:
    """``q D`` shaped like the layer input ``x`` (see :mod:`falign.rules.direct` for the two modes)."""
    q = q.to(device=feedback.device, dtype=feedback.dtype)
    if mode == PER_POSITION:
        return _per_position(q, x_shape, feedback.shape[0]).matmul(feedback)
    signal = _per_sample(q, x_shape, feedback.shape[0]).mm(feedback)
    if signal.shape[1] == x_shape[1:].numel() or len(x_shape) < 2:
        return signal.reshape(x_shape)
    n = signal.shape[0]
    shape = (n,) + (1,) * (len(x_shape) - 2) + (x_shape[-1],)
    return signal.reshape(shape).expand(x_shape)


def _project_grad(q: Tensor, x: Tensor, feedback: Tensor, mode: str) -> Tensor:
    """``∂⟨q D, x⟩/∂D``, the adjoint of :func:`_project` (direct Kolen–Pollack's update of ``D``)."""
    q = q.to(device=feedback.device, dtype=feedback.dtype)
    if mode == PER_POSITION:
        q = _per_position(q, x.shape, feedback.shape[0])
        return q.reshape(-1, q.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    q2 = _per_sample(q, x.shape, feedback.shape[0])
    n = q2.shape[0]
    if x.shape[1:].numel() == feedback.shape[1]:
        xs = x.reshape(n, feedback.shape[1])
    else:  # a Linear layer over positions: the signal was broadcast, its adjoint sums the positions
        xs = x.reshape(n, x.shape[1:-1].numel(), x.shape[-1]).sum(1)
    return q2.t().mm(xs)


class _DirectFeedbackLinear(_Function):
    @staticmethod
    def forward(x, weight, bias, feedback, session, mode, projector):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback, session, mode, projector = inputs
        ctx.save_for_backward(x, weight, feedback)
        ctx.session, ctx.mode, ctx.projector = session, mode, projector
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g):
        x, weight, feedback = ctx.saved_tensors
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        grad_x = grad_fb = None
        if need_x and _BACKPROP_MODE:
            grad_x = g.matmul(weight)
        elif need_x or need_fb:
            q = ctx.projector(ctx.session, feedback.shape[0])
            grad_x = _project(q, feedback, x.shape, ctx.mode) if need_x else None
            grad_fb = _project_grad(q, x, feedback, ctx.mode) if need_fb else None
        grad_w = _weight_grad_linear(g, x) if need_w else None
        grad_b = _bias_grad_linear(g) if (ctx.has_bias and need_b) else None
        return grad_x, grad_w, grad_b, grad_fb, None, None, None


def _error(session: ErrorSession | None, n_out: int) -> Tensor:
    return ErrorSession.read(session)


def direct_feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                           session: ErrorSession | None, mode: str = PER_POSITION,
                           projector: Projector = _error) -> Tensor:
    """Linear map whose input signal is ``q D`` (direct feedback alignment, Nøkland 2016, and relatives).

    ``q`` is ``projector(session, n_out)``, evaluated in the backward pass: by default the model output's
    error read from ``session`` (the forward pass's :class:`ErrorSession`). Weight and bias gradients are
    the local ``gᵀ x`` and ``Σ g``; ``D`` receives ``∂⟨q D, x⟩/∂D`` when it requires a gradient.

    Shape:
        - x: ``(*, in)``; weight: ``(out, in)``
        - ``per-position``: D ``(n_out, in)``, q ``(*, n_out)`` with x's leading dimensions
        - ``per-sample``: D ``(E, in)``, q ``(N, …)`` with E entries per sample
    """
    return _autocast(_DirectFeedbackLinear, x, weight, bias, feedback, session, mode, projector)


class _DirectFeedbackConv(_Function):
    @staticmethod
    def forward(x, weight, bias, feedback, session, projector, pad, pad_mode, stride, padding, dilation, groups,
                transposed=False, output_padding=None):
        xp = F.pad(x, pad, mode=pad_mode) if pad is not None else x
        n = weight.dim() - 2
        return torch.convolution(xp, weight, bias, stride, padding, dilation, transposed,
                                 output_padding or [0] * n, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback, session, projector, pad, pad_mode, stride, padding, dilation, groups, *rest = inputs
        transposed, output_padding = [*rest, False, None][:2]
        ctx.save_for_backward(x, weight, feedback)
        ctx.session, ctx.projector = session, projector
        ctx.pad = (pad, pad_mode)
        ctx.conf = (stride, padding, dilation, groups, None if bias is None else [bias.shape[0]], transposed,
                    output_padding)

    @staticmethod
    def backward(ctx, g):
        x, weight, feedback = ctx.saved_tensors
        stride, padding, dilation, groups, bias_sizes, transposed, output_padding = ctx.conf
        pad, pad_mode = ctx.pad
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        n = weight.dim() - 2
        true_x = need_x and _BACKPROP_MODE
        xp = F.pad(x, pad, mode=pad_mode) if pad is not None else x
        mask = [true_x, need_w, bias_sizes is not None and need_b]
        grad_xp, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, xp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding or [0] * n, groups,
            mask
        )
        grad_x = grad_fb = None
        if true_x:
            grad_x = grad_xp if pad is None else _unpad_grad(x, grad_xp, pad, pad_mode)
        elif need_x or need_fb:
            q = ctx.projector(ctx.session, feedback.shape[0])
            grad_x = _project(q, feedback, x.shape, PER_SAMPLE) if need_x else None
            grad_fb = _project_grad(q, x, feedback, PER_SAMPLE) if need_fb else None
        return grad_x, grad_w, grad_b, grad_fb, None, None, None, None, None, None, None, None, None, None


def _unpad_grad(x: Tensor, grad_xp: Tensor, pad: list[int], mode: str) -> Tensor:
    """Gradient w.r.t. ``x`` of ``F.pad(x, pad, mode)`` given the gradient of the padded tensor."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.pad(leaf, pad, mode=mode), leaf, grad_xp)
    return grad


def direct_feedback_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: Tensor,
    session: ErrorSession | None,
    pad: Sequence[int] | None,
    pad_mode: str,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    projector: Projector = _error,
    transposed: bool = False,
    output_padding: Sequence[int] | None = None,
) -> Tensor:
    """Convolution (``transposed=True``: transposed convolution) whose input signal is ``q D`` reshaped to the
    (unpadded) input (the direct rules).

    ``pad``/``pad_mode`` is the explicit padding applied before the convolution (as ``F.pad``), so
    ``D`` always refers to the layer's own input. Shape: ``D`` is ``(E, C·H·W)`` of that input, ``E`` the
    number of entries of ``q`` per sample.
    """
    return _autocast(
        _DirectFeedbackConv, x, weight, bias, feedback, session, projector, None if pad is None else list(pad),
        pad_mode, list(stride), list(padding), list(dilation), groups, transposed,
        list(output_padding) if output_padding is not None else None,
    )
