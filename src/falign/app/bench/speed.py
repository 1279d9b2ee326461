"""Step-time benchmark: each rule against plain PyTorch backprop, measured in the same run.

A *step* is forward + loss + backward + SGD step (+ the rule's own per-step work: brsf's redraw,
wm's mirror step). Variants are timed in interleaved rounds (each variant: one untimed step, then one timed
step, so the timed one is its second in a row, as in a training loop), so drifts in machine
speed hit every variant alike; the table reports medians and the ratio to plain PyTorch (an
unconverted ``nn.Module``, the same weights).

Memory: ``state`` is parameters, buffers (feedback), scratch buffers and optimiser state after warm-up;
``step peak`` is what one step allocates on top (CUDA: ``max_memory_allocated``; CPU: the profiler's
allocation events). The last column is ``(state + peak) − (bp's state + peak) − feedback matrices``:
zero or less means "backprop's memory plus the feedback matrices, no more".

Run:  falign bench speed                      # both models, every rule, CPU (= python benchmarks/step_time.py)
      falign bench speed --compile            # also torch.compile'd models
      falign bench speed --repeats 300 --device cuda --json out.json
      falign bench speed --device cuda --models gpu   # the sizes a GPU user trains: ResNet-20/56 at batch 128
                                              # and 256, a 4096-wide MLP at batch 1024, a ViT at batch 256
Targets on the CPU, step time as a multiple of plain PyTorch's: fa at most 1.02x (it does
backprop's matrix products and nothing else); kp 1.05x; usf and frsf 1.08x; brsf 1.10x (its per-step redraw
is the cost); wm 1.25x at its defaults (or a mirror schedule: --rule-option every=k); dfa 1.05x. On a GPU at
realistic sizes (--models gpu) the target is 1.03x for every rule but wm. The "met" column compares with the
CPU targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

import falign
from falign.app.outdir import atomic_write, check_file
from falign.errors import FalignError
from falign.models import MLP, LeNet5
from falign.models.resnet import resnet20, resnet56

K = TypeVar("K")

FORMS = ["kp:form=offset"]  # variants with a rule option: "rule:key=value"
TARGETS = {"fa": 1.02, "kp": 1.05, "kp:form=offset": 1.05, "usf": 1.08, "frsf": 1.08, "brsf": 1.10, "wm": 1.25,
           "dfa": 1.05}
MODELS = {
    "mlp": (lambda: MLP([784, 1024, 1024, 10]), (784,), 128),
    "lenet": (lambda: LeNet5(1, 10, 28), (1, 28, 28), 64),
    "deconv": (lambda: _deconv(), (1, 28, 28), 64),
    # the sizes a GPU user trains: CIFAR-shaped ResNets, a wide MLP, a Vision Transformer
    "resnet20-b128": (lambda: resnet20(10, 3), (3, 32, 32), 128),
    "resnet20-b256": (lambda: resnet20(10, 3), (3, 32, 32), 256),
    "resnet56-b128": (lambda: resnet56(10, 3), (3, 32, 32), 128),
    "resnet56-b256": (lambda: resnet56(10, 3), (3, 32, 32), 256),
    "mlp4096-b1024": (lambda: MLP([3072, 4096, 4096, 4096, 10]), (3072,), 1024),
    "vit-b256": (lambda: _vit(), (3, 32, 32), 256),
}
# models with parameters no converted layer stands for (the ViT's class token and positions): left on backprop
UNSUPPORTED_BACKPROP = frozenset({"vit-b256"})
GPU_MODELS = ("resnet20-b128", "resnet20-b256", "resnet56-b128", "resnet56-b256", "mlp4096-b1024", "vit-b256")


def _vit() -> nn.Module:
    """A ViT on 32×32 RGB images (4×4 patches, width 192, 6 layers, 3 heads): the attention layers' step time."""
    from falign.models.sequence import PatchViT

    class RGBViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Conv2d(3, 1, 1)  # channels to one plane, then PatchViT's 4×4 patches
            self.vit = PatchViT(32, 4, 10, dim=192, depth=6, heads=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(self.mix(x))

    return RGBViT()


def _deconv() -> nn.Module:
    """A convolutional encoder and a transposed-convolution decoder back to 28×28, then a linear classifier:
    the step time of ``nn.ConvTranspose2d`` under each rule."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 28 * 28, 10))


def batch_of(name: str, device: torch.device | str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """The plain model of ``name`` (seed 0) and one fixed random batch for it, on ``device``."""
    build, shape, batch = MODELS[name]
    torch.manual_seed(0)
    base = build().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return base, x, y, batch


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compile_: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    falign.attach(model, opt)
    forward = torch.compile(model) if compile_ else model

    target = falign.uses_target(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if target:
            falign.set_target(model, y)
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    return step, opt


def timed_rounds(steps: Mapping[K, Callable[[], None]], repeats: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> dict[K, list[float]]:
    """``repeats`` rounds over the variants; in each, every variant takes one untimed step and then one timed step.

    The timed step is the variant's second in a row, so it finds the caches and the allocator as its own step left
    them — the steady state of a training loop — not as the previous variant's did: timed as the first step after
    another variant, a variant's ratio moved by 5–10% with its place in the order (fa on the row-LSTM 0.98× right
    after PyTorch's step, 1.10× right after the direct rules', the same code). Rounds still interleave the
    variants, so drifts in the machine's speed hit all alike."""
    times: dict[K, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            step()
            sync(device)
            t0 = clock()
            step()
            sync(device)
            times[key].append(clock() - t0)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of persistent state: parameters, buffers, scratch buffers and optimiser state."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        tensors += list(m.__dict__.get("_scratch", {}).values())
    for st in opt.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to file descriptor 2 (the profiler's start/stop lines and allocator notes)
    so a benchmark's output is only its table; Python's own warnings still reach ``sys.stderr`` afterwards."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedded interpreter): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory a training step allocates on top of what exists before it (gradients included)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in changes:
        current += delta
        peak = max(peak, current)
    return peak


def bench_model(name: str, rules: list[str], repeats: int, warmup: int, device: torch.device,
                compile_: bool) -> list[dict]:
    base, x, y, batch = batch_of(name, device)
    variants = {"torch": base}
    for rule in rules:
        rule_name, _, option = rule.partition(":")
        options = dict([option.split("=", 1)]) if option else {}
        variants[rule] = falign.convert(base, rule_name, seed=0, **options,
                                        unsupported="backprop" if name in UNSUPPORTED_BACKPROP else "error")
    modes = [False, True] if compile_ else [False]
    made = {(v, c): make_step(m, x, y, c) for v, m in variants.items() for c in modes}
    steps = {k: s for k, (s, _) in made.items()}
    for _ in range(max(warmup, 2)):
        for s in steps.values():
            s()
    memory = {k: (state_bytes(variants[k[0]], opt), step_peak_bytes(steps[k], device)) for k, (_, opt) in made.items()}
    times = timed_rounds(steps, repeats, device)
    rows = []
    for (variant, compiled), ts in times.items():
        base_median = statistics.median(times[("torch", compiled)])
        median = statistics.median(ts)
        state, peak = memory[(variant, compiled)]
        base_state, base_peak = memory[("torch", compiled)]
        feedback = sum(l.feedback_weight.numel() * l.feedback_weight.element_size()
                       for l in falign.feedback_layers(variants[variant]) if l.feedback_weight is not None)
        total, allowed = state + peak, base_state + base_peak + feedback
        rows.append({
            "model": name, "batch": batch, "variant": variant, "compiled": compiled,
            "median_ms": median * 1e3, "ratio": median / base_median, "target": TARGETS.get(variant),
            "state_mib": state / 2**20, "step_peak_mib": peak / 2**20, "feedback_mib": feedback / 2**20,
            "memory_over_bp_plus_feedback_mib": (total - allowed) / 2**20,
        })
    return rows


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,lenet",
                        help=f"comma-separated, from {', '.join(MODELS)}, or 'gpu' for {', '.join(GPU_MODELS)} "
                             f"(default: mlp,lenet)")
    parser.add_argument("--rules", default=",".join([*(r for r in falign.available_rules() if r != "bp"), *FORMS]),
                        help="rules to time, and the variants with a rule option (%(default)s)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda[:i] (default: cpu)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


def bench_device(name: str) -> torch.device:
    """``auto`` (cuda where available, else cpu), ``cpu`` or ``cuda[:i]``, checked to exist (a clear error
    otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FalignError(f"unknown --device {name!r}; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise FalignError(f"--device {name}: falign benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FalignError("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


def names(text: str, known: list[str], what: str) -> list[str]:
    """A comma-separated list, every entry known (a clear error naming the unknown ones)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if not items or unknown:
        raise FalignError(f"--{what} {text!r}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                          f"{', '.join(known)}")
    return items


def run(args: argparse.Namespace) -> None:
    models = list(GPU_MODELS) if args.models == "gpu" else names(args.models, list(MODELS), "models")
    rules = names(args.rules, [*falign.available_rules(), *FORMS], "rules")
    if args.repeats < 1 or args.warmup < 0:
        raise FalignError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise FalignError(f"--threads must be >= 1, got {args.threads}")
    device = bench_device(args.device)
    if args.json is not None:
        check_file(args.json, "--json", replaces=_is_speed_json)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in models:
        rows += bench_model(name, rules, args.repeats, args.warmup, device, args.compile)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# step time, median of {args.repeats} steps, {machine}, torch {torch.__version__}")
    print("| model | variant | compiled | median ms | × torch | target | met | state MiB | step peak MiB | "
          "feedback MiB | memory beyond bp + feedback, MiB |")
    print("|" + "---|" * 11)
    for r in rows:
        target = r["target"]
        met = "" if target is None else ("yes" if r["ratio"] <= target else "NO")
        print(f"| {r['model']} (b={r['batch']}) | {r['variant']} | {'yes' if r['compiled'] else 'no'} | "
              f"{r['median_ms']:.3f} | {r['ratio']:.3f} | {'' if target is None else f'≤{target}'} | {met} | "
              f"{r['state_mib']:.1f} | {r['step_peak_mib']:.1f} | {r['feedback_mib']:.1f} | "
              f"{r['memory_over_bp_plus_feedback_mib']:+.1f} |")
    if args.json is not None:
        atomic_write(Path(args.json), lambda f: json.dump({"machine": machine, "torch": torch.__version__,
                                                            "rows": rows}, f, indent=2), "w")


def _is_speed_json(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``bench speed --json`` output (which a new run may replace)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == {"machine", "torch", "rows"}


if __name__ == "__main__":
    main()
