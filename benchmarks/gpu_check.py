"""CUDA checks: every rule's gradients on the GPU equal the CPU's, diagnostics and compile work there.

Run on a machine with a GPU:  python benchmarks/gpu_check.py [--json out.json]

1. For each rule, an MLP and a LeNet converted with the same seed: float64 gradients of one batch on
   CUDA against the same computation on the CPU (brsf: each against its own ``g·B_t``, the draws
   differ between devices).
2. Diagnostics on CUDA (the backward runs on the device's autograd thread): the true gradients from
   ``backprop_mode`` equal plain autograd's; the output layer's gradient angle is 0.
3. Conservation drift halves with the learning rate on CUDA (fa, float64).
4. ``torch.compile`` (inductor) of an fa model: gradients equal eager's.
"""

from __future__ import annotations

import argparse
import copy
import json
import traceback

import torch
from torch import nn

import falign
from falign.diagnostics import backprop_gradients, gradient_alignment
from falign.experiments.base import float64_digits
from falign.experiments.flow import sgd_flow
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("devices", check_devices), ("diagnostics", check_diagnostics),
                     ("conservation", check_conservation), ("compile", check_compile)):
        try:
            report[name] = fn()
        except Exception:  # report every section, even after a failure
            report[name] = {"ok": False, "error": traceback.format_exc()[-1500:]}
        result = report[name]
        ok = result.get("ok", all(v.get("ok") for v in result.values() if isinstance(v, dict)))
        print(f"{name}: {'PASS' if ok else 'FAIL'}", flush=True)
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
