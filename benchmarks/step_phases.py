"""Where a rule's extra step time sits: forward (with the loss), backward, optimiser step (with the rule's hooks).

The speed benchmark's models and batches (``falign.app.bench.speed``), plain PyTorch and each variant timed
in interleaved rounds in one process (each variant's timed step its second in a row, as ``falign bench speed``),
each phase of a step timed on its own; median µs over ``--repeats`` rounds, then
the median over ``--runs`` runs. The last column is the variant's whole step over plain PyTorch's.

Run:  python benchmarks/step_phases.py                          # lenet: torch, fa
      python benchmarks/step_phases.py --models mlp,lenet --rules fa,kp:form=offset,brsf
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import falign
from falign.app.bench.speed import batch_of

PHASES = ("forward", "backward", "step")


def one_run(name: str, rules: list[str], repeats: int) -> dict[str, dict[str, float]]:
    base, x, y, _ = batch_of(name, "cpu")
    models: dict[str, nn.Module] = {"torch": base}
    for rule in rules:
        rule_name, _, option = rule.partition(":")
        models[rule] = falign.convert(base, rule_name, seed=0, **(dict([option.split("=", 1)]) if option else {}))
    opts = {}
    for key, model in models.items():
        opts[key] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        falign.attach(model, opts[key])
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in models}
    for i in range(repeats + 10):
        for key, model in models.items():
            opt = opts[key]
            opt.zero_grad(set_to_none=True)  # an untimed step first: the timed one is the variant's second in a row
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if i >= 10:
                for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key][phase].append(seconds)
    return {k: {p: statistics.median(v) * 1e6 for p, v in phases.items()} for k, phases in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet")
    parser.add_argument("--rules", default="fa")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    rules = args.rules.split(",")
    print(f"`python benchmarks/step_phases.py --models {args.models} --rules {args.rules} --runs {args.runs} "
          f"--repeats {args.repeats}`, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; µs, median over runs\n")
    print("| model | variant | forward | backward | step | × torch (whole step) |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        runs = [one_run(name, rules, args.repeats) for _ in range(args.runs)]
        for key in ["torch", *rules]:
            cells = {p: statistics.median(r[key][p] for r in runs) for p in PHASES}
            ratios = sorted(sum(r[key].values()) / sum(r["torch"].values()) for r in runs)
            delta = "" if key == "torch" else " ({:+.0f})"
            print(f"| {name} | {key} | " + " | ".join(
                f"{cells[p]:.0f}" + (delta.format(cells[p] - statistics.median(r['torch'][p] for r in runs))
                                     if delta else "") for p in PHASES)
                  + f" | {statistics.median(ratios):.3f} [{ratios[0]:.3f}–{ratios[-1]:.3f}] |")


if __name__ == "__main__":
    main()
