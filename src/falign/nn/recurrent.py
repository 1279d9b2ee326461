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
``weight_hr_l{k}[_reverse]``) hold the feedback matrices. The input projection of all time steps is one
matrix product; the recurrence runs in one autograd function with an explicit backward through time.
Every option works: layers, ``bidirectional``, ``batch_first``, unbatched input, ``dropout``, ``bias``,
``nonlinearity``, ``proj_size`` and ``PackedSequence`` input (not with the direct rules, which need a padded
batch). Without gradients (evaluation) or under ``bp`` the PyTorch forward runs. A second derivative
through a converted recurrent layer is not supported (it raises).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from falign import functional as FF
from falign.nn import layers
from falign.nn.containers import FeedbackContainer

__all__ = ["FAGRU", "FALSTM", "FARNN"]


class _Spec:
    """The non-tensor configuration of one recurrence (one layer, one direction)."""

    __slots__ = ("direct_hh", "direct_hr", "fn_hh", "fn_hr", "mode", "perm", "reverse", "saved", "sizes", "unperm")

    def __init__(self, mode: str, sizes: list[int], reverse: bool, perm: Tensor | None, unperm: Tensor | None):
        self.mode, self.sizes, self.reverse, self.perm, self.unperm = mode, sizes, reverse, perm, unperm
        self.fn_hh = self.fn_hr = self.direct_hh = self.direct_hr = self.saved = None


def _transport(route: tuple[str, Any], spec: _Spec, which: str) -> Tensor | None:
    """Record a view's route in ``spec``; returns the feedback tensor the function takes as an input."""
    kind, source = route
    if kind is layers.PLAIN:
        return None
    if kind is layers.DIRECT:
        setattr(spec, f"direct_{which}", source[1:])
        return source[0]
    if isinstance(source, Tensor):
        return source
    setattr(spec, f"fn_{which}", source)
    return None


def _direct_signal(direct, d: Tensor, n: int, width: int, spec: _Spec) -> Tensor:
    """``e D`` for the ``(N, width)`` state (rows in the order of the packed batch)."""
    session, mode, projector = direct
    q = projector(session, d.shape[0])
    signal = FF._project(q, d, torch.Size((n, width)), mode)
    return signal if spec.perm is None else signal.index_select(0, spec.perm)


def _direct_grad(direct, d: Tensor, states: Tensor, rows: Tensor, n: int, spec: _Spec) -> Tensor:
    """``∂/∂D Σ_t ⟨e D, h_{t-1}⟩``: the adjoint of the signal sent at every step."""
    session, mode, projector = direct
    q = projector(session, d.shape[0])
    total = states.new_zeros(n, states.shape[1]).index_add_(0, rows, states)
    if spec.unperm is not None:
        total = total.index_select(0, spec.unperm)
    return FF._project_grad(q, total, d, mode)


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
    prev = None
    for t in order:
        m, off = sizes[t], offsets[t]
        keep = 0 if prev is None else min(m, prev[1])
        if keep:
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


def _final_rows(sizes: list[int], offsets: list[int], reverse: bool, device) -> Tensor:
    """The row of each sequence's last state (the first step for the reverse direction)."""
    n = sizes[0]
    if reverse:
        return torch.arange(n, device=device)
    lengths = (torch.tensor(sizes).unsqueeze(0) > torch.arange(n).unsqueeze(1)).sum(1)
    return (torch.tensor(offsets)[lengths - 1] + torch.arange(n)).to(device)


class _Recurrence(torch.autograd.Function):
    """One direction of one layer over every step: ``xw`` holds ``x_t W_ihᵀ + b_ih`` of all steps, time-major
    (packed rows: step ``t`` owns ``sizes[t]`` rows, the sequences still running). The backward through time
    uses ``B_hh`` (``B_hr``) — or, for a direct rule, ``e D`` — for the transported weights."""

    @staticmethod
    def forward(xw, h0, c0, w_hh, b_hh, fb_hh, w_hr, fb_hr, spec):
        mode, sizes = spec.mode, spec.sizes
        lstm, gru = mode == "LSTM", mode == "GRU"
        total, hidden, gates = xw.shape[0], w_hh.shape[1], w_hh.shape[0]
        c = gates // (4 if lstm else 3 if gru else 1)
        order = list(range(len(sizes) - 1, -1, -1)) if spec.reverse else list(range(len(sizes)))
        wt = w_hh.t()
        out = xw.new_empty(total, hidden)
        outs = out.split(sizes)
        acts = xw.new_empty(total, gates) if (lstm or gru) else None
        c_all = tanh_c = raw = hn_all = None
        # every per-step view is made once, before the loop
        if lstm:
            xb = (xw + b_hh if b_hh is not None else xw).split(sizes)
            c_all, tanh_c = xw.new_empty(total, c), xw.new_empty(total, c)
            A, C, TC = acts.split(sizes), c_all.split(sizes), tanh_c.split(sizes)
            I, F, G, O = (acts[:, k * c:(k + 1) * c].split(sizes) for k in range(4))
            if w_hr is not None:
                raw = xw.new_empty(total, c)
                RAW, wr = raw.split(sizes), w_hr.t()
        elif gru:  # b_hn stays inside r ⊙ (W_hn h + b_hn)
            hn_all = xw.new_empty(total, c)
            XRZ, XN, HN = xw[:, :2 * c].split(sizes), xw[:, 2 * c:].split(sizes), hn_all.split(sizes)
            RZ, R, Z, N = (acts[:, a:b].split(sizes) for a, b in ((0, 2 * c), (0, c), (c, 2 * c), (2 * c, 3 * c)))
        else:
            xb = (xw + b_hh if b_hh is not None else xw).split(sizes)
            act_fn = torch.tanh if mode == "RNN_TANH" else torch.relu
        prev = None
        for t in order:
            m = sizes[t]
            hp = _previous(outs, h0, prev, m)
            if lstm:
                cp = _previous(C, c0, prev, m)
                pre = torch.addmm(xb[t], hp, wt)
                torch.sigmoid(pre, out=A[t])
                torch.tanh(pre[:, 2 * c:3 * c], out=G[t])
                torch.mul(F[t], cp, out=C[t]).addcmul_(I[t], G[t])
                torch.tanh(C[t], out=TC[t])
                if raw is not None:
                    torch.mm(torch.mul(O[t], TC[t], out=RAW[t]), wr, out=outs[t])
                else:
                    torch.mul(O[t], TC[t], out=outs[t])
            elif gru:
                hw = torch.addmm(b_hh, hp, wt) if b_hh is not None else hp.mm(wt)
                torch.add(XRZ[t], hw[:, :2 * c], out=RZ[t]).sigmoid_()
                HN[t].copy_(hw[:, 2 * c:])
                torch.addcmul(XN[t], R[t], HN[t], out=N[t]).tanh_()
                torch.lerp(N[t], hp, Z[t], out=outs[t])  # (1 − z) n + z h
            else:
                outs[t].copy_(act_fn(torch.addmm(xb[t], hp, wt)))
            prev = t
        last = _final_rows(sizes, _offsets(sizes), spec.reverse, xw.device)
        spec.saved = (acts, c_all, tanh_c, raw, hn_all)  # the function's own buffers, read by backward
        h_n = out.index_select(0, last)
        return out, h_n, (c_all.index_select(0, last) if lstm else xw.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _xw, h0, c0, w_hh, b_hh, fb_hh, w_hr, fb_hr, spec = inputs
        ctx.save_for_backward(h0, c0, w_hh, fb_hh, w_hr, fb_hr, output[0])
        ctx.intermediates, spec.saved = spec.saved, None
        ctx.spec = spec
        ctx.has_bias = b_hh is not None

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        h0, c0, w_hh, fb_hh, w_hr, fb_hr, out = ctx.saved_tensors
        acts, c_all, tanh_c, raw, hn_all = ctx.intermediates
        spec = ctx.spec
        mode, sizes = spec.mode, spec.sizes
        lstm, gru = mode == "LSTM", mode == "GRU"
        total, hidden = out.shape
        n0 = sizes[0]
        gates = w_hh.shape[0]
        cell = gates // (4 if lstm else 3 if gru else 1)
        need = ctx.needs_input_grad
        backprop = bool(FF._BACKPROP_MODE)
        order = list(range(len(sizes) - 1, -1, -1)) if spec.reverse else list(range(len(sizes)))
        offsets = _offsets(sizes)

        def transport(w, fb, fn, direct):
            if backprop or (fb is None and fn is None):
                return w, None
            if direct is not None:
                return None, _direct_signal(direct, fb, n0, w.shape[1], spec)
            return (fb if fn is None else fn(w)), None

        b_hh_, signal_hh = transport(w_hh, fb_hh, spec.fn_hh, spec.direct_hh)
        if raw is not None:
            b_hr_, signal_hr = transport(w_hr, fb_hr, spec.fn_hr, spec.direct_hr)
        d_out = d_out if d_out is not None else out.new_zeros(out.shape)
        dh = d_hn.clone() if d_hn is not None else out.new_zeros(n0, hidden)
        hprev = _previous_segments(out, h0, sizes, order)
        dx = out.new_empty(total, gates)
        dhw = out.new_empty(total, gates) if gru else dx
        gh_all = out.new_empty(total, hidden) if raw is not None else None
        # the factors of each step's local derivatives, for all steps at once
        if lstm:
            dc = d_cn.clone() if (d_cn is not None and d_cn.numel()) else out.new_zeros(n0, cell)
            i, f, g, o = acts.chunk(4, 1)
            to_c = o * (1 - tanh_c * tanh_c)
            slope = acts * (1 - acts)  # σ' of the i, f, o gates
            p_igf = out.new_empty(total, 3, cell)
            torch.mul(g, slope[:, :cell], out=p_igf[:, 0])
            for rows, cprev in _previous_segments(c_all, c0, sizes, order):
                torch.mul(cprev, slope[rows, cell:2 * cell], out=p_igf[rows, 1])
            torch.mul(g, g, out=p_igf[:, 2]).neg_().add_(1).mul_(i)
            p_o = tanh_c * slope[:, 3 * cell:]
        elif gru:
            r, z, n = acts.chunk(3, 1)
            u = (1 - z) * (1 - n * n)
            w_r = u * hn_all * r * (1 - r)
            v = out.new_empty(total, cell)
            for rows, h in hprev:
                torch.sub(h, n[rows], out=v[rows])
            v.mul_(z).mul_(1 - z)
            p_x = torch.stack((w_r, v, u), 1)
            p_h = torch.stack((w_r, v, u * r), 1)
        else:
            slope = 1 - out * out if mode == "RNN_TANH" else (out > 0).to(out.dtype)
        for t in reversed(order):
            m, a = sizes[t], offsets[t]
            rows = slice(a, a + m)
            if raw is not None:
                g_h = torch.add(dh[:m], d_out[rows], out=gh_all[rows])
                g_raw = signal_hr[:m] if signal_hr is not None else g_h.mm(b_hr_)
            else:
                g_h = dh[:m] + d_out[rows]
                g_raw = g_h
            d = dx[rows]
            if lstm:
                gc = torch.addcmul(dc[:m], g_raw, to_c[rows])
                torch.mul(gc.unsqueeze(1), p_igf[rows], out=d[:, :3 * cell].view(m, 3, cell))
                torch.mul(g_raw, p_o[rows], out=d[:, 3 * cell:])
                torch.mul(gc, f[rows], out=dc[:m])
                across = None
            elif gru:
                g3 = g_h.unsqueeze(1)
                torch.mul(g3, p_x[rows], out=d.view(m, 3, cell))
                d = dhw[rows]
                torch.mul(g3, p_h[rows], out=d.view(m, 3, cell))
                across = g_h * z[rows]
            else:
                torch.mul(g_h, slope[rows], out=d)
                across = None
            if signal_hh is not None:
                dh[:m] = signal_hh[:m] if across is None else across + signal_hh[:m]
            elif across is None:
                torch.mm(d, b_hh_, out=dh[:m])
            else:
                torch.addmm(across, d, b_hh_, out=dh[:m])
        grad_w_hh = None
        if need[3] or need[5]:
            grad_w_hh = sum(dhw[rows].t().mm(h) for rows, h in hprev)
        grad_b_hh = dhw.sum(0) if (ctx.has_bias and need[4]) else None
        grad_fb_hh = None
        if need[5]:
            if spec.direct_hh is not None:
                rows_of = torch.cat([torch.arange(s, device=out.device) for s in sizes])
                states = torch.cat([h for _, h in hprev]) if len(hprev) > 1 else hprev[0][1]
                if len(hprev) > 1 and hprev[0][0].start != 0:  # the pieces in row order
                    states = torch.cat([hprev[1][1], hprev[0][1]])
                grad_fb_hh = _direct_grad(spec.direct_hh, fb_hh, states, rows_of, n0, spec)
            else:
                grad_fb_hh = grad_w_hh
        grad_w_hr = grad_fb_hr = None
        if raw is not None and (need[6] or need[7]):
            grad_w_hr = gh_all.t().mm(raw)
            if need[7]:
                if spec.direct_hr is not None:
                    rows_of = torch.cat([torch.arange(s, device=out.device) for s in sizes])
                    grad_fb_hr = _direct_grad(spec.direct_hr, fb_hr, raw, rows_of, n0, spec)
                else:
                    grad_fb_hr = grad_w_hr
        return (dx, dh, dc if lstm else None, grad_w_hh if need[3] else None, grad_b_hh, grad_fb_hh,
                grad_w_hr if need[6] else None, grad_fb_hr, None)


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
        if layers._PROBE is None and (not torch.is_grad_enabled() or not self.rule.has_feedback):
            return self.torch_base.forward(self, input, hx)
        return self._run(input, hx)

    def _run(self, input, hx):
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
            # direct rules plan D on batch-first inputs; the others take time-major rows directly
            layer_input = (x if self.batch_first else x.transpose(0, 1)) if direct else \
                (x.transpose(0, 1) if self.batch_first else x)
        h0, c0 = self._initial_state(hx, n, out_size, lstm, batched, perm, layer_input)
        views = self.feedback
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                s = f"_l{layer}{'_reverse' if d else ''}"
                xw = views[f"weight_ih{s}"](layer_input)
                if not packed:
                    xw = (xw.transpose(0, 1) if direct else xw).reshape(steps * n, xw.shape[-1])
                index = layer * dirs + d
                h_start = h0[index]
                c_start = c0[index] if lstm else xw.new_empty(0)
                spec = _Spec(self.mode, sizes, d == 1, perm, unperm)
                signal = xw.requires_grad or h_start.requires_grad or c_start.requires_grad
                w_hh = getattr(self, f"weight_hh{s}")
                probing = layers._PROBE is not None  # convert's probe: the plain recurrence
                fb_hh = None if probing else _transport(views[f"weight_hh{s}"].route(h_start, signal), spec, "hh")
                w_hr = fb_hr = None
                if self.proj_size > 0:
                    w_hr = getattr(self, f"weight_hr{s}")
                    probe = xw.new_empty(n, self.hidden_size)
                    fb_hr = None if probing else _transport(views[f"weight_hr{s}"].route(probe, signal), spec, "hr")
                b_hh = getattr(self, f"bias_hh{s}") if self.bias else None
                out, hn, cn = _Recurrence.apply(xw, h_start, c_start, w_hh, b_hh, fb_hh, w_hr, fb_hr, spec)
                outs.append(out)
                finals_h.append(hn)
                finals_c.append(cn)
            rows = outs[0] if dirs == 1 else torch.cat(outs, 1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                rows = nn.functional.dropout(rows, self.dropout, True)
            if packed:
                layer_input = rows
            else:
                layer_input = rows.view(steps, n, -1)
                if direct:
                    layer_input = layer_input.transpose(0, 1)
        h_n = torch.stack(finals_h)
        c_n = torch.stack(finals_c) if lstm else None
        if unperm is not None:
            h_n = h_n.index_select(1, unperm)
            c_n = c_n.index_select(1, unperm) if lstm else None
        if packed:
            output = PackedSequence(rows, batch_sizes, perm, unperm)
        else:
            output = rows.view(steps, n, -1)
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
