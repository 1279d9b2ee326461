"""``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` whose backward-through-time follows a learning rule.

A recurrent layer transports two weights backwards: ``W_ih`` (to the input ``x_t``) and ``W_hh`` (across
time, to ``h_{t-1}``); an LSTM with ``proj_size`` also ``W_hr`` (from the projected ``h_t`` to the cell's
output). The rule replaces each transpose by its own feedback matrix, and nothing else:

==============================  ===========================  ===============================
signal                          backprop                     rule
==============================  ===========================  ===============================
to the input ``x_t``            ``δ_t W_ih``                 ``δ_t B_ih``
to ``h_{t-1}`` (across time)    ``δ_t W_hh`` (+ gate paths)  ``δ_t B_hh`` (+ the same paths)
to ``o_t ⊙ tanh c_t``           ``g_t W_hr``                 ``g_t B_hr``
==============================  ===========================  ===============================

``δ_t`` are the gate pre-activation gradients (``[i, f, g, o]``, ``[r, z, n]`` — for the GRU the ``n`` part
of the recurrent signal is ``δ_n ⊙ r``, as ``r`` multiplies ``W_hn h``). Weight-free paths stay exact:
the LSTM cell state ``c_{t-1} → c_t`` (``⊙ f_t``) and the GRU's ``z_t ⊙ h_{t-1}``. Weight and bias gradients
are backprop's local ones, e.g. ``∂W_hh = Σ_t δ_tᵀ h_{t-1}``. Direct rules send ``h_{t-1}`` the projected
output error ``e D_hh`` at every step instead of ``δ_t W_hh``, and ``x_t`` receives ``e D_ih``.

The views ``feedback.weight_ih_l{k}[_reverse]``, ``feedback.weight_hh_l{k}[_reverse]`` (and
``weight_hr_l{k}[_reverse]``) hold the feedback matrices. Each layer is one autograd function: its forward is
PyTorch's own recurrence (the same fused kernels as the plain layer); its backward recomputes the gates of
all steps from the saved states (two matrix products), then runs the backward through time step by step
with the rule's matrices, in work buffers the layer keeps between steps (``_scratch``, not state).
A converted ``nn.LSTM`` on CPU in float32 (no ``proj_size``, padded input, a layer-by-layer rule) runs PyTorch's own
fused oneDNN layer ops in both directions of the pass instead: the forward ``aten::mkldnn_rnn_layer`` and its
backward ``aten::mkldnn_rnn_layer_backward``, called with ``B_ih``, ``B_hh`` where backprop passes ``W_ih``,
``W_hh`` (the op uses them only to transport the gate gradients; the gates come from the forward's workspace).
Eagerly (no ``torch.compile``, ``torch.func``, other saved-tensor hooks, or ``kp``'s trained ``B``; under autocast
too, as the recurrence runs with autocast off) the op runs as autograd's own node, under saved-tensor hooks that
hand its backward ``B_ih``, ``B_hh`` where it saved ``W_ih``, ``W_hh`` (as the linear and convolution layers' fast
path does): no Python backward at all. A batched LSTM without dropout between layers runs all its layers in one call
of ``torch._VF.lstm`` (what ``nn.LSTM`` itself runs, the same layer op per layer and direction) under those hooks,
without falign's Python loop over layers (bit-equal gradients, tested). On CUDA every cell (RNN, GRU, LSTM; float32
or float64, no ``proj_size``, padded input, a layer-by-layer rule) runs cuDNN's kernels the same way:
``aten::_cudnn_rnn`` with ``W``'s flat weight buffer, ``aten::_cudnn_rnn_backward`` with a flat buffer of the rule's
``B`` (and a copy of the forward's reserve, which the op overwrites, so that a retained graph can be differentiated
twice). Everything else, and any torch whose ops or schemas differ (checked once per kind and device, with one
warning), keeps the Python backward through time, which is the reference (``USE_FUSED = False`` forces it).
Every option works: layers, ``bidirectional``, ``batch_first``, unbatched input, ``dropout``, ``bias``,
``nonlinearity``, ``proj_size`` and ``PackedSequence`` input (not with the direct rules, which need a padded
batch). Without gradients (evaluation) or under ``bp`` the PyTorch forward runs. A second derivative
through a converted recurrent layer is not supported (it raises). Under ``torch.autocast`` the recurrence runs in
the parameters' dtype (PyTorch's own layers differ by kind there: the CPU GRU keeps float32, the CPU LSTM fails
in oneDNN), and its output has that dtype.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from falign import functional as FF
from falign.nn import layers
from falign.nn import probe as _probe
from falign.nn.containers import FeedbackContainer

__all__ = ["FAGRU", "FALSTM", "FARNN"]


def _direct_signal(direct, d: Tensor, n: int, width: int, spec) -> Tensor:
    """``e D`` for the ``(N, width)`` state (rows in the order of the packed batch)."""
    session, mode, projector = direct
    q = projector(session, d.shape[0])
    signal = FF._project(q, d, torch.Size((n, width)), mode)
    return signal if spec.perm is None else signal.index_select(0, spec.perm)


def _direct_grad(direct, d: Tensor, states: Tensor, rows: Tensor, n: int, spec) -> Tensor:
    """``∂/∂D Σ_t ⟨e D, h_{t-1}⟩``: the adjoint of the signal sent at every step."""
    session, mode, projector = direct
    q = projector(session, d.shape[0])
    total = states.new_zeros(n, states.shape[1]).index_add_(0, rows, states)
    if spec.unperm is not None:
        total = total.index_select(0, spec.unperm)
    return FF._project_grad(q, total, d, mode)


def _route_of(view, x: Tensor, signal: bool) -> tuple[Tensor | None, tuple[Any, Any]]:
    """A view's answer for one weight: ``(feedback tensor input, (W ↦ B function, direct route))``."""
    kind, source = view.route(x, signal)
    if kind is layers.PLAIN:
        return None, (None, None)
    if kind is layers.DIRECT:
        return source[0], (None, source[1:])
    if isinstance(source, Tensor):
        return source, (None, None)
    return None, (source, None)


def _offsets(sizes: list[int]) -> list[int]:
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    return offsets


def _previous(steps: tuple[Tensor, ...], initial: Tensor, prev: int | None, m: int) -> Tensor:
    """The state before a step of ``m`` rows: the previous step's rows (a view), completed by the initial state
    for sequences that start here (the reverse direction of a packed batch)."""
    if prev is None:
        return initial if m == initial.shape[0] else initial[:m]
    last = steps[prev]
    size = last.shape[0]
    if size == m:
        return last
    if size > m:
        return last[:m]
    return torch.cat((last, initial[size:m]))


def _shift_index(sizes: list[int], offsets: list[int], order: list[int], n: int, device) -> Tensor:
    """For every row (time-major), the row of its previous state in ``cat((initial, states))``."""
    index = torch.empty(sum(sizes), dtype=torch.long, device=device)
    prev: tuple[int, int] | None = None
    for t in order:
        m, off = sizes[t], offsets[t]
        keep = 0 if prev is None else min(m, prev[1])
        if keep and prev is not None:
            index[off:off + keep] = torch.arange(keep, device=device) + n + prev[0]
        index[off + keep:off + m] = torch.arange(keep, m, device=device)
        prev = (off, m)
    return index


def _previous_segments(states: Tensor, initial: Tensor, sizes: list[int], order: list[int]
                       ) -> list[tuple[slice, Tensor]]:
    """Every row's previous state (``h_{t-1}`` of each row of ``h_t``) as ``(rows, tensor)`` pieces that cover the
    time-major rows: two views for a padded batch (a shift by one step), one gathered tensor for a packed one."""
    n, total = initial.shape[0], states.shape[0]
    if len(set(sizes)) == 1:
        if len(sizes) == 1:
            return [(slice(0, n), initial)]
        if order[0] == 0:
            return [(slice(0, n), initial), (slice(n, total), states[:total - n])]
        return [(slice(total - n, total), initial), (slice(0, total - n), states[n:])]
    index = _shift_index(sizes, _offsets(sizes), order, n, states.device)
    return [(slice(0, total), torch.cat((initial, states)).index_select(0, index))]


W_IH, W_HH, B_IH, B_HH, W_HR, FB_IH, FB_HH, FB_HR = range(8)  # one direction's inputs of _Layer, in order
PER_DIRECTION = 8


class _LayerSpec:
    """The non-tensor configuration of one layer (every direction): sizes of the time steps, and for each
    direction and transported weight how the backward replaces it (``routes[d][name]``: ``(fn, direct)``)."""

    __slots__ = ("batch_sizes", "bias", "dirs", "fused", "layer", "mode", "perm", "proj", "routes", "sizes", "unperm",
                 "work", "x_bf_shape")

    def __init__(self, mode: str, sizes: list[int], batch_sizes: Tensor | None, dirs: int, bias: bool, proj: bool,
                 perm: Tensor | None, unperm: Tensor | None):
        self.mode, self.sizes, self.batch_sizes, self.dirs = mode, sizes, batch_sizes, dirs
        self.bias, self.proj, self.perm, self.unperm = bias, proj, perm, unperm
        self.routes: list[dict[str, tuple[Any, Any]]] = [{} for _ in range(dirs)]
        self.x_bf_shape: torch.Size | None = None
        self.layer = 0
        self.work: dict = {}
        self.fused = ""  # "mkldnn" or "cudnn": the layer runs PyTorch's fused kernels forward and backward


def _run_pytorch(mode: str, x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor], spec: _LayerSpec):
    """PyTorch's own recurrence (its fused kernels) for one layer, every direction: ``(out, h_n, c_n)``."""
    bi = spec.dirs == 2
    if x.is_cuda:
        # One layer's weights can be views into the model's cuDNN flat buffer (nn.RNN.flatten_parameters); cuDNN's
        # look-up of that buffer then reads another layer's weights for a layer without biases (seen on torch 2.11:
        # a 2-layer LSTM without bias, forward off by 0.06). Copies have storages of their own.
        params = [p.clone() for p in params]
    if mode == "LSTM" and spec.proj:
        with warnings.catch_warnings():  # PyTorch's note that oneDNN has no projections: its own kernel runs
            warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
            spec.proj = False
            try:
                return _run_pytorch(mode, x, h0, c0, params, spec)
            finally:
                spec.proj = True
    if mode == "LSTM":
        if spec.batch_sizes is not None:
            return torch._VF.lstm(x, spec.batch_sizes, (h0, c0), params, spec.bias, 1, 0.0, False, bi)
        return torch._VF.lstm(x, (h0, c0), params, spec.bias, 1, 0.0, False, bi, False)
    fn = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}[mode]
    if spec.batch_sizes is not None:
        out, h_n = fn(x, spec.batch_sizes, h0, params, spec.bias, 1, 0.0, False, bi)
    else:
        out, h_n = fn(x, h0, params, spec.bias, 1, 0.0, False, bi, False)
    return out, h_n, h_n.new_empty(0)


# ---- PyTorch's fused LSTM layer (oneDNN, CPU) with the rule's matrices in its backward ------------------------
# ``aten::mkldnn_rnn_layer`` is the forward PyTorch's CPU LSTM runs per layer and direction; its backward,
# ``aten::mkldnn_rnn_layer_backward``, takes the weights as arguments and uses them only to transport the gate
# gradients (``δ_t W_ih`` to the input, ``δ_t W_hh`` across time): the gates themselves come from the forward's
# workspace. Called with the rule's ``B_ih``, ``B_hh`` in their place it is the rule's backward through time, at
# PyTorch's own speed. The ops are private: their schemas are checked (and one tiny call made) on first use; if
# either fails the Python backward through time runs instead, after one warning.
USE_FUSED = True
"""Set to ``False`` to run every converted LSTM through the Python backward through time (the reference)."""
FUSED_CALLS = {"fused": 0, "python": 0, "saved_hooks": 0}
"""How many calls of converted recurrent modules ran the fused kernels and how many the Python backward, and how
many layers ran oneDNN's op under autograd's own node with the saved weights swapped (tests)."""
_LSTM_MODE = 2  # the LSTM cell kind of PyTorch's oneDNN layer op
_FUSED_SCHEMAS = {
    "mkldnn_rnn_layer": ("input", "weight0", "weight1", "weight2", "weight3", "hx_", "cx_", "reverse", "batch_sizes",
                         "mode", "hidden_size", "num_layers", "has_biases", "bidirectional", "batch_first", "train"),
    "mkldnn_rnn_layer_backward": ("input", "weight1", "weight2", "weight3", "weight4", "hx_", "cx_tmp", "output",
                                  "hy_", "cy_", "grad_output", "grad_hy", "grad_cy", "reverse", "mode",
                                  "hidden_size", "num_layers", "has_biases", "train", "bidirectional", "batch_sizes",
                                  "batch_first", "workspace"),
}
_CUDNN_MODES = {"RNN_RELU": 0, "RNN_TANH": 1, "LSTM": 2, "GRU": 3}  # cuDNN's cell kinds, as PyTorch numbers them
_CUDNN_SCHEMAS = {
    "_cudnn_rnn": ("input", "weight", "weight_stride0", "weight_buf", "hx", "cx", "mode", "hidden_size", "proj_size",
                   "num_layers", "batch_first", "dropout", "train", "bidirectional", "batch_sizes", "dropout_state"),
    "_cudnn_rnn_backward": ("input", "weight", "weight_stride0", "weight_buf", "hx", "cx", "output", "grad_output",
                            "grad_hy", "grad_cy", "mode", "hidden_size", "proj_size", "num_layers", "batch_first",
                            "dropout", "train", "bidirectional", "batch_sizes", "dropout_state", "reserve",
                            "output_mask"),
    "_cudnn_rnn_flatten_weight": ("weight_arr", "weight_stride0", "input_size", "mode", "hidden_size", "proj_size",
                                  "num_layers", "batch_first", "bidirectional"),
}
_fused_state: dict[str, bool] = {}


def fused_lstm_available() -> bool:
    """Whether this torch has the oneDNN LSTM layer ops with the schemas falign calls (checked once, with one
    tiny call against ``torch._VF.lstm``); warns once and returns ``False`` otherwise."""
    return _ops_usable("mkldnn", torch.device("cpu"))


def _mkldnn_usable() -> bool:
    """oneDNN is built in and :func:`fused_lstm_available` (its answer kept in ``_fused_state``: a dict look-up)."""
    known = _fused_state.get("mkldnn:cpu")
    return known if known is not None else (torch.backends.mkldnn.is_available() and fused_lstm_available())


def fused_cudnn_available(device: torch.device | str = "cuda") -> bool:
    """Whether this torch has cuDNN's RNN ops with the schemas falign calls and they run on ``device`` (checked
    once per device, with one tiny LSTM call against ``torch._VF.lstm``); warns once and returns ``False``
    otherwise."""
    return _ops_usable("cudnn", torch.device(device))


def _ops_usable(kind: str, device: torch.device) -> bool:
    key = f"{kind}:{device}"
    if key in _fused_state:
        return _fused_state[key]
    schemas = _FUSED_SCHEMAS if kind == "mkldnn" else _CUDNN_SCHEMAS
    why = None
    try:
        for name, args in schemas.items():
            schema = getattr(torch.ops.aten, name).default._schema
            got = tuple(a.name for a in schema.arguments)
            if got != args:
                why = f"aten::{name} has arguments {got}, falign expects {args}"
                break
        if why is None:
            why = _fused_probe() if kind == "mkldnn" else _cudnn_probe(device)
    except Exception as error:  # a missing op or a failing kernel both mean: not available
        why = f"{type(error).__name__}: {error}"
    _fused_state[key] = why is None
    if why is not None:
        what = "fused LSTM layer ops (oneDNN)" if kind == "mkldnn" else f"fused cuDNN RNN ops on {device}"
        warnings.warn(f"falign: PyTorch's {what} are not usable with this torch ({why}); converted recurrent layers "
                      f"there run the Python backward through time (same gradients, slower)", stacklevel=3)
    return _fused_state[key]


def _cudnn_probe(device: torch.device) -> str | None:
    """One tiny LSTM forward and backward through cuDNN's ops against ``torch._VF.lstm`` and autograd (B = W)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, generator=gen).to(device).requires_grad_()
    w = [torch.randn(*shape, generator=gen).to(device) for shape in ((8, 2), (8, 2), (8,), (8,))]
    h0 = torch.zeros(1, 2, 2, device=device)
    buf = torch.ops.aten._cudnn_rnn_flatten_weight([t.clone() for t in w], 4, 2, _CUDNN_MODES["LSTM"], 2, 0, 1, False,
                                                   False)
    with torch.enable_grad():
        out, _, _, reserve, _ = torch.ops.aten._cudnn_rnn(x.detach(), w, 4, buf, h0, h0, _CUDNN_MODES["LSTM"], 2, 0, 1,
                                                          False, 0.0, True, False, [], None)
        ref = torch._VF.lstm(x, (h0, h0), [t.clone() for t in w], True, 1, 0.0, True, False, False)[0]
        (dx_ref,) = torch.autograd.grad(ref.sum(), x)
    if not torch.allclose(out, ref.detach(), atol=1e-3):
        return "its forward does not match torch's LSTM"
    dx, _, _, dw = torch.ops.aten._cudnn_rnn_backward(x.detach(), w, 4, buf, h0, h0, out, torch.ones_like(out), None,
                                                      None, _CUDNN_MODES["LSTM"], 2, 0, 1, False, 0.0, True, False,
                                                      [], None, reserve, [True, True, True, True])
    if len(dw) != 4 or not torch.allclose(dx, dx_ref, atol=1e-3):
        return "its backward does not match autograd"
    return None


def _fused_probe() -> str | None:
    """One tiny forward and backward through the ops against ``torch._VF.lstm`` and autograd (B = W)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, generator=gen, requires_grad=True)
    w = [torch.randn(8, 2, generator=gen), torch.randn(8, 2, generator=gen), torch.randn(8, generator=gen),
         torch.randn(8, generator=gen)]
    h0 = torch.zeros(1, 2, 2)
    with torch.enable_grad():
        out, hy, cy, ws = torch.ops.aten.mkldnn_rnn_layer(x.detach(), *w, h0[0], h0[0], False, [], _LSTM_MODE, 2, 1,
                                                          True, False, False, True)
        ref = torch._VF.lstm(x, (h0, h0), [t.clone() for t in w], True, 1, 0.0, True, False, False)[0]
        (dx_ref,) = torch.autograd.grad(ref.sum(), x)
    if ws is None or not torch.allclose(out, ref.detach(), atol=1e-5):
        return "its forward does not match torch's LSTM"
    grads = torch.ops.aten.mkldnn_rnn_layer_backward(x.detach(), *w, h0[0], h0[0], out, hy, cy, torch.ones_like(out),
                                                     None, None, False, _LSTM_MODE, 2, 1, True, True, False, [], False,
                                                     ws)
    if len(grads) != 7 or not torch.allclose(grads[0], dx_ref, atol=1e-5):
        return "its backward does not match autograd"
    return None


def _fused_biases(p, spec: _LayerSpec, like: Tensor, detach: bool = True) -> tuple[Tensor, Tensor]:
    if spec.bias:
        return (p[B_IH].detach(), p[B_HH].detach()) if detach else (p[B_IH], p[B_HH])
    zeros = like.new_zeros(p[W_HH].shape[0])
    return zeros, zeros


def _fused_forward(x: Tensor, h0: Tensor, c0: Tensor, flat, spec: _LayerSpec):
    """oneDNN's LSTM layer forward for every direction: ``(out, h_n, c_n, *workspaces)``."""
    x = x.detach().contiguous()
    hidden = h0.shape[-1]
    outs, hs, cs, workspaces = [], [], [], []
    with torch.enable_grad():  # the op returns its workspace (what the backward reads) only with grad mode on
        for d in range(spec.dirs):
            p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
            b_ih, b_hh = _fused_biases(p, spec, x)
            out, hy, cy, ws = torch.ops.aten.mkldnn_rnn_layer(
                x, p[W_IH].detach(), p[W_HH].detach(), b_ih, b_hh, h0[d].detach().contiguous(),
                c0[d].detach().contiguous(), d == 1, [], _LSTM_MODE, hidden, 1, spec.bias, False, False, True)
            outs.append(out)
            hs.append(hy)
            cs.append(cy)
            workspaces.append(ws)
    out = outs[0] if spec.dirs == 1 else torch.cat(outs, -1)
    return (out, torch.stack(hs), torch.stack(cs), *workspaces)


def _fused_swapped(x: Tensor, h0: Tensor, c0: Tensor, flat, spec: _LayerSpec) -> tuple[Tensor, Tensor, Tensor] | None:
    """oneDNN's LSTM layer op for every direction with autograd's own node, under saved-tensor hooks that hand
    its backward the rule's ``B_ih``, ``B_hh`` where it saved ``W_ih``, ``W_hh`` (``falign.functional._SwapSaved``):
    the same kernels as :func:`_fused_backward`, without a Python backward. ``(out, h_n, c_n)``, or ``None`` where
    this path does not apply (``torch.compile``, ``torch.func``, other saved-tensor hooks, a trained
    ``B``; or the op did not save the weights where the hooks look: one warning) and :class:`_Layer` runs."""
    if not (x.requires_grad or h0.requires_grad or c0.requires_grad
            or any(t is not None and t.requires_grad for t in flat)) or not FF._fast_ok():
        return None
    for d in range(spec.dirs):
        p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
        if (p[FB_IH] is not None and p[FB_IH].requires_grad) or (p[FB_HH] is not None and p[FB_HH].requires_grad):
            return None  # kp: B receives W's gradient, from the Function
    x = x.contiguous()
    hidden = h0.shape[-1]
    outs, hs, cs = [], [], []
    for d in range(spec.dirs):
        p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
        swaps = []
        for w, fb, key in ((W_IH, FB_IH, "ih"), (W_HH, FB_HH, "hh")):
            fn, direct = spec.routes[d][key]
            if direct is not None:
                return None
            if p[fb] is not None or fn is not None:
                swaps.append(FF._Swap(p[w], p[fb], fn))
        b_ih, b_hh = _fused_biases(p, spec, x, detach=False)
        (out, hy, cy, _), swapped = FF._swap_saved_call(
            torch.ops.aten.mkldnn_rnn_layer, swaps, x, p[W_IH], p[W_HH], b_ih, b_hh, h0.select(0, d).contiguous(),
            c0.select(0, d).contiguous(), d == 1, [],
            _LSTM_MODE, hidden, 1, spec.bias, False, False, True, detach=True)
        if out.requires_grad and not swapped:
            FF.warn_no_swap("LSTM layer")
            return None
        outs.append(out)
        hs.append(hy)
        cs.append(cy)
    # h_n, c_n: copies (stack), as PyTorch's own, so that a user may change them in place; the op saved hy, cy
    return (outs[0] if spec.dirs == 1 else torch.cat(outs, -1)), torch.stack(hs), torch.stack(cs)


def _fused_backward(ctx, x, h0, c0, out, h_n, c_n, workspaces, flat, d_out, d_hn, d_cn):
    """oneDNN's LSTM layer backward for every direction with the rule's ``B_ih``, ``B_hh`` where backprop
    transports ``W_ih``, ``W_hh``."""
    spec, need = ctx.spec, ctx.needs_input_grad
    hidden = h0.shape[-1]
    x = x.contiguous()
    grads: list[Tensor | None] = [None] * (PER_DIRECTION * spec.dirs)
    dx = None
    dh0s, dc0s = [], []
    for d in range(spec.dirs):
        p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
        wants = need[3 + d * PER_DIRECTION:3 + (d + 1) * PER_DIRECTION]
        routes = spec.routes[d]
        t_ih, _ = _transported(p[W_IH], p[FB_IH], routes["ih"])
        t_hh, _ = _transported(p[W_HH], p[FB_HH], routes["hh"])
        b_ih, b_hh = _fused_biases(p, spec, x)
        cols = slice(d * hidden, (d + 1) * hidden)
        out_d = out[..., cols].contiguous() if spec.dirs > 1 else out
        g_out = d_out[..., cols].contiguous() if d_out is not None else torch.zeros_like(out_d)
        dx_d, dw_ih, dw_hh, db_ih, db_hh, dh0_d, dc0_d = torch.ops.aten.mkldnn_rnn_layer_backward(
            x, t_ih.contiguous(), t_hh.contiguous(), b_ih, b_hh, h0[d].contiguous(), c0[d].contiguous(), out_d, h_n[d],
            c_n[d], g_out,
            d_hn[d] if d_hn is not None else None, d_cn[d] if d_cn is not None else None, d == 1, _LSTM_MODE,
            hidden, 1, spec.bias, True, False, [], False, workspaces[d])
        mine = grads[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
        for k, g in ((W_IH, dw_ih), (W_HH, dw_hh), (B_IH, db_ih), (B_HH, db_hh)):
            mine[k] = g if wants[k] else None
        # a learned feedback matrix (kp) receives W's gradient, as in the Python path
        for fb, w, route in ((FB_IH, dw_ih, routes["ih"]), (FB_HH, dw_hh, routes["hh"])):
            if wants[fb] and route[1] is None:
                mine[fb] = w
        grads[d * PER_DIRECTION:(d + 1) * PER_DIRECTION] = mine
        dx = dx_d if dx is None else dx.add_(dx_d)
        dh0s.append(dh0_d)
        dc0s.append(dc0_d)
    return (dx if need[0] else None, torch.stack(dh0s) if need[1] else None,
            torch.stack(dc0s) if need[2] else None, *grads, None)


def _cudnn_weights(flat, spec: _LayerSpec, transported: bool) -> list[Tensor]:
    """cuDNN's weight list, ``[W_ih, W_hh(, b_ih, b_hh)]`` per direction (``B_ih``, ``B_hh`` if ``transported``)."""
    weights = []
    for d in range(spec.dirs):
        p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
        if transported:
            b_ih = _transported(p[W_IH], p[FB_IH], spec.routes[d]["ih"])[0]
            b_hh = _transported(p[W_HH], p[FB_HH], spec.routes[d]["hh"])[0]
            assert b_ih is not None and b_hh is not None, "the fused path takes no direct route"
            w_ih, w_hh = b_ih, b_hh
        else:
            w_ih, w_hh = p[W_IH], p[W_HH]
        weights += [w_ih.detach(), w_hh.detach()]
        if spec.bias:
            weights += [p[B_IH].detach(), p[B_HH].detach()]
    return weights


def _cudnn_flat(weights: list[Tensor], spec: _LayerSpec, input_size: int, hidden: int) -> Tensor:
    return torch.ops.aten._cudnn_rnn_flatten_weight(weights, 4 if spec.bias else 2, input_size,
                                                    _CUDNN_MODES[spec.mode], hidden, 0, 1, False, spec.dirs == 2)


def _cudnn_forward(x: Tensor, h0: Tensor, c0: Tensor, flat, spec: _LayerSpec):
    """cuDNN's forward of one layer (every direction): ``(out, h_n, c_n, reserve)``."""
    lstm = spec.mode == "LSTM"
    x = x.detach().contiguous()
    hidden = h0.shape[-1]
    weights = _cudnn_weights(flat, spec, transported=False)
    buf = _cudnn_flat(weights, spec, x.shape[-1], hidden)
    # autocast would cast to half precision and reflatten; the recurrence runs in the parameters' dtype instead
    with torch.enable_grad(), torch.autocast("cuda", enabled=False):
        cx = c0.detach().contiguous() if lstm else None
        out, hy, cy, reserve, _ = torch.ops.aten._cudnn_rnn(
            x, weights, 4 if spec.bias else 2, buf, h0.detach().contiguous(), cx,
            _CUDNN_MODES[spec.mode], hidden, 0, 1, False, 0.0, True, spec.dirs == 2, [], None)
    return out, hy, (cy if lstm else hy.new_empty(0)), reserve


def _cudnn_backward(ctx, x, h0, c0, out, reserve, flat, d_out, d_hn, d_cn):
    """cuDNN's backward of one layer with a flat buffer of the rule's ``B_ih``, ``B_hh`` where backprop's holds
    ``W_ih``, ``W_hh``: the input and across-time signals go through ``B``, the weight gradients are backprop's
    local ones."""
    spec, need = ctx.spec, ctx.needs_input_grad
    lstm = spec.mode == "LSTM"
    hidden = h0.shape[-1]
    weights = _cudnn_weights(flat, spec, transported=True)
    buf = _cudnn_flat(weights, spec, x.shape[-1], hidden)
    d_out = d_out.contiguous() if d_out is not None else torch.zeros_like(out)
    dx, dh0, dc0, dw = torch.ops.aten._cudnn_rnn_backward(
        x.contiguous(), weights, 4 if spec.bias else 2, buf, h0.contiguous(), c0.contiguous() if lstm else None, out,
        d_out, d_hn.contiguous() if d_hn is not None else None,
        d_cn.contiguous() if (lstm and d_cn is not None) else None, _CUDNN_MODES[spec.mode], hidden, 0, 1, False, 0.0,
        True, spec.dirs == 2, [], None, reserve.clone(), [bool(need[0]), bool(need[1]), lstm and bool(need[2]), True])
    per = 4 if spec.bias else 2
    grads: list[Tensor | None] = [None] * (PER_DIRECTION * spec.dirs)
    for d in range(spec.dirs):
        wants = need[3 + d * PER_DIRECTION:3 + (d + 1) * PER_DIRECTION]
        mine = dw[d * per:(d + 1) * per]
        slots = (W_IH, W_HH, B_IH, B_HH)[:per]
        base = d * PER_DIRECTION
        for k, g in zip(slots, mine):
            grads[base + k] = g if wants[k] else None
        for fb, w, route in ((FB_IH, mine[0], spec.routes[d]["ih"]), (FB_HH, mine[1], spec.routes[d]["hh"])):
            if wants[fb] and route[1] is None:  # a learned feedback matrix (kp) receives W's gradient
                grads[base + fb] = w
    return (dx if need[0] else None, dh0 if need[1] else None, dc0 if (lstm and need[2]) else None, *grads, None)


class _Layer(torch.autograd.Function):
    """One recurrent layer, every direction. The forward pass is PyTorch's own (fused) recurrence; the backward
    recomputes the gates from the saved states (two matrix products over all steps) and runs the backward through
    time step by step with the rule's matrix — or, for a direct rule, ``e D`` — wherever backprop transports
    ``W_ih``, ``W_hh`` or ``W_hr``.

    Inputs: ``x`` (time-major ``(T, N, in)``, or the rows of a packed batch), ``h0``, ``c0``, then per direction
    ``w_ih, w_hh, b_ih, b_hh, w_hr`` and the feedback tensors ``fb_ih, fb_hh, fb_hr`` (``None`` where absent),
    and the :class:`_LayerSpec`."""

    @staticmethod
    def forward(x, h0, c0, *rest):
        *flat, spec = rest
        params = []
        for d in range(spec.dirs):
            p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
            params += [p[W_IH], p[W_HH]] + ([p[B_IH], p[B_HH]] if spec.bias else []) + ([p[W_HR]] if spec.proj else [])
        if spec.fused == "cudnn":
            return _cudnn_forward(x, h0, c0, flat, spec)
        if spec.fused:
            return _fused_forward(x, h0, c0, flat, spec)
        return _run_pytorch(spec.mode, x, h0, c0, params, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, *rest = inputs
        *flat, spec = rest
        workspaces = output[3:]
        ctx.mark_non_differentiable(*workspaces)
        # no zero-filled gradients for outputs the loss does not reach (the workspace is megabytes): None instead
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, *output, *flat)
        ctx.spec = spec

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn, *_d_workspaces):
        spec = ctx.spec
        x, h0, c0, out, h_n, c_n, *rest = ctx.saved_tensors
        workspaces, flat = rest[:len(rest) - PER_DIRECTION * spec.dirs], rest[len(rest) - PER_DIRECTION * spec.dirs:]
        if spec.fused == "cudnn":
            return _cudnn_backward(ctx, x, h0, c0, out, workspaces[0], flat, d_out, d_hn, d_cn)
        if spec.fused:
            return _fused_backward(ctx, x, h0, c0, out, h_n, c_n, workspaces, flat, d_out, d_hn, d_cn)
        need = ctx.needs_input_grad
        total = sum(spec.sizes)
        x2 = x.reshape(total, x.shape[-1])
        o2 = out.reshape(total, out.shape[-1])
        d_out2 = d_out.reshape(total, out.shape[-1]) if d_out is not None else o2.new_zeros(o2.shape)
        width = out.shape[-1] // spec.dirs
        grads: list[Tensor | None] = [None] * (PER_DIRECTION * spec.dirs)
        dx = dh0 = dc0 = None
        dh0s, dc0s = [], []
        for d in range(spec.dirs):
            p = flat[d * PER_DIRECTION:(d + 1) * PER_DIRECTION]
            wants = need[3 + d * PER_DIRECTION:3 + (d + 1) * PER_DIRECTION]
            cols = slice(d * width, (d + 1) * width)
            result = _direction_backward(spec, d, x2, h0[d], c0[d] if c0.numel() else None,
                                         o2[:, cols].contiguous(), d_out2[:, cols],
                                         d_hn[d] if d_hn is not None else None,
                                         d_cn[d] if (d_cn is not None and d_cn.numel()) else None, p, wants, need[0])
            dx_d, dh0_d, dc0_d, grads[d * PER_DIRECTION:(d + 1) * PER_DIRECTION] = result
            if dx_d is not None:
                dx = dx_d if dx is None else dx.add_(dx_d)
            dh0s.append(dh0_d)
            dc0s.append(dc0_d)
        dh0 = torch.stack(dh0s) if need[1] else None
        dc0 = torch.stack(dc0s) if (need[2] and spec.mode == "LSTM") else None
        return (dx.view(x.shape) if dx is not None else None, dh0, dc0, *grads, None)


def _work_buffer(spec: _LayerSpec, key: tuple, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A work tensor of the backward kept by the container between steps (not state: never saved; rebuilt when
    the shape, dtype or device changes), so that every step does not page in fresh memory."""
    store = spec.work
    key = (spec.layer, *key)
    buf = store.get(key)
    if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = store[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _transported(w: Tensor, fb: Tensor | None, route: tuple[Any, Any]) -> tuple[Tensor | None, Any]:
    """``(B, direct)`` for one weight: ``W`` itself in backprop mode or without feedback, else the rule's ``B``
    (made from ``W`` for the sign rules), or the direct route."""
    fn, direct = route
    if FF._BACKPROP_MODE or (fb is None and fn is None):
        return w, None
    if direct is not None:
        return None, direct
    return (fb if fn is None else fn(w)), None


class _Cell:
    """One cell type's part of the backward through time of one direction (driven by :func:`_direction_backward`):
    :meth:`gates` recomputes the gates of every step at once from the saved states, :meth:`factors` their local
    derivatives' factors, :meth:`start` splits the work buffers by step, then :meth:`step_back` takes one step back:
    from ``g_h = dh + d_out`` (the loss's gradient reaching ``h_t``, through time and from the output) to the gates'
    error ``delta`` (rows of ``dx``) and what reaches ``h_{t-1}`` besides ``delta · B_hh`` (``across``, or ``None``).
    Work tensors come from ``work(name, *shape)``. The base class is the plain RNN (tanh or ReLU)."""

    n_gates = 1
    separate_hh = False  # whether W_hh h + b_hh is kept apart from x W_ihᵀ + b (the GRU's reset gate reads it)

    def __init__(self, mode: str, c: int, sizes: list[int], order: list[int], work: Any) -> None:
        self.mode, self.c, self.sizes, self.order, self.work = mode, c, sizes, order, work

    def gates(self, pre: Tensor, hw: Tensor, out: Tensor, c0: Tensor | None, hprev: list) -> None:
        self.slope = 1 - out * out if self.mode == "RNN_TANH" else (out > 0).to(out.dtype)

    def factors(self, pre: Tensor, hprev: list, c0: Tensor | None) -> None:
        pass

    def transport_projection(self, w_hr: Tensor | None, fb_hr: Tensor | None, routes: dict, spec: Any,
                             n0: int) -> None:
        pass

    def start(self, dx: Tensor, dhw: Tensor, d_cn: Tensor | None, out: Tensor, n0: int) -> None:
        self.DX, self.SLOPE = dx.split(self.sizes), self.slope.split(self.sizes)

    def step_back(self, t: int, m: int, dh: Tensor, d_out: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.mul(dh + d_out, self.SLOPE[t], out=self.DX[t]), None

    def final_dc(self) -> Tensor | None:
        return None

    def projection_grads(self, grads: list, wants: Any, spec: Any, rows_of: Tensor, n0: int) -> None:
        pass


class _LSTMCell(_Cell):
    """``i, f, g, o`` gates; ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)`` (then ``W_hr`` with ``proj_size``)."""

    n_gates = 4

    def gates(self, pre: Tensor, hw: Tensor, out: Tensor, c0: Tensor | None, hprev: list) -> None:
        c, work, total = self.c, self.work, pre.shape[0]
        assert c0 is not None, "an LSTM has an initial cell state"
        acts = self.acts = work("acts", total, 4 * c)
        torch.sigmoid(pre, out=acts)
        torch.tanh(pre[:, 2 * c:3 * c], out=acts[:, 2 * c:3 * c])
        self.i, self.f, self.g, self.o = acts.chunk(4, 1)
        c_all = self.c_all = torch.mul(self.i, self.g, out=work("c", total, c))
        steps_c, steps_f = c_all.split(self.sizes), self.f.split(self.sizes)
        prev = None
        for t in self.order:
            steps_c[t].addcmul_(steps_f[t], _previous(steps_c, c0, prev, self.sizes[t]))
            prev = t
        self.tanh_c = torch.tanh(c_all, out=work("tanh_c", total, c))
        self.raw: Tensor | None = None  # o tanh(c): the state before the projection W_hr (set when there is one)

    def factors(self, pre: Tensor, hprev: list, c0: Tensor | None) -> None:
        c, work, total = self.c, self.work, pre.shape[0]
        assert c0 is not None, "an LSTM has an initial cell state"
        i, g, o, acts, tanh_c = self.i, self.g, self.o, self.acts, self.tanh_c
        self.to_c = torch.mul(tanh_c, tanh_c, out=work("to_c", total, c)).neg_().add_(1).mul_(o)
        slope = torch.mul(acts, acts, out=pre).neg_().add_(acts)  # σ' = a − a² of the i, f, o gates
        p_igf = self.p_igf = work("p_igf", total, 3, c)
        torch.mul(g, slope[:, :c], out=p_igf[:, 0])
        for rows, cprev in _previous_segments(self.c_all, c0, self.sizes, self.order):
            torch.mul(cprev, slope[rows, c:2 * c], out=p_igf[rows, 1])
        torch.mul(g, g, out=p_igf[:, 2]).neg_().add_(1).mul_(i)
        self.p_o = torch.mul(tanh_c, slope[:, 3 * c:], out=work("p_o", total, c))

    def transport_projection(self, w_hr: Tensor | None, fb_hr: Tensor | None, routes: dict, spec: Any,
                             n0: int) -> None:
        self.fb_hr, self.signal_hr = fb_hr, None
        if w_hr is None:
            return
        self.hr_learns = routes["hr"][1] is None  # a layer-by-layer B (learned with W's gradient where it learns)
        self.raw = self.o * self.tanh_c
        self.b_hr, self.direct_hr = _transported(w_hr, fb_hr, routes["hr"])
        if self.direct_hr is not None:
            assert fb_hr is not None, "a direct route has its D"
            self.signal_hr = _direct_signal(self.direct_hr, fb_hr, n0, self.c, spec)

    def start(self, dx: Tensor, dhw: Tensor, d_cn: Tensor | None, out: Tensor, n0: int) -> None:
        sizes, c, total = self.sizes, self.c, dx.shape[0]
        self.dc = d_cn.clone() if d_cn is not None else out.new_zeros(n0, c)
        self.n0 = n0
        self.DX = dx.split(sizes)
        self.TO_C, self.P_IGF, self.P_O = self.to_c.split(sizes), self.p_igf.split(sizes), self.p_o.split(sizes)
        self.F = self.f.split(sizes)
        self.DX_IGF, self.DX_O = dx[:, :3 * c].view(total, 3, c).split(sizes), dx[:, 3 * c:].split(sizes)
        self.gh_all = out.new_empty(total, out.shape[1]) if self.raw is not None else None
        self.GH = self.gh_all.split(sizes) if self.gh_all is not None else None

    def step_back(self, t: int, m: int, dh: Tensor, d_out: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.GH is not None:  # through the projection: the state before it receives g_h B_hr (or e D_hr)
            g_h = torch.add(dh, d_out, out=self.GH[t])
            if self.signal_hr is not None:
                g_raw = self.signal_hr[:m]
            else:
                assert self.b_hr is not None, "a layer-by-layer route has its B"
                g_raw = g_h.mm(self.b_hr)
        else:
            g_raw = dh + d_out
        dc_m = self.dc if m == self.n0 else self.dc[:m]
        gc = torch.addcmul(dc_m, g_raw, self.TO_C[t])
        torch.mul(gc.unsqueeze(1), self.P_IGF[t], out=self.DX_IGF[t])
        torch.mul(g_raw, self.P_O[t], out=self.DX_O[t])
        torch.mul(gc, self.F[t], out=dc_m)
        return self.DX[t], None

    def final_dc(self) -> Tensor | None:
        return self.dc

    def projection_grads(self, grads: list, wants: Any, spec: Any, rows_of: Tensor, n0: int) -> None:
        raw = self.raw
        if self.gh_all is None or raw is None or not (wants[W_HR] or wants[FB_HR]):
            return
        grads[W_HR] = self.gh_all.t().mm(raw)
        if wants[FB_HR]:
            if self.direct_hr is not None:
                assert self.fb_hr is not None, "a direct route has its D"
                grads[FB_HR] = _direct_grad(self.direct_hr, self.fb_hr, raw, rows_of, n0, spec)
            elif self.hr_learns:
                grads[FB_HR] = grads[W_HR]


class _GRUCell(_Cell):
    """``r, z, n`` gates; ``n_t = tanh(x W_inᵀ + b_in + r (W_hn h_{t-1} + b_hn))``, ``h_t = (1 − z) n + z h_{t-1}``."""

    n_gates = 3
    separate_hh = True

    def gates(self, pre: Tensor, hw: Tensor, out: Tensor, c0: Tensor | None, hprev: list) -> None:
        c, work, total = self.c, self.work, pre.shape[0]
        rz = torch.add(pre[:, :2 * c], hw[:, :2 * c], out=work("rz", total, 2 * c)).sigmoid_()
        self.r, self.z = rz[:, :c], rz[:, c:]
        self.hn_all = hw[:, 2 * c:]
        self.n = torch.addcmul(pre[:, 2 * c:], self.r, self.hn_all, out=work("n", total, c)).tanh_()

    def factors(self, pre: Tensor, hprev: list, c0: Tensor | None) -> None:
        c, work, total = self.c, self.work, pre.shape[0]
        r, z, n = self.r, self.z, self.n
        p_x, p_h = self.p_x, self.p_h = work("p_x", total, 3, c), work("p_h", total, 3, c)
        u = torch.mul(n, n, out=p_x[:, 2]).neg_().add_(1).mul_(1 - z)  # (1 − z)(1 − n²)
        torch.mul(r, r, out=p_x[:, 0]).neg_().add_(r).mul_(self.hn_all).mul_(u)  # r(1 − r) h_n (1 − z)(1 − n²)
        v = p_x[:, 1]
        for rows, h in hprev:
            torch.sub(h, n[rows], out=v[rows])
        v.mul_(z).mul_(1 - z)
        p_h[:, :2].copy_(p_x[:, :2])
        torch.mul(u, r, out=p_h[:, 2])

    def start(self, dx: Tensor, dhw: Tensor, d_cn: Tensor | None, out: Tensor, n0: int) -> None:
        sizes, c, total = self.sizes, self.c, dx.shape[0]
        self.P_X, self.P_H, self.Z = self.p_x.split(sizes), self.p_h.split(sizes), self.z.split(sizes)
        self.DX3, self.DHW3 = dx.view(total, 3, c).split(sizes), dhw.view(total, 3, c).split(sizes)
        self.DHW = dhw.split(sizes)

    def step_back(self, t: int, m: int, dh: Tensor, d_out: Tensor) -> tuple[Tensor, Tensor | None]:
        g_h = dh + d_out
        g3 = g_h.unsqueeze(1)
        torch.mul(g3, self.P_X[t], out=self.DX3[t])
        torch.mul(g3, self.P_H[t], out=self.DHW3[t])
        return self.DHW[t], g_h * self.Z[t]


_CELLS: dict[str, type[_Cell]] = {"RNN_TANH": _Cell, "RNN_RELU": _Cell, "LSTM": _LSTMCell, "GRU": _GRUCell}


def _direction_backward(spec, d, x2, h0, c0, out, d_out, d_hn, d_cn, p, wants, need_x):
    """Recompute one direction's gates, run its backward through time with the rule's matrices (the cell's part:
    :class:`_Cell`), and return ``(dx, dh0, dc0, grads of its eight inputs)``."""
    sizes = spec.sizes
    w_ih, w_hh, b_ih, b_hh, w_hr, fb_ih, fb_hh, fb_hr = p
    routes = spec.routes[d]
    total, hidden = out.shape
    gates = w_hh.shape[0]
    n0 = sizes[0]
    order = list(range(len(sizes) - 1, -1, -1)) if d == 1 else list(range(len(sizes)))
    hprev = _previous_segments(out, h0, sizes, order)

    def work(name: str, *shape: int) -> Tensor:  # work buffers kept between steps
        return _work_buffer(spec, (d, name), shape, out)

    cell = _CELLS[spec.mode](spec.mode, gates // _CELLS[spec.mode].n_gates, sizes, order, work)
    # -- the gates, recomputed for all steps at once --------------------------------------------------------------
    bias = None
    if b_ih is not None:
        bias = b_ih if cell.separate_hh else b_ih + b_hh
    pre = work("pre", total, gates)
    torch.addmm(bias, x2, w_ih.t(), out=pre) if bias is not None else torch.mm(x2, w_ih.t(), out=pre)
    hw = work("hw", total, gates) if cell.separate_hh else pre  # else W_hh h_{t-1} is added to x W_ihᵀ + b in place
    for rows, h in hprev:
        if cell.separate_hh:
            torch.addmm(b_hh, h, w_hh.t(), out=hw[rows]) if b_hh is not None else torch.mm(h, w_hh.t(), out=hw[rows])
        else:
            hw[rows].addmm_(h, w_hh.t())
    cell.gates(pre, hw, out, c0, hprev)
    cell.factors(pre, hprev, c0)
    # -- backward through time ------------------------------------------------------------------------------------
    b_hh_, direct_hh = _transported(w_hh, fb_hh, routes["hh"])
    signal_hh = _direct_signal(direct_hh, fb_hh, n0, hidden, spec) if direct_hh is not None else None
    cell.transport_projection(w_hr, fb_hr, routes, spec, n0)
    dh = d_hn.clone() if d_hn is not None else out.new_zeros(n0, hidden)
    dx = work("dx", total, gates)
    dhw = work("dhw", total, gates) if cell.separate_hh else dx
    cell.start(dx, dhw, d_cn, out, n0)
    D_OUT = d_out.split(sizes)
    for t in reversed(order):
        m = sizes[t]
        dh_m = dh if m == n0 else dh[:m]
        delta, across = cell.step_back(t, m, dh_m, D_OUT[t])
        if signal_hh is not None:
            dh_m.copy_(signal_hh[:m] if across is None else across + signal_hh[:m])
        elif across is None:
            torch.mm(delta, b_hh_, out=dh_m)
        else:
            torch.addmm(across, delta, b_hh_, out=dh_m)
    # -- gradients --------------------------------------------------------------------------------------------------
    grads: list[Tensor | None] = [None] * PER_DIRECTION
    if wants[W_IH] or wants[FB_IH]:
        grads[W_IH] = dx.t().mm(x2)
    if wants[B_IH]:
        grads[B_IH] = dx.sum(0)
    if wants[W_HH] or wants[FB_HH]:
        grads[W_HH] = sum(dhw[rows].t().mm(h) for rows, h in hprev)
    if wants[B_HH]:
        grads[B_HH] = dhw.sum(0) if cell.separate_hh else grads[B_IH] if grads[B_IH] is not None else dx.sum(0)
    # the feedback's own gradient: W's for learned B (kp); ∂⟨e D, input⟩/∂D for a learned D (dkp), none in
    # backprop mode (as for the Linear layers)
    rows_of = torch.cat([torch.arange(s, device=out.device) for s in sizes])
    if wants[FB_HH]:
        if direct_hh is not None:
            states = torch.cat([h for _, h in sorted(hprev, key=lambda piece: piece[0].start)])
            grads[FB_HH] = _direct_grad(direct_hh, fb_hh, states, rows_of, n0, spec)
        elif routes["hh"][1] is None:
            grads[FB_HH] = grads[W_HH]
    cell.projection_grads(grads, wants, spec, rows_of, n0)
    b_ih_, direct_ih = _transported(w_ih, fb_ih, routes["ih"])
    signal_x = None
    if need_x:
        signal_x = _direct_input(direct_ih, fb_ih, spec, x2.shape[-1]) if direct_ih is not None else dx.mm(b_ih_)
    if wants[FB_IH]:
        if direct_ih is not None:
            grads[FB_IH] = _direct_input_grad(direct_ih, fb_ih, spec, x2)
        elif routes["ih"][1] is None:
            grads[FB_IH] = grads[W_IH]
    for k in (W_IH, W_HH, W_HR):
        if not wants[k]:
            grads[k] = None
    return signal_x, dh, cell.final_dc(), grads


def _direct_input(direct, d: Tensor, spec: _LayerSpec, width: int) -> Tensor:
    """``e D_ih`` for every step's input (time-major rows of a padded batch)."""
    session, mode, projector = direct
    q = projector(session, d.shape[0])
    assert spec.x_bf_shape is not None, "set by the forward pass"
    signal = FF._project(q, d, spec.x_bf_shape, mode)  # (N, T, in)
    return signal.transpose(0, 1).reshape(-1, width)


def _direct_input_grad(direct, d: Tensor, spec: _LayerSpec, x2: Tensor) -> Tensor:
    session, mode, projector = direct
    q = projector(session, d.shape[0])
    assert spec.x_bf_shape is not None, "set by the forward pass"
    n, steps = spec.x_bf_shape[0], spec.x_bf_shape[1]
    x_bf = x2.view(steps, n, x2.shape[-1]).transpose(0, 1)
    return FF._project_grad(q, x_bf, d, mode)


def _fused_kind(module: Any, x: Tensor, lstm: bool, packed: bool, direct: bool, probing: bool) -> str:
    """Which of PyTorch's fused kernels run this call (``"mkldnn"``, ``"cudnn"``), or ``""`` for the Python
    backward through time."""
    if not USE_FUSED or packed or module.proj_size > 0 or direct or probing or x.dtype != module.weight_hh_l0.dtype:
        return ""
    if x.is_cpu:
        ok = lstm and x.dtype == torch.float32 and torch._C._get_mkldnn_enabled() and _mkldnn_usable()
        return "mkldnn" if ok else ""
    if x.is_cuda:
        ok = (x.dtype in (torch.float32, torch.float64) and torch.backends.cudnn.is_available()
              and torch.backends.cudnn.enabled and fused_cudnn_available(x.device))
        return "cudnn" if ok else ""
    return ""


class _FARNNBase(FeedbackContainer):
    """Shared code of the converted recurrent layers."""

    report_note = ("W_ih and W_hh (and W_hr) of every layer and direction follow the rule (feedback.weight_*), "
                   "across time and towards the input; the gates' weight-free paths keep exact gradients; "
                   "conservation law not applicable (gates multiply activations)")

    mode: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    proj_size: int
    hidden_size: int
    dropout: float

    def view_specs(self):
        specs = {}
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                s = f"_l{layer}{suffix}"
                for kind in ("ih", "hh"):
                    specs[f"weight_{kind}{s}"] = ((f"weight_{kind}{s}", None),
                                                  (f"bias_{kind}{s}", None) if self.bias else None)
                if self.proj_size > 0:
                    specs[f"weight_hr{s}"] = ((f"weight_hr{s}", None), None)
        return specs

    def forward(self, input, hx=None):
        if _probe.active() is None and (not torch.is_grad_enabled() or not self.rule.has_feedback):
            return self.torch_base.forward(self, input, hx)
        if not FF._any_autocast():
            return self._run(input, hx)
        device = (input.data if isinstance(input, PackedSequence) else input).device.type
        if FF._autocast_dtype(device) is None:
            return self._run(input, hx)
        # under autocast the recurrence runs in the parameters' dtype (its backward accumulates over every step)
        dtype = self.weight_hh_l0.dtype
        cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
        if isinstance(input, PackedSequence):
            input = PackedSequence(cast(input.data), input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            input = cast(input)
        hx = tuple(cast(t) for t in hx) if isinstance(hx, tuple) else cast(hx)
        with torch.autocast(device, enabled=False):
            return self._run(input, hx)

    def _whole_lstm(self, input, hx):
        """``(output, (h_n, c_n))`` from PyTorch's own LSTM, ``torch._VF.lstm`` (what ``nn.LSTM`` runs: oneDNN's
        layer op for every layer and direction, ``batch_first`` and the stacking of ``h_n``, ``c_n`` in C++), under
        saved-tensor hooks that hand each op's backward the rule's ``B_ih``, ``B_hh`` where it saved ``W_ih``,
        ``W_hh`` (:class:`falign.functional._SwapSaved`): the eager path of a batched, unpacked CPU LSTM without
        projections or dropout between layers, under a layer-by-layer rule whose ``B`` is not trained. Its
        gradients are those of the layer-by-layer loop below (the same ops; tested equal), without that loop's
        Python. ``None`` where it does not apply: :meth:`_run`'s loop runs."""
        if (self.mode != "LSTM" or isinstance(input, PackedSequence) or input.dim() != 3
                or (self.dropout and self.training) or self.rule.direct or _probe.active() is not None
                or _fused_kind(self, input, True, False, False, False) != "mkldnn" or not FF._fast_ok()):
            return None
        n = input.shape[0 if self.batch_first else 1]
        h0, c0 = self._initial_state(hx, n, self.hidden_size, True, True, None, input)
        views = self._modules["feedback"]
        dirs = 2 if self.bidirectional else 1
        names = [self._all_weights[i:i + dirs] for i in range(0, len(self._all_weights), dirs)]  # [layer][direction]
        swaps = []
        into = input.requires_grad  # whether the layer's input needs a gradient
        for layer_names in names:
            own = False
            for d_names in layer_names:
                weights = [getattr(self, name) for name in d_names]
                mine = any(w.requires_grad for w in weights)
                own = own or mine
                signal = into or h0.requires_grad or mine  # as the loop below: the recurrence needs a signal
                for weight, name, needed in ((weights[0], d_names[0], into), (weights[1], d_names[1], signal)):
                    feedback, (fn, direct) = _route_of(views[name], input, needed)
                    if direct is not None or (feedback is not None and feedback.requires_grad):
                        return None  # kp: B receives W's gradient, from the Function
                    if feedback is not None or fn is not None:
                        swaps.append(FF._Swap(weight, feedback, fn))
            into = into or h0.requires_grad or c0.requires_grad or own  # the next layer's input: this one's output
        (output, h_n, c_n), swapped = FF._swap_saved_call(
            torch._VF.lstm, swaps, input, (h0.contiguous(), c0.contiguous()), self._flat_weights, self.bias,
            self.num_layers, float(self.dropout), self.training, self.bidirectional, self.batch_first, detach=True)
        if output.requires_grad and not swapped:
            FF.warn_no_swap("LSTM layer")
            return None
        FUSED_CALLS["fused"] += 1
        FUSED_CALLS["saved_hooks"] += self.num_layers
        return output, (h_n, c_n)

    def _run(self, input, hx):
        whole = self._whole_lstm(input, hx)
        if whole is not None:
            return whole
        lstm = self.mode == "LSTM"
        direct = self.rule.direct
        dirs = 2 if self.bidirectional else 1
        out_size = self.proj_size or self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            if direct:
                raise NotImplementedError(
                    f"{self.rule.name}: a direct rule projects the output error onto every time step of a padded "
                    f"batch; pass the padded tensor (torch.nn.utils.rnn.pad_packed_sequence) instead of a "
                    f"PackedSequence")
            data, batch_sizes, perm, unperm = input
            sizes = batch_sizes.tolist()
            n, steps, batched = sizes[0], len(sizes), True
            layer_input = data
        else:
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            perm = unperm = None
            if self.batch_first:
                n, steps = x.shape[:2]
            else:
                steps, n = x.shape[:2]
            sizes = [n] * steps
            layer_input = x.transpose(0, 1) if self.batch_first else x  # time-major (T, N, in)
        h0, c0 = self._initial_state(hx, n, out_size, lstm, batched, perm, layer_input)
        views = self.feedback
        record = _probe.active()  # convert's probe: record the input layers, plain recurrence
        probing = record is not None
        finals_h, finals_c = [], []
        fused = _fused_kind(self, layer_input, lstm, packed, direct, probing)
        FUSED_CALLS["fused" if fused else "python"] += 1
        for layer in range(self.num_layers):
            spec = _LayerSpec(self.mode, sizes, batch_sizes if packed else None, dirs, self.bias, self.proj_size > 0,
                              perm, unperm)
            # batch first, for a direct rule's plan and the probe (other rules need only the tensor's flags)
            x_plan = layer_input if packed or not (direct or probing) else layer_input.transpose(0, 1)
            spec.x_bf_shape = x_plan.shape if direct else None
            spec.layer, spec.work = layer, self.__dict__.setdefault("_scratch", {})
            h_start = h0.narrow(0, layer * dirs, dirs)  # (narrow and select: a few µs cheaper than indexing)
            c_start = c0.narrow(0, layer * dirs, dirs) if lstm else h_start.new_empty(0)
            flat: list[Tensor | None] = []
            for d in range(dirs):
                s = f"_l{layer}{'_reverse' if d else ''}"
                weights = [getattr(self, f"{k}{s}") if (self.bias or not k.startswith("bias")) else None
                           for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                weights.append(getattr(self, f"weight_hr{s}") if self.proj_size > 0 else None)
                feedback = [None, None, None]
                if probing:
                    record(views[f"weight_ih{s}"], x_plan)
                    spec.routes[d] = {"ih": (None, None), "hh": (None, None), "hr": (None, None)}
                else:
                    signal = torch.is_grad_enabled() and (layer_input.requires_grad or h_start.requires_grad or any(
                        w is not None and w.requires_grad for w in weights))
                    feedback[0], spec.routes[d]["ih"] = _route_of(views[f"weight_ih{s}"], x_plan,
                                                                  layer_input.requires_grad)
                    feedback[1], spec.routes[d]["hh"] = _route_of(views[f"weight_hh{s}"], h_start.select(0, d), signal)
                    spec.routes[d]["hr"] = (None, None)
                    if self.proj_size > 0:
                        state = h_start.new_empty(n, self.hidden_size)
                        feedback[2], spec.routes[d]["hr"] = _route_of(views[f"weight_hr{s}"], state, signal)
                flat += weights + feedback
            spec.fused = fused
            swapped = _fused_swapped(layer_input, h_start, c_start, flat, spec) if fused == "mkldnn" else None
            if swapped is not None:
                FUSED_CALLS["saved_hooks"] += 1
                out, hn, cn = swapped
            else:
                out, hn, cn, *_ = _Layer.apply(layer_input, h_start, c_start, *flat, spec)
            finals_h.append(hn)
            finals_c.append(cn)
            if self.dropout and self.training and layer < self.num_layers - 1:
                out = nn.functional.dropout(out, self.dropout, True)
            layer_input = out
        rows = out
        h_n = torch.cat(finals_h)  # a copy even for one layer: the layer's own h_n may be saved for its backward
        c_n = torch.cat(finals_c) if lstm else None
        if unperm is not None:
            h_n = h_n.index_select(1, unperm)
            c_n = c_n.index_select(1, unperm) if lstm else None
        if packed:
            output = PackedSequence(rows, batch_sizes, perm, unperm)
        else:
            output = rows
            if self.batch_first:
                output = output.transpose(0, 1)
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if lstm else None
        return output, ((h_n, c_n) if lstm else h_n)

    def _initial_state(self, hx, n, out_size, lstm, batched, perm, like):
        count = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            h0 = like.new_zeros(count, n, out_size)
            return h0, (like.new_zeros(count, n, self.hidden_size) if lstm else None)
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if lstm else None
        expected = (count, n, out_size)
        if tuple(h0.shape) != expected or (lstm and tuple(c0.shape) != (count, n, self.hidden_size)):
            raise RuntimeError(f"{type(self).__name__}: expected hidden state of shape {expected}"
                               + (f" and cell state {(count, n, self.hidden_size)}" if lstm else "")
                               + f", got {tuple(h0.shape)}" + (f" and {tuple(c0.shape)}" if lstm else ""))
        if perm is not None:
            h0 = h0.index_select(1, perm)
            c0 = c0.index_select(1, perm) if lstm else None
        return h0, c0


class FARNN(_FARNNBase, nn.RNN):
    """``nn.RNN`` (tanh or relu) whose backward through time follows a rule (see the module docstring)."""

    torch_base = nn.RNN


class FAGRU(_FARNNBase, nn.GRU):
    """``nn.GRU`` whose backward through time follows a rule (see the module docstring)."""

    torch_base = nn.GRU


class FALSTM(_FARNNBase, nn.LSTM):
    """``nn.LSTM`` (with or without ``proj_size``) whose backward through time follows a rule."""

    torch_base = nn.LSTM
