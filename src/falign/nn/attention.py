"""``nn.MultiheadAttention`` whose projections follow a learning rule.

Attention computes ``Q = x_q W_qᵀ + b_q``, ``K = x_k W_kᵀ + b_k``, ``V = x_v W_vᵀ + b_v`` (the packed
``in_proj_weight`` is ``[W_q; W_k; W_v]``, or three ``*_proj_weight`` when ``kdim``/``vdim`` differ), then per
head ``A = softmax(Q Kᵀ/√d + mask)``, ``O = A V``, and the output ``O W_oᵀ + b_o`` (``out_proj``).

The backward pass keeps the *weight-free* products exact — ``Q Kᵀ``, the softmax, ``A V``, the masks, the
head split — and replaces the four transported weights: the signals to the inputs are ``g_Q B_q``,
``g_K B_k``, ``g_V B_v`` and, into ``O``, ``g B_o``. In self-attention the input receives their sum. Weight
and bias gradients are backprop's local ones. The feedback matrices are the views ``feedback.q``,
``feedback.k``, ``feedback.v`` (W's block shape each) and ``out_proj.feedback_weight``.

Direct rules (``dfa``, ``drtp``, ``dkp``): each projection's *input* receives the projected output error
``e D`` (``feedback.q/k/v`` and ``out_proj`` each have their own ``D``), the signal then travels exactly
through the weight-free products, so the q/k/v weight gradients use the error that ``out_proj``'s input
received — and through the residual paths of a Transformer layer. This is DFA at every weight layer, the
variant falign implements; Launay et al. (2020) train Transformers with the error delivered to each block
(falign does not provide that block-level variant).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from falign.nn import probe as _probe
from falign.nn.containers import FeedbackContainer
from falign.nn.layers import FALinear

__all__ = ["FAMultiheadAttention"]


class FAMultiheadAttention(FeedbackContainer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose q/k/v in-projections and ``out_proj`` follow a rule.

    Every option of ``nn.MultiheadAttention`` works: packed or separate (``kdim``/``vdim``) projections,
    ``batch_first`` both ways, unbatched input, ``key_padding_mask`` and ``attn_mask`` (bool or float,
    2-D or per head), ``is_causal``, ``need_weights`` with ``average_attn_weights``, ``add_bias_kv``,
    ``add_zero_attn``, dropout. Without gradients (evaluation) or under ``bp`` the PyTorch forward runs.

    Shape: as ``nn.MultiheadAttention``; views ``feedback.q/k/v``: ``(E, E)``, ``(E, kdim)``, ``(E, vdim)``.
    """

    torch_base = nn.MultiheadAttention
    report_note = ("q/k/v in-projections (feedback.q, .k, .v) and out_proj follow the rule; QKᵀ, softmax, A·V "
                   "and the masks keep exact gradients; conservation law not applicable (products of activations)")

    def view_specs(self):
        e = self.embed_dim
        bias = None if self.in_proj_bias is None else "in_proj_bias"
        specs = {}
        for i, name in enumerate("qkv"):
            rows = (i * e, (i + 1) * e)
            weight = ("in_proj_weight", rows) if self._qkv_same_embed_dim else (f"{name}_proj_weight", None)
            specs[name] = (weight, None if bias is None else (bias, rows))
        return specs

    def convert_children(self, **options: Any) -> None:
        FALinear.convert_in_place(self.out_proj, **options)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if _probe.active() is None and (not torch.is_grad_enabled() or not self.rule.has_feedback):
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal)
        return self._attend(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                            is_causal)

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal):
        batched = query.dim() == 3
        if not batched:  # (L, E): one sample
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E): every tensor below is batch first
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the mask is the causal one: scaled_dot_product_attention's is_causal uses it
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            is_causal = False

        n, tgt = query.shape[0], query.shape[1]
        h, e = self.num_heads, self.embed_dim
        d = e // h
        views = self.feedback
        q, k, v = views["q"](query), views["k"](key), views["v"](value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(n, tgt, h, d).transpose(1, 2)
        k = k.view(n, k.shape[1], h, d).transpose(1, 2)
        v = v.view(n, v.shape[1], h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, d)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src = k.shape[2]
        mask = None
        if attn_mask is not None:
            mask = attn_mask.view(1, 1, tgt, src) if attn_mask.dim() == 2 else attn_mask.view(n, h, tgt, src)
        if key_padding_mask is not None:
            pad = key_padding_mask.view(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            attended = torch.matmul(F.dropout(weights, dropout) if dropout > 0 else weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal)
        out = self.out_proj(attended.transpose(1, 2).reshape(n, tgt, e))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
