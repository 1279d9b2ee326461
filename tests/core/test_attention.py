"""nn.MultiheadAttention and the Transformer layers under every rule.

- B = W (backprop mode): outputs, attention weights and gradients equal PyTorch's own module over random
  configurations (packed / separate projections, batch_first, unbatched, masks of every kind, is_causal,
  need_weights, add_bias_kv, add_zero_attn).
- B ≠ W: gradients equal a reference written here — plain attention with each projection's input signal
  g·B (a straight-through linear) — so the weight-free products keep their exact gradients.
- The direct rules send e·D to each projection's input; Transformer encoders and decoders convert with no
  flag and train under every rule.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import falign
from falign.functional import backprop_mode
from falign.nn.attention import FAMultiheadAttention
from tests.conftest import with_target
from tests.rule_reference import REFERENCE

RULES = falign.available_rules()
LAYER_RULES = [r for r in RULES if falign.get_rule(r).has_feedback and not falign.get_rule(r).direct]
DIRECT_RULES = [r for r in RULES if falign.get_rule(r).direct]


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    cfg = {
        "embed": heads * draw(st.sampled_from([1, 2, 3])), "heads": heads,
        "kdim": draw(st.sampled_from([None, 3])), "vdim": draw(st.sampled_from([None, 5])),
        "batch_first": draw(st.booleans()), "bias": draw(st.booleans()), "bias_kv": draw(st.booleans()),
        "zero_attn": draw(st.booleans()), "unbatched": draw(st.booleans()), "tgt": draw(st.integers(1, 4)),
        "src": draw(st.integers(1, 5)), "padding": draw(st.sampled_from([None, "bool", "float"])),
        "mask": draw(st.sampled_from([None, "bool2d", "float3d", "causal"])), "need_weights": draw(st.booleans()),
        "average": draw(st.booleans()), "seed": draw(st.integers(0, 10_000)),
    }
    cfg["self"] = cfg["kdim"] is None and cfg["vdim"] is None and draw(st.booleans())
    if cfg["self"] or cfg["mask"] == "causal":
        cfg["src"] = cfg["tgt"]
    return cfg


def _inputs(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    n, e = 2, cfg["embed"]

    def make(length, width):
        if cfg["unbatched"]:
            return torch.randn(length, width, generator=g)
        shape = (n, length, width) if cfg["batch_first"] else (length, n, width)
        return torch.randn(shape, generator=g)

    q = make(cfg["tgt"], e)
    if cfg["self"]:
        k = v = q
    else:
        k, v = make(cfg["src"], cfg["kdim"] or e), make(cfg["src"], cfg["vdim"] or e)
    kwargs = {"need_weights": cfg["need_weights"], "average_attn_weights": cfg["average"]}
    batch = () if cfg["unbatched"] else (n,)
    if cfg["padding"]:
        pad = torch.rand(*batch, cfg["src"], generator=g) < 0.3
        pad[..., 0] = False
        kwargs["key_padding_mask"] = pad if cfg["padding"] == "bool" else pad.float() * -1e4
    if cfg["mask"] == "bool2d":
        mask = torch.rand(cfg["tgt"], cfg["src"], generator=g) < 0.3
        mask[:, 0] = False
        kwargs["attn_mask"] = mask
    elif cfg["mask"] == "float3d":
        kwargs["attn_mask"] = torch.randn((n if not cfg["unbatched"] else 1) * cfg["heads"], cfg["tgt"], cfg["src"],
                                          generator=g)
    elif cfg["mask"] == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(cfg["tgt"])
        kwargs["is_causal"] = True
    # the masks must be of one kind (bool or float), as PyTorch requires
    pad, mask = kwargs.get("key_padding_mask"), kwargs.get("attn_mask")
    if pad is not None and mask is not None and pad.dtype != mask.dtype:
        kwargs["key_padding_mask"] = pad.bool() if mask.dtype == torch.bool else (pad != 0).float() * -1e4
    return [q, k, v], kwargs


def _module(cfg):
    torch.manual_seed(cfg["seed"])
    return nn.MultiheadAttention(cfg["embed"], cfg["heads"], bias=cfg["bias"], add_bias_kv=cfg["bias_kv"],
                                 add_zero_attn=cfg["zero_attn"], kdim=cfg["kdim"], vdim=cfg["vdim"],
                                 batch_first=cfg["batch_first"])


def _leaves(tensors, self_attention):
    leaves = [t.clone().requires_grad_() for t in (tensors[:1] if self_attention else tensors)]
    return (leaves * 3 if self_attention else leaves), leaves


def _weighted_sum(out):
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


@settings(max_examples=60, deadline=None)
@given(configs())
def test_backprop_mode_equals_pytorch(cfg):
    plain = _module(cfg)
    model = falign.convert(nn.Sequential(plain), "fa")[0]
    tensors, kwargs = _inputs(cfg)
    args1, leaves1 = _leaves(tensors, cfg["self"])
    args2, leaves2 = _leaves(tensors, cfg["self"])
    with backprop_mode():
        out1, w1 = model(*args1, **kwargs)
        g1 = torch.autograd.grad(_weighted_sum(out1), [*leaves1, *[p for n, p in model.named_parameters()
                                                                   if "feedback" not in n]])
    out2, w2 = plain(*args2, **kwargs)
    g2 = torch.autograd.grad(_weighted_sum(out2), [*leaves2, *plain.parameters()])
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-4)
    assert (w1 is None) == (w2 is None)
    if w2 is not None:
        torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _through(x, w, b, fb):
    """A linear layer whose input gradient is g·fb and whose weight gradient is the local gᵀx."""
    y = F.linear(x.detach(), w, b)
    return y + F.linear(x, fb) - F.linear(x, fb).detach()


def reference_attention(mha, fbs, query, key, value, key_padding_mask=None):
    """Batch-first multi-head attention written out, each projection through :func:`_through`."""
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    if mha._qkv_same_embed_dim:
        ws = mha.in_proj_weight.split(e)
    else:
        ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    bs = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None,) * 3
    q, k, v = (_through(x, w, b, fb) for x, w, b, fb in zip((query, key, value), ws, bs, fbs[:3]))
    n, tgt, src = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.view(n, 1, 1, src), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, tgt, e)
    return _through(out, mha.out_proj.weight, mha.out_proj.bias, fbs[3])


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_gradients_follow_the_rule(rule, kind):
    torch.manual_seed(0)
    if kind == "self":
        plain = nn.MultiheadAttention(8, 2, batch_first=True)
        q = torch.randn(3, 4, 8)
        k = v = q
    else:
        plain = nn.MultiheadAttention(8, 2, batch_first=True, kdim=3, vdim=5)
        q, k, v = torch.randn(3, 4, 8), torch.randn(3, 6, 3), torch.randn(3, 6, 5)
    pad = torch.zeros(3, k.shape[1], dtype=torch.bool)
    pad[0, -2:] = True
    model = falign.convert(nn.Sequential(plain), rule, seed=1)[0]
    views = [model.feedback[name] for name in "qkv"] + [model.out_proj]
    fbs = [REFERENCE[rule].matrix(layer) for layer in views]
    for layer, b in zip(views, fbs):
        torch.testing.assert_close(layer.current_feedback(), b)
        assert not torch.equal(b, layer.weight.detach())
    leaves = [t.clone().requires_grad_() for t in ((q,) if kind == "self" else (q, k, v))]
    args = leaves * 3 if kind == "self" else leaves
    out, _ = model(*args, key_padding_mask=pad, need_weights=False)
    g = torch.randn_like(out)
    params = [p for n, p in model.named_parameters() if "feedback" not in n]
    got = torch.autograd.grad(out, [*leaves, *params], g)
    leaves2 = [t.clone().requires_grad_() for t in ((q,) if kind == "self" else (q, k, v))]
    args2 = leaves2 * 3 if kind == "self" else leaves2
    expected_out = reference_attention(model, fbs, *args2, key_padding_mask=pad)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-4)
    expected = torch.autograd.grad(expected_out, [*leaves2, *params], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class SelfAttend(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("rule", DIRECT_RULES)
def test_direct_rules_send_the_projected_error_to_each_projection(rule):
    """The input of q, k and v each receives q_err·D (per position): x.grad = q_err (D_q + D_k + D_v)."""
    torch.manual_seed(0)
    model = falign.convert(SelfAttend(), rule, seed=2)
    x = torch.randn(3, 4, 8, requires_grad=True)
    y = torch.randint(0, 3, (3, 4))
    out = with_target(model, x, y)
    F.cross_entropy(out.reshape(-1, 3), y.reshape(-1)).backward()
    o = out.detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(o.reshape(-1, 3), y.reshape(-1)), o)
    # every position is one labelled example: the reference's (examples, n_out) rows
    q_err = REFERENCE[rule].projected(e.reshape(-1, 3), F.one_hot(y, 3).float().reshape(-1, 3)).reshape(3, 4, 3)
    ds = [model.attn.feedback[name].feedback_weight.detach() for name in "qkv"]
    assert all(d.shape == (3, 8) for d in ds)
    torch.testing.assert_close(x.grad, q_err @ (ds[0] + ds[1] + ds[2]), atol=1e-6, rtol=1e-5)


class TinyTransformer(nn.Module):
    def __init__(self, decoder: bool = False):
        super().__init__()
        self.decoder = decoder
        self.embed = nn.Linear(5, 16)
        layer = (nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer)(
            16, 2, 32, dropout=0.1, batch_first=True)
        self.body = (nn.TransformerDecoder if decoder else nn.TransformerEncoder)(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.body(h, h) if self.decoder else self.body(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("decoder", [False, True])
def test_transformers_convert_with_no_flag_and_train(rule, decoder):
    torch.manual_seed(0)
    model = falign.convert(TinyTransformer(decoder), rule, seed=0)
    report = falign.conversion_report(model)
    assert not report.unsupported
    assert sum("MultiheadAttention" == r.type for r in report.layers) == (4 if decoder else 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    falign.attach(model, opt)
    x = torch.randn(32, 6, 5)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0.3).long()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(with_target(model, x, y), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-5:]) < losses[0], (rule, losses[0], losses[-5:])


def test_state_dict_unconvert_and_evaluation():
    torch.manual_seed(0)
    plain = TinyTransformer()
    model = falign.convert(plain, "fa")
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert "body.layers.0.self_attn.feedback.q.feedback_weight" in extra
    assert "body.layers.0.self_attn.out_proj.feedback_weight" in extra
    assert all(k.endswith(("feedback_weight", "feedback_rule")) for k in extra)
    x = torch.randn(4, 6, 5)
    plain.eval()
    model.eval()
    with torch.no_grad():  # PyTorch's forward (fast path included) with the same weights
        torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)  # the rule's forward: the same values
    back = falign.unconvert(model)
    assert type(back.body.layers[0].self_attn) is nn.MultiheadAttention
    assert set(back.state_dict()) == set(plain.state_dict())
    assert isinstance(falign.convert(plain, "kp").body.layers[1].self_attn, FAMultiheadAttention)


def test_subclass_with_its_own_forward_keeps_the_clear_error():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(falign.ConversionError, match="Custom"):
        falign.convert(nn.Sequential(Custom(8, 2)), "fa")


def test_diagnostics_read_each_projection_block():
    """The recorder's gradient alignment of a view (q, k, v of the packed in-projection, an LSTM's W_hh) is the
    angle between that block of the rule's gradient and the same block of the true gradient."""
    from falign.diagnostics import angle
    from falign.diagnostics.recorder import DiagnosticsRecorder

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.rnn(h)[0][:, -1])

    torch.manual_seed(0)
    model = falign.convert(Mixed(), "fa")
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))
    recorder = DiagnosticsRecorder(model)
    _, _, record = recorder.step(lambda: ((out := model(x)), F.cross_entropy(out, y))[::-1], x)
    names = {"attn.feedback.q", "attn.feedback.k", "attn.feedback.v", "attn.out_proj", "rnn.feedback.weight_hh_l0"}
    assert names <= set(record["gradient_alignment"]) and names <= set(record["weight_alignment"])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    rule_block = model.attn.in_proj_weight.grad[8:16].clone()
    with backprop_mode():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    true_block = model.attn.in_proj_weight.grad[8:16]
    assert record["gradient_alignment"]["attn.feedback.k"] == pytest.approx(angle(rule_block, true_block), abs=1e-3)
