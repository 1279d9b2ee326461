"""What a rule's own work costs in its step, measured by taking it out: the floor of the rule with PyTorch's ops.

fa's step does backprop's matrix products with ``B`` in place of ``W``. kp's offset form builds
``B = W − a_t·D₀`` in the backward (one ``W``-sized pass a layer), the sign rules build ``B = M ⊙ sign(W)`` (two
passes), brsf also redraws ``|R_t|`` after each optimiser step. This times, round-robin in one process on the speed
benchmark's models and batches (``falign.app.bench.speed``, the same step and the same timing: each variant's
timed step its second in a row), each rule's step as it runs and with a
piece of its work removed (an intervention; the training is then wrong, the timing is what is read):

- ``B prebuilt``: the rule's ``matrix`` returns a ``B`` built once, so the backward reads ``B`` as fa's does;
- ``no redraw``: brsf's step hook does nothing.

Each variant's step time is divided by plain PyTorch's in the same round (median over ``--repeats`` rounds; the
table gives the median and range over ``--runs`` runs). The drop from a rule to its intervention is what that
piece costs in place; when the rule with the piece removed sits under its target and the piece alone is above
the target's margin, no rearrangement of the same PyTorch operations meets the target (a kernel fusing the passes
could).

Run:  python benchmarks/rule_floors.py                  # 3 runs of 200 rounds, mlp and lenet
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable

import torch
from torch import nn

import falign
from falign.app.bench.speed import TARGETS, batch_of, make_step, timed_rounds


def _prebuilt(model: nn.Module) -> nn.Module:
    """The rule's ``B`` built once per layer and returned as is (instance attributes: no other model changes)."""
    layers = falign.feedback_layers(model)
    built = {id(layer): layer.rule.matrix(layer, layer.weight.detach()).clone() for layer in layers}
    for rule in {id(layer.rule): layer.rule for layer in layers}.values():
        rule.matrix = lambda layer, weight, out=None: built[id(layer)]
    return model


def _no_redraw(model: nn.Module) -> nn.Module:
    for layer in falign.feedback_layers(model):
        layer.rule.after_step = lambda layers, optimizer=None: None
    return model


def variants(base: nn.Module) -> dict[str, nn.Module]:
    def convert(rule: str, **options: str) -> nn.Module:
        return falign.convert(base, rule, seed=0, **options)

    return {"torch": base, "fa": convert("fa"),
            "kp:form=offset": convert("kp", form="offset"),
            "kp:form=offset, B prebuilt": _prebuilt(convert("kp", form="offset")),
            "usf": convert("usf"), "usf, B prebuilt": _prebuilt(convert("usf")),
            "brsf": convert("brsf"), "brsf, no redraw": _no_redraw(convert("brsf")),
            "brsf, no redraw, B prebuilt": _prebuilt(_no_redraw(convert("brsf")))}


def one_run(name: str, repeats: int) -> dict[str, float]:
    """Each variant's median step time over ``repeats`` round-robin rounds, divided by plain PyTorch's."""
    base, x, y, _ = batch_of(name, "cpu")
    steps: dict[str, Callable[[], None]] = {k: make_step(m, x, y, False)[0] for k, m in variants(base).items()}
    timed_rounds(steps, 5, torch.device("cpu"))  # warm-up
    times = timed_rounds(steps, repeats, torch.device("cpu"))
    plain = statistics.median(times["torch"])
    return {k: statistics.median(v) / plain for k, v in times.items()} | {"torch ms": plain * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"`python benchmarks/rule_floors.py --runs {args.runs} --repeats {args.repeats}`, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    for name in args.models.split(","):
        runs = [one_run(name, args.repeats) for _ in range(args.runs)]
        plain = statistics.median(r["torch ms"] for r in runs)
        print(f"**{name}** (plain PyTorch step {plain:.2f} ms)\n")
        print("| variant | × torch, median of runs | range | target |\n|---|---|---|---|")
        for key in runs[0]:
            if key in ("torch", "torch ms"):
                continue
            ratios = sorted(r[key] for r in runs)
            target = TARGETS.get(key)
            print(f"| {key} | {statistics.median(ratios):.3f} | {ratios[0]:.3f}–{ratios[-1]:.3f} | "
                  f"{'' if target is None else f'≤{target}'} |")
        print()


if __name__ == "__main__":
    main()
