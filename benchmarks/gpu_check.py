"""CUDA checks: every rule's gradients on the GPU equal the CPU's, diagnostics and compile work there.

Run on a machine with a GPU:  python benchmarks/gpu_check.py [--json out.json]

1. For each rule, an MLP and a LeNet converted with the same seed: float64 gradients of one batch on
   CUDA against the same computation on the CPU (brsf: each against its own ``g·B_t``, the draws
   differ between devices).
2. Diagnostics on CUDA (the backward runs on the device's autograd thread): the true gradients from
   ``backprop_mode`` equal plain autograd's; the output layer's gradient angle is 0.
3. Conservation drift halves with the learning rate on CUDA (fa, float64).
4. ``torch.compile`` (inductor) of an fa model: gradients equal eager's.
5. Converted RNN/GRU/LSTM run cuDNN's fused kernels with the rule's B (``aten::_cudnn_rnn_backward`` with B's
   flat buffer): for every cell, layer-by-layer rule and layer option (layers, directions, batch_first, bias,
   initial states), the fused gradients equal the Python backward through time (the reference, itself tested
   against a naive unrolled FA on the CPU) in float64 (B ≠ W) and within TF32's tolerance in float32; under
   ``backprop_mode`` (B = W) they equal PyTorch's own layer; a retained graph differentiated twice gives the same
   gradients; the fused path is taken (a counter).
6. Step time of one fa LSTM/GRU forward + backward against plain PyTorch's, fused and Python path (medians of
   interleaved repeats).
"""

from __future__ import annotations

import argparse
import copy
import json
import traceback

import torch
from torch import nn

import falign
from falign.app.experiments.base import float64_digits
from falign.app.experiments.flow import sgd_flow
from falign.diagnostics import backprop_gradients, gradient_alignment
from falign.models import MLP, LeNet5

DT = torch.float64


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if falign.uses_target(model):
        falign.set_target(model, y)
    nn.functional.cross_entropy(model(x), y).backward()
    return [x.grad] + [p.grad for n, p in model.named_parameters() if "feedback" not in n]


def check_devices() -> dict:
    out = {}
    cases = {"mlp": (lambda: MLP([64, 48, 32, 10]), (64,)), "lenet": (lambda: LeNet5(1, 10, 28), (1, 28, 28))}
    for name, (build, shape) in cases.items():
        for rule in falign.available_rules():
            torch.manual_seed(0)
            base = build().to(DT)
            cpu = falign.convert(base, rule, seed=3)
            x = torch.randn(8, *shape, dtype=DT)
            y = torch.randint(0, 10, (8,))
            cpu(x)  # materialise lazy (dfa conv) feedback before copying
            gpu = copy.deepcopy(cpu).cuda()
            g_cpu = grads(cpu, x, y)
            g_gpu = grads(gpu, x.cuda(), y.cuda())
            diff = max(float((a - b.cpu()).abs().max()) for a, b in zip(g_cpu, g_gpu))
            ok = diff < 1e-9
            out[f"{name}/{rule}"] = {"max_abs_diff": diff, "ok": bool(ok)}
    return out


def check_diagnostics() -> dict:
    torch.manual_seed(0)
    plain = MLP([64, 48, 32, 10]).to(DT).cuda()
    model = falign.convert(plain, "fa", seed=1)
    x, y = torch.randn(32, 64, dtype=DT).cuda(), torch.randint(0, 10, (32,)).cuda()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    params = {n: p for n, p in model.named_parameters() if "feedback" not in n}
    true = backprop_gradients(loss, params)
    ref = copy.deepcopy(plain)
    nn.functional.cross_entropy(ref(x), y).backward()
    diff = max(float((true[n] - p.grad).abs().max()) for n, p in ref.named_parameters())
    angles = gradient_alignment({k: params[k].grad for k in params if k.endswith("weight")},
                                {k: true[k] for k in true if k.endswith("weight")})
    return {"true_grad_max_diff": diff, "output_angle": angles["fc3.weight"], "hidden_angle": angles["fc1.weight"],
            "ok": diff < 1e-9 and angles["fc3.weight"] < 1e-3 and angles["fc1.weight"] > 1}


def check_conservation() -> dict:
    x, y = float64_digits(256)
    x, y = x.cuda(), y.cuda()
    drifts = []
    for lr in (0.1, 0.05):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10))
        model = falign.convert(net.to(DT).cuda(), "fa", seed=0)
        drifts.append(sgd_flow(model, x, y, lr, 10.0)["drift"]["2->4"]["max_drift"])
    ratio = drifts[1] / drifts[0]
    return {"drifts": drifts, "ratio": ratio, "ok": 0.4 < ratio < 0.6}


def check_compile() -> dict:
    torch.manual_seed(0)
    base = MLP([64, 128, 128, 10]).cuda()
    eager = falign.convert(base, "fa", seed=0)
    compiled_model = falign.convert(base, "fa", seed=0)
    compiled = torch.compile(compiled_model)
    x, y = torch.randn(64, 64).cuda(), torch.randint(0, 10, (64,)).cuda()
    diffs = []
    for model, target in ((eager, eager), (compiled, compiled_model)):
        target.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    for p, q in zip(eager.parameters(), compiled_model.parameters()):
        if p.grad is not None:
            diffs.append(float((p.grad - q.grad).abs().max()))
    return {"max_abs_diff": max(diffs), "ok": max(diffs) < 1e-4}


def _rnn_grads(model, x, hx, fused: bool, retain: bool = False):
    from falign.nn import recurrent

    recurrent.USE_FUSED = fused
    before = dict(recurrent.FUSED_CALLS)
    x = x.clone().requires_grad_(True)
    hx = tuple(t.clone().requires_grad_(True) for t in hx) if isinstance(hx, tuple) else (
        hx.clone().requires_grad_(True) if hx is not None else None)
    out, h_n = model(x, hx)
    parts = [out, *(h_n if isinstance(h_n, tuple) else (h_n,))]
    loss = sum((t * torch.linspace(-1, 1, t.numel(), device=t.device, dtype=t.dtype).view_as(t)).sum()
               + (t ** 2).sum() for t in parts)
    inputs = [x, *((hx if isinstance(hx, tuple) else (hx,)) if hx is not None else ()), *model.parameters()]
    inputs = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain)
    again = torch.autograd.grad(loss, inputs, allow_unused=True) if retain else None
    recurrent.USE_FUSED = True
    ran = {k: recurrent.FUSED_CALLS[k] - before[k] for k in before}
    return grads, again, ran


def _max_rel(a, b) -> float:
    worst = 0.0
    for p, q in zip(a, b):
        if (p is None) != (q is None):
            return float("inf")
        if p is not None:
            worst = max(worst, float((p - q).abs().max() / q.abs().max().clamp_min(1e-30)))
    return worst


CELLS = {"lstm": lambda *a, **k: nn.LSTM(*a, **k), "gru": lambda *a, **k: nn.GRU(*a, **k),
         "rnn_tanh": lambda *a, **k: nn.RNN(*a, **k), "rnn_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k)}


def check_fused_rnn() -> dict:
    rules = [r for r in falign.available_rules() if falign.get_rule(r).has_feedback and not falign.get_rule(r).direct]
    options = [(1, False, False, True, False), (2, True, True, True, True), (2, False, True, False, True),
               (1, True, False, False, False)]
    out: dict = {}
    for cell, make in CELLS.items():
        worst = {"float64": 0.0, "float32": 0.0, "bp_vs_torch": 0.0, "twice": 0.0}
        counts_ok, rule_in_force = True, True
        for layers, bidir, bf, bias, states in options:
            for dtype in (torch.float64, torch.float32):
                key = "float64" if dtype == torch.float64 else "float32"
                for rule in rules:
                    torch.manual_seed(0)
                    plain = make(5, 7, num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias).to(dtype)
                    model = falign.convert(nn.Sequential(plain), rule, seed=2)[0].cuda()
                    x = torch.randn(4, 6, 5, dtype=dtype, device="cuda")
                    n = x.shape[0 if bf else 1]
                    count = layers * (2 if bidir else 1)
                    hx = None
                    if states:
                        h = torch.randn(count, n, 7, dtype=dtype, device="cuda")
                        hx = (h, torch.randn_like(h)) if cell == "lstm" else h
                    g_f, g_twice, ran_f = _rnn_grads(model, x, hx, True, retain=True)
                    g_p, _, ran_p = _rnn_grads(model, x, hx, False)
                    counts_ok &= ran_f == {"fused": 1, "python": 0} and ran_p == {"fused": 0, "python": 1}
                    worst[key] = max(worst[key], _max_rel(g_f, g_p))
                    worst["twice"] = max(worst["twice"], _max_rel(g_twice, g_f))
                    if dtype == torch.float64 and rule == "fa":
                        with falign.functional.backprop_mode():
                            g_bp, _, _ = _rnn_grads(model, x, hx, True)
                        ref = plain.cuda()
                        g_t, _, _ = _rnn_grads(ref, x, hx, True)
                        worst["bp_vs_torch"] = max(worst["bp_vs_torch"], _max_rel(g_bp, g_t))
                        rule_in_force &= _max_rel(g_f, g_t) > 1e-3
        out[cell] = {**worst, "fused_taken": counts_ok, "rule_differs_from_bp": rule_in_force,
                     "ok": bool(counts_ok and rule_in_force and worst["float64"] < 1e-9 and worst["float32"] < 2e-2
                                and worst["bp_vs_torch"] < 1e-9 and worst["twice"] == 0.0)}
    return out


def rnn_speed(repeats: int = 50) -> dict:
    """Forward + backward of a 2-layer recurrent layer (T 64, N 128, 256 → 512), fa fused and Python path, as
    multiples of plain PyTorch's, medians of interleaved repeats (CUDA events)."""
    import statistics

    from falign.nn import recurrent

    out: dict = {}
    for cell in ("lstm", "gru"):
        torch.manual_seed(0)
        plain = CELLS[cell](256, 512, num_layers=2).cuda()
        model = falign.convert(nn.Sequential(plain), "fa", seed=0)[0].cuda()
        x = torch.randn(64, 128, 256, device="cuda", requires_grad=True)
        variants = {"torch": (plain, True), "fa_fused": (model, True), "fa_python": (model, False)}
        times: dict = {k: [] for k in variants}
        for i in range(repeats + 5):
            for name, (m, fused) in variants.items():
                recurrent.USE_FUSED = fused
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                m(x)[0].sum().backward()
                end.record()
                torch.cuda.synchronize()
                if i >= 5:
                    times[name].append(start.elapsed_time(end))
        recurrent.USE_FUSED = True
        med = {k: statistics.median(v) for k, v in times.items()}
        out[cell] = {"ms": med, "x_torch": {k: med[k] / med["torch"] for k in med},
                     "range_ms": {k: (min(v), max(v)) for k, v in times.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("devices", check_devices), ("diagnostics", check_diagnostics),
                     ("conservation", check_conservation), ("compile", check_compile),
                     ("fused_rnn", check_fused_rnn), ("rnn_speed", rnn_speed)):
        try:
            report[name] = fn()
        except Exception:  # report every section, even after a failure
            report[name] = {"ok": False, "error": traceback.format_exc()[-1500:]}
        result = report[name]
        ok = result.get("ok", all(v.get("ok", True) for v in result.values() if isinstance(v, dict)))
        print(f"{name}: {'PASS' if ok else 'FAIL'}", flush=True)
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
