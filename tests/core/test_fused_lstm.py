"""Converted LSTMs run PyTorch's fused oneDNN layer ops with the rule's matrices in the backward.

- On the pinned CPU torch the fused path is taken (a test fails if it silently is not), eagerly as autograd's own
  node with the saved W_ih, W_hh swapped for B_ih, B_hh (falign.functional._SwapSaved), else (kp's trained B,
  other saved-tensor hooks, torch.func, autocast) through falign's autograd Function around the same ops.
- Fused equals the Python backward through time (itself checked against a naive unrolled reference in
  tests/core/test_recurrent.py, whose LSTM cases now run fused too) with B ≠ W, for every layer-by-layer rule and the
  layer options: layers, directions, batch_first, bias, initial states, gradients into h_n / c_n only.
- What the fused ops cannot express (proj_size, packed input, direct rules, float64) takes the Python path.
- A changed schema falls back to the Python path with one warning; the cuDNN ops (the CUDA path, checked on a
  GPU by benchmarks/gpu_check.py) have the schemas falign calls; a retained graph can be differentiated twice.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import falign
from falign import functional as FF
from falign.nn import recurrent

LAYER_RULES = [r for r in falign.available_rules()
               if falign.get_rule(r).has_feedback and not falign.get_rule(r).direct]


def _grads(model, x, hx, use_fused, monkeypatch, loss_on="all", hooks=True):
    monkeypatch.setattr(recurrent, "USE_FUSED", use_fused)
    monkeypatch.setattr(FF, "_FAST", hooks)
    before = dict(recurrent.FUSED_CALLS)
    x = x.clone().requires_grad_()
    hx = tuple(t.clone().requires_grad_() for t in hx) if hx is not None else None
    out, (h_n, c_n) = model(x, hx)
    terms = {"all": [out, h_n, c_n], "states": [h_n, c_n]}[loss_on]
    loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() + (t ** 2).sum() for t in terms)
    inputs = [x, *(hx or ()), *[p for _, p in model.named_parameters()]]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    ran = {k: recurrent.FUSED_CALLS[k] - before[k] for k in before}
    return [out, h_n, c_n], grads, ran


def test_the_fused_path_is_taken_on_the_pinned_torch():
    assert torch.backends.mkldnn.is_available(), "the CPU torch build has no oneDNN: the fused LSTM cannot run"
    assert recurrent.fused_lstm_available(), "the oneDNN LSTM layer ops changed: update falign.nn.recurrent"
    model = falign.convert(nn.Sequential(nn.LSTM(4, 6, num_layers=2)), "fa", seed=0)[0]
    before = dict(recurrent.FUSED_CALLS)
    model(torch.randn(5, 3, 4))[0].sum().backward()
    assert recurrent.FUSED_CALLS["fused"] == before["fused"] + 1
    assert recurrent.FUSED_CALLS["python"] == before["python"]
    assert recurrent.FUSED_CALLS["saved_hooks"] == before["saved_hooks"] + 2  # both layers: autograd's own node


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,states",
                         [(1, False, False, True, False), (2, True, True, True, True), (2, False, True, False, True),
                          (1, True, False, False, False)])
def test_fused_equals_the_python_backward_through_time(rule, layers, bidirectional, batch_first, bias, states,
                                                       monkeypatch):
    torch.manual_seed(0)
    plain = nn.LSTM(5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    model = falign.convert(nn.Sequential(plain), rule, seed=2)[0]
    x = torch.randn(4, 6, 5)
    count = layers * (2 if bidirectional else 1)
    n = x.shape[0 if batch_first else 1]
    hx = (torch.randn(count, n, 7), torch.randn(count, n, 7)) if states else None
    out_p, g_p, ran_p = _grads(model, x, hx, False, monkeypatch)
    assert ran_p == {"fused": 0, "python": 1, "saved_hooks": 0}
    trained_b = falign.get_rule(rule).feedback_is_parameter  # kp: B's gradient comes from the Function
    for hooks in (True, False):  # the saved-tensor path, then falign's Function around the same ops
        out_f, g_f, ran_f = _grads(model, x, hx, True, monkeypatch, hooks=hooks)
        assert ran_f == {"fused": 1, "python": 0, "saved_hooks": layers if hooks and not trained_b else 0}
        for a, b in zip(out_f, out_p):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_f, g_p):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the rule is in force: backprop's gradient of the input differs
    with falign.functional.backprop_mode():
        _, g_bp, _ = _grads(model, x, hx, True, monkeypatch)
    assert not torch.allclose(g_bp[0], g_f[0], atol=1e-3)


def test_gradients_into_the_final_states_only(monkeypatch):
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(nn.LSTM(3, 4, bidirectional=True)), "fa", seed=1)[0]
    x = torch.randn(5, 2, 3)
    _, g_f, _ = _grads(model, x, None, True, monkeypatch, loss_on="states")
    _, g_p, _ = _grads(model, x, None, False, monkeypatch, loss_on="states")
    for a, b in zip(g_f, g_p):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class _Last(nn.Module):
    def __init__(self, proj_size: int = 0):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, proj_size=proj_size, batch_first=True)
        self.head = nn.Linear(proj_size or 4, 2)

    def forward(self, x):
        out = self.rnn(x)[0]
        if isinstance(out, nn.utils.rnn.PackedSequence):
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
        return self.head(out[:, -1])


@pytest.mark.parametrize("case", ["proj_size", "packed", "direct", "float64", "fused"])
def test_what_the_fused_ops_cannot_express_takes_the_python_path(case):
    torch.manual_seed(0)
    plain = _Last(proj_size=2 if case == "proj_size" else 0)
    if case == "float64":
        plain = plain.double()
    model = falign.convert(plain, "dfa" if case == "direct" else "fa", seed=0)
    x = torch.randn(2, 5, 3, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    before = dict(recurrent.FUSED_CALLS)
    model(x).sum().backward()
    ran = {k: recurrent.FUSED_CALLS[k] - before[k] for k in before}
    if case == "fused":  # the control: the same model, nothing the fused ops cannot express
        assert ran == {"fused": 1, "python": 0, "saved_hooks": 1}
    else:  # (a direct rule's first call also runs a planning forward)
        assert ran["fused"] == 0 and ran["python"] >= 1


def test_a_changed_schema_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(recurrent, "_fused_state", {})
    schemas = dict(recurrent._FUSED_SCHEMAS)
    schemas["mkldnn_rnn_layer"] = (*schemas["mkldnn_rnn_layer"], "a_new_argument")
    monkeypatch.setattr(recurrent, "_FUSED_SCHEMAS", schemas)
    model = falign.convert(nn.Sequential(nn.LSTM(3, 4)), "fa", seed=0)[0]
    before = dict(recurrent.FUSED_CALLS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(torch.randn(5, 2, 3))[0].sum().backward()
    notes = [w for w in caught if "fused LSTM" in str(w.message)]
    assert len(notes) == 1 and "a_new_argument" in str(notes[0].message)
    assert recurrent.FUSED_CALLS["python"] == before["python"] + 2
    assert recurrent.FUSED_CALLS["fused"] == before["fused"]


def test_a_retained_graph_differentiated_twice_gives_the_same_gradients(monkeypatch):
    """The fused backward must not consume its workspace (cuDNN's overwrites its reserve: copied there)."""
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(nn.LSTM(3, 4, num_layers=2, bidirectional=True)), "fa", seed=1)[0]
    x = torch.randn(5, 2, 3, requires_grad=True)
    before = dict(recurrent.FUSED_CALLS)
    loss = (model(x)[0] ** 2).sum()
    first = torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True)
    assert recurrent.FUSED_CALLS["fused"] == before["fused"] + 1
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_the_cudnn_ops_have_the_schemas_the_cuda_path_calls():
    """The CUDA path (run by benchmarks/gpu_check.py where a GPU is lent) calls cuDNN's private RNN ops; their
    schemas are in every torch build, so a change on the pinned torch fails here, without a GPU."""
    for name, expected in recurrent._CUDNN_SCHEMAS.items():
        got = tuple(a.name for a in getattr(torch.ops.aten, name).default._schema.arguments)
        assert got == expected, f"aten::{name} changed: update falign.nn.recurrent's cuDNN path"
    assert set(recurrent._CUDNN_MODES) == {"RNN_RELU", "RNN_TANH", "LSTM", "GRU"}


def _fa_lstm(**kwargs):
    torch.manual_seed(0)
    return falign.convert(nn.Sequential(nn.LSTM(3, 4, **kwargs)), "fa", seed=1)[0]


def test_a_forward_without_backward_frees_its_graph_at_once():
    """The LSTM op saves its own outputs; packed as they are, they would hold their graph in a reference cycle
    (with the multi-megabyte workspace) until the garbage collector runs. Control: the same call without detach."""
    model = _fa_lstm()
    x = torch.randn(5, 2, 3, requires_grad=True)
    gc.disable()
    try:
        out = model(x)[0]
        assert out.grad_fn.name() == "MkldnnRnnLayerBackward0"  # autograd's own node: the saved-tensor path
        alive = weakref.ref(out)
        del out
        assert alive() is None
        # the control: PyTorch's op under hooks that pack its outputs undetached keeps them alive
        w = [p.detach().requires_grad_() for p in (model.weight_ih_l0, model.weight_hh_l0, model.bias_ih_l0,
                                                   model.bias_hh_l0)]
        h0 = torch.zeros(2, 4)
        (out, *_), swapped = FF._swap_saved_call(
            torch.ops.aten.mkldnn_rnn_layer, [FF._Swap(w[0], torch.randn(16, 3), None)], x.detach(), *w, h0, h0,
            False, [], recurrent._LSTM_MODE, 4, 1, True, False, False, True, detach=False)
        assert swapped
        alive = weakref.ref(out)
        del out
        assert alive() is not None
    finally:
        gc.enable()
        gc.collect()


def test_in_place_changes_before_the_backward_are_caught():
    for target in ("weight_ih_l0", "weight_hh_l0", "feedback"):
        model = _fa_lstm()
        x = torch.randn(5, 2, 3, requires_grad=True)
        before = recurrent.FUSED_CALLS["saved_hooks"]
        out = model(x)[0]
        assert recurrent.FUSED_CALLS["saved_hooks"] == before + 1
        tensor = (model.feedback.weight_hh_l0.feedback_weight if target == "feedback" else getattr(model, target))
        with torch.no_grad():
            tensor.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    # the control: no change, no error
    model = _fa_lstm()
    model(torch.randn(5, 2, 3, requires_grad=True))[0].sum().backward()


def test_a_create_graph_backward_is_refused_unless_in_double_backward():
    model = _fa_lstm()
    x = torch.randn(5, 2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double_backward"):
        torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
    with FF.double_backward():  # the Function path: its backward is once-differentiable and says so
        out = model(x)[0]
    assert out.grad_fn is not None
    torch.autograd.grad(out.sum(), x)  # an ordinary backward works there


def test_other_saved_tensor_hooks_take_the_function_path_with_the_same_gradients():
    model = _fa_lstm(num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    reference = torch.autograd.grad(model(x)[0].square().sum(), [x, *model.parameters()], allow_unused=True)
    before = recurrent.FUSED_CALLS["saved_hooks"]
    with torch.autograd.graph.save_on_cpu():
        out = model(x)[0]
    assert recurrent.FUSED_CALLS["saved_hooks"] == before
    got = torch.autograd.grad(out.square().sum(), [x, *model.parameters()], allow_unused=True)
    for a, b in zip(got, reference):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_a_weight_the_hooks_do_not_find_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(FF._SwapSaved, "pack", lambda self, t: (t, t._version, None, False))
    monkeypatch.setattr(FF, "_warned_no_swap", set())
    model = _fa_lstm()
    before = dict(recurrent.FUSED_CALLS)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="LSTM layer backward did not save the weight"):
        model(x)[0].square().sum().backward()
    assert recurrent.FUSED_CALLS["saved_hooks"] == before["saved_hooks"]
    assert recurrent.FUSED_CALLS["fused"] == before["fused"] + 1
    got = [x.grad, *(p.grad for p in model.parameters())]
    monkeypatch.setattr(recurrent, "USE_FUSED", False)  # the reference: the Python backward through time
    model.zero_grad()
    x.grad = None
    model(x)[0].square().sum().backward()
    for a, b in zip(got, [x.grad, *(p.grad for p in model.parameters())]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", ["fa", "kp"])  # the saved-tensor path and the Function path
@pytest.mark.parametrize("layers,bidirectional,layout", [(1, False, "expand"), (2, True, "transpose")])
def test_initial_states_of_any_layout(rule, layers, bidirectional, layout, monkeypatch):
    """oneDNN's op reads h0, c0 as dense memory whatever their strides: a learned state broadcast over the batch
    (expand) or a transposed one must give stock nn.LSTM's output, and the rule's gradients the Python path's."""
    torch.manual_seed(0)
    plain = nn.LSTM(3, 4, num_layers=layers, bidirectional=bidirectional)
    model = falign.convert(nn.Sequential(plain), rule, seed=1)[0]
    count = layers * (2 if bidirectional else 1)
    x = torch.randn(5, 2, 3, requires_grad=True)

    def state():
        if layout == "expand":
            return torch.randn(count, 1, 4).requires_grad_(), lambda t: t.expand(count, 2, 4)
        return torch.randn(2, count, 4).requires_grad_(), lambda t: t.transpose(0, 1)

    (h, make_h), (c, make_c) = state(), state()
    assert not make_h(h).is_contiguous()

    def run(fused):
        monkeypatch.setattr(recurrent, "USE_FUSED", fused)
        out, (h_n, c_n) = model(x, (make_h(h), make_c(c)))
        loss = out.square().sum() + h_n.sum() + c_n.square().sum()
        return out, torch.autograd.grad(loss, [x, h, c, *model.parameters()], allow_unused=True)

    out_f, g_f = run(True)
    _, g_p = run(False)
    torch.testing.assert_close(out_f, plain(x, (make_h(h), make_c(c)))[0])
    for a, b in zip(g_f, g_p):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_final_states_can_be_changed_in_place_as_pytorchs():
    for model in (nn.LSTM(3, 4), _fa_lstm()):  # stock PyTorch first: the behaviour to match
        out, (h_n, c_n) = model(torch.randn(5, 2, 3, requires_grad=True))
        h_n.zero_()
        c_n.detach_()
        out.sum().backward()


def test_under_autocast_the_saved_tensor_path_runs_in_float32_with_the_same_gradients():
    """The recurrence runs with autocast off (in the parameters' dtype), so the fast path applies there too and
    gives exactly the gradients of the same call without autocast."""
    model = _fa_lstm(num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    reference = torch.autograd.grad(model(x)[0].square().sum(), [x, *model.parameters()])
    before = recurrent.FUSED_CALLS["saved_hooks"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)[0]
    assert out.dtype == torch.float32 and recurrent.FUSED_CALLS["saved_hooks"] == before + 2
    for a, b in zip(torch.autograd.grad(out.square().sum(), [x, *model.parameters()]), reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["fa", "usf", "brsf"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,states", [(1, False, True, False), (2, True, False, True)])
def test_one_call_of_torchs_lstm_equals_the_layer_loop(monkeypatch, rule, layers, bidirectional, batch_first, states):
    """A batched, unpacked LSTM runs as one ``torch._VF.lstm`` call under the hooks (checked: the path is taken),
    with the same outputs and gradients, bit for bit, as the loop over layers that calls oneDNN's layer op itself."""
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(nn.LSTM(3, 4, num_layers=layers, bidirectional=bidirectional,
                                                 batch_first=batch_first)), rule, seed=2)[0]
    x = torch.randn(5, 2, 3, requires_grad=True)
    hx = tuple(torch.randn(layers * (2 if bidirectional else 1), 5 if batch_first else 2, 4, requires_grad=True)
               for _ in range(2)) if states else None
    taken = []
    whole = recurrent._FARNNBase._whole_lstm
    monkeypatch.setattr(recurrent._FARNNBase, "_whole_lstm",
                        lambda self, i, h: taken.append(whole(self, i, h)) or taken[-1])

    def run():
        out, (h_n, c_n) = model(x, hx)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h_n.square().sum() + c_n.sum()
        return [out, h_n, c_n], torch.autograd.grad(loss, [x, *(hx or ()), *model.parameters()], allow_unused=True)

    outs, grads = run()
    assert taken and taken[-1] is not None
    monkeypatch.setattr(recurrent._FARNNBase, "_whole_lstm", lambda self, i, h: None)  # the layer loop
    loop_outs, loop_grads = run()
    for a, b in zip([*outs, *grads], [*loop_outs, *loop_grads]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_dropout_between_layers_takes_the_layer_loop():
    model = falign.convert(nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.5)), "fa", seed=0)[0]
    assert model._whole_lstm(torch.randn(5, 2, 3, requires_grad=True), None) is None
    model.eval()
    assert model._whole_lstm(torch.randn(5, 2, 3, requires_grad=True), None) is not None
