"""falign against BioTorch 0.0.16, side by side in one process: gradients, speed, and failures.

Setup (BioTorch's layers import only torch; its other requirements are not needed here):

    pip install --no-deps biotorch==0.0.16
    python benchmarks/vs_biotorch.py                 # both models, fa usf brsf frsf dfa
    python benchmarks/vs_biotorch.py --repeats 300 --json vs_biotorch.json

1. Same weights, same feedback: each model is converted by both libraries from one plain model; the
   feedback matrices are copied from falign into BioTorch (usf: falign takes BioTorch's scale; frsf:
   falign takes BioTorch's |R|), then one float64 forward/backward on the same batch compares every
   parameter gradient. brsf redraws B independently in each library, so only its local weight/bias
   gradients are comparable; BioTorch's convolutional DFA uses a different feedback (a shared kernel
   ``(n_out, C_in, k, k)`` applied to the spatially repeated error) from falign's dense ``D`` of
   ``(n_out, C·H·W)``, so gradients that depend on a conv layer's DFA signal are not comparable.
2. Speed: forward + backward + SGD step of falign, BioTorch and plain PyTorch on the same weights,
   timed round-robin; medians and ratios. BioTorch's DFA needs ``model(x, targets, loss_function)``
   (an extra autograd.grad), which is part of its step.
3. Known BioTorch failures, probed and recorded: inputs with more than 2 dimensions, padding modes
   other than zeros, ``padding='same'``, Conv1d.

Targets: falign at most 0.9x BioTorch's time for every rule, at most 1.05x plain backprop
(brsf 1.15x).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import time

import torch
from torch import nn

import falign
from falign.app.bench.speed import MODELS, batch_of

try:
    from biotorch.module.biomodule import BioModule
except ImportError as err:  # pragma: no cover - optional
    raise SystemExit(f"BioTorch is not installed ({err}); run: pip install --no-deps biotorch==0.0.16") from None

RULES = ["fa", "usf", "brsf", "frsf", "dfa"]
TARGET_VS_BIOTORCH = 0.9
TARGET_VS_TORCH = {"brsf": 1.15}


def biotorch(model: nn.Module, rule: str) -> nn.Module:
    with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints a conversion summary
        return BioModule(copy.deepcopy(model), mode=rule, copy_weights=True, output_dim=10)


def paired_layers(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(falign layer name, falign layer, BioTorch layer) in module order."""
    mine = [(n, m) for n, m in ours.named_modules() if isinstance(m, falign.nn.FeedbackLayer)]
    other = [m for m in theirs.modules() if hasattr(m, "weight_backward")]
    assert len(mine) == len(other), (len(mine), len(other))
    return [(n, a, b) for (n, a), b in zip(mine, other)]


@torch.no_grad()
def share_feedback(rule: str, ours: nn.Module, theirs: nn.Module) -> None:
    for _, a, b in paired_layers(ours, theirs):
        if rule == "fa" or (rule == "dfa" and a.feedback_weight.shape == b.weight_backward.shape):
            b.weight_backward.copy_(a.feedback_weight)
        elif rule == "usf":
            a.feedback_weight.fill_(b.scaling_factor)
        elif rule == "frsf":
            a.feedback_weight.copy_(b.weight_backward.abs())


def _loss(model: nn.Module, rule: str, x, y, theirs: bool):
    if theirs and rule == "dfa":
        out = model(x, targets=y, loss_function=nn.functional.cross_entropy)
    else:
        out = model(x)
    return nn.functional.cross_entropy(out, y)


def gradient_check(name: str, rule: str, device: str = "cpu") -> list[dict]:
    build, shape, batch = MODELS[name]
    torch.manual_seed(0)
    base = build().double()
    ours = falign.convert(base, rule, seed=0).to(device)
    theirs = biotorch(base, rule).double().to(device)
    ours.train()
    theirs.train()
    # same feedback in both (where the definitions agree): see share_feedback
    share_feedback(rule, ours, theirs)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    for model, is_theirs in ((ours, False), (theirs, True)):
        model.zero_grad(set_to_none=True)
        _loss(model, rule, x, y, is_theirs).backward()
    rows = []
    pairs = paired_layers(ours, theirs)
    not_comparable = None
    for layer_name, a, b in reversed(pairs):  # from the output down: DFA conv signals flow downwards
        for pname in ("weight", "bias"):
            pa, pb = getattr(a, pname), getattr(b, pname)
            if pa is None:
                continue
            diff = float((pa.grad - pb.grad).abs().max())
            scale = float(pa.grad.abs().max())
            if rule == "brsf" and a is not pairs[-1][1]:
                verdict = "B_t drawn independently by each library: not comparable"
            elif not_comparable:
                verdict = not_comparable
            else:
                verdict = "equal" if diff <= 1e-9 * max(scale, 1.0) else "DIFFERENT"
            rows.append({"model": name, "rule": rule, "layer": f"{layer_name}.{pname}", "max abs diff": diff,
                         "grad scale": scale, "verdict": verdict})
        if rule == "dfa" and a.weight.dim() > 2:
            not_comparable = "signal through BioTorch's conv DFA kernel (another definition): not comparable"
    return list(reversed(rows))


def timing(name: str, rules: list[str], repeats: int, warmup: int, device: str = "cpu") -> list[dict]:
    base, x, y, batch = batch_of(name, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    variants = {("torch", "-"): (base, False, "torch")}
    for rule in rules:
        ours = falign.convert(base, rule, seed=0)
        theirs = biotorch(base, rule).to(device)
        share_feedback(rule, ours, theirs)
        variants[("falign", rule)] = (ours, False, rule)
        variants[("biotorch", rule)] = (theirs, True, rule)
    steps = {}
    for key, (model, is_theirs, rule) in variants.items():
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, opt=opt, is_theirs=is_theirs, rule=rule):
            opt.zero_grad(set_to_none=True)
            _loss(model, rule, x, y, is_theirs).backward()
            opt.step()

        steps[key] = step
    for _ in range(warmup):
        for s in steps.values():
            s()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for key, s in steps.items():
            sync()
            t0 = time.perf_counter()
            s()
            sync()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for rule in rules:
        f, b, t = med[("falign", rule)], med[("biotorch", rule)], med[("torch", "-")]
        target_t = TARGET_VS_TORCH.get(rule, 1.05)
        rows.append({"model": f"{name} (b={batch})", "rule": rule, "falign ms": f * 1e3, "biotorch ms": b * 1e3,
                     "torch ms": t * 1e3, "falign/biotorch": f / b, "falign/torch": f / t,
                     "met vs biotorch": f / b <= TARGET_VS_BIOTORCH, "met vs torch": f / t <= target_t})
    return rows


def _probe(fn) -> str:
    try:
        return fn()
    except Exception as err:  # recording the other library's failure is the point
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:90]}"


def failures() -> list[dict]:
    torch.manual_seed(0)
    rows = []

    def seq_input(lib: str) -> str:
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
        model = falign.convert(net, "fa") if lib == "falign" else biotorch(net, "fa")
        x = torch.randn(4, 5, 8)
        model(x).sum().backward()
        return "works"

    def conv(lib: str, **opts) -> str:
        net = nn.Sequential(nn.Conv2d(2, 3, 3, **opts), nn.Flatten())
        ref = copy.deepcopy(net)
        model = falign.convert(net, "fa") if lib == "falign" else biotorch(net, "fa")
        x = torch.randn(2, 2, 6, 6, requires_grad=True)
        out = model(x)
        diff = float((out - ref(x)).detach().abs().max())
        out.sum().backward()
        return "works" if diff < 1e-5 else f"wrong forward output (max diff {diff:.2g} from nn.Conv2d)"

    def conv1d(lib: str) -> str:
        net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 10))
        model = falign.convert(net, "fa") if lib == "falign" else biotorch(net, "fa")
        converted = [m for m in model.modules() if isinstance(m, nn.Conv1d) and
                     (hasattr(m, "weight_backward") or hasattr(m, "feedback_weight"))]
        return "works" if converted else "Conv1d silently left on backprop"

    probes = {
        "Linear on (N, T, D) inputs": seq_input,
        "Conv2d padding_mode='reflect'": lambda lib: conv(lib, padding=1, padding_mode="reflect"),
        "Conv2d padding_mode='circular'": lambda lib: conv(lib, padding=1, padding_mode="circular"),
        "Conv2d padding='same'": lambda lib: conv(lib, padding="same"),
        "Conv1d": conv1d,
    }
    for case, fn in probes.items():
        rows.append({"case": case, "falign": _probe(lambda fn=fn: fn("falign")),
                     "biotorch": _probe(lambda fn=fn: fn("biotorch"))})
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    models, rules = args.models.split(","), args.rules.split(",")
    grads = [row for m in models for r in rules for row in gradient_check(m, r, args.device)]
    speed = [row for m in models for row in timing(m, rules, args.repeats, args.warmup, args.device)]
    fails = failures()
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else f"{platform.machine()}, {torch.get_num_threads()} threads") + f", torch {torch.__version__}"
    print(f"# falign vs BioTorch 0.0.16 ({machine})\n\n## Gradients with shared weights and feedback (float64)\n")
    print(table(grads))
    print(f"\n## Step time, median of {args.repeats} round-robin steps\n")
    print(table(speed))
    print("\n## Known-failure probes\n")
    print(table(fails))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "gradients": grads, "speed": speed, "failures": fails}, f, indent=2)


if __name__ == "__main__":
    main()
