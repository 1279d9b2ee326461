"""Where fa's extra time in one linear layer goes: forward and backward of ``F.linear`` against falign's paths.

One layer ``y = x Wᵀ + b`` (``--batch`` × ``--features`` → ``--features``), forward, then backward of a fixed
output gradient, round-robin in one process; median forward and backward time over ``--repeats`` steps in µs, and
the median over ``--runs`` runs. Paths:

- ``torch``: ``F.linear``, autograd's own backward;
- ``identity hooks``: ``F.linear`` under saved-tensor hooks that return what they get — the cost of PyTorch's
  Python hook machinery alone;
- ``fast, B = W's memory``: falign's fast path with ``B`` a detached alias of ``W`` — the hooks and falign's
  per-call Python, with the backward reading the same matrix as backprop's;
- ``fast, B separate``: falign's fast path with its own ``B`` (fa as it runs) — adds reading a second matrix;
- ``function``: falign's autograd Function path (``falign.functional._FAST = False``).

Run:  python benchmarks/fa_linear_paths.py                       # 1024 features, batch 128 (the MLP's layers)
      python benchmarks/fa_linear_paths.py --features 120 --batch 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import falign.functional as FF


def one_run(batch: int, features: int, repeats: int) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    x = torch.randn(batch, features, requires_grad=True)
    w = torch.randn(features, features, requires_grad=True)
    b = torch.randn(features, requires_grad=True)
    feedback = torch.randn(features, features)
    g = torch.randn(batch, features)

    def identity() -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return F.linear(x, w, b)

    def function() -> torch.Tensor:
        FF._FAST = False
        try:
            return FF.feedback_linear(x, w, b, feedback)
        finally:
            FF._FAST = True

    paths: dict[str, Callable[[], torch.Tensor]] = {
        "torch": lambda: F.linear(x, w, b), "identity hooks": identity,
        "fast, B = W's memory": lambda: FF.feedback_linear(x, w, b, w.detach()),
        "fast, B separate": lambda: FF.feedback_linear(x, w, b, feedback), "function": function}
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in paths}
    for i in range(repeats + 20):
        for name, path in paths.items():
            t0 = time.perf_counter()
            y = path()
            t1 = time.perf_counter()
            y.backward(g)
            t2 = time.perf_counter()
            x.grad = w.grad = b.grad = None
            if i >= 20:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {k: (statistics.median(f) * 1e6, statistics.median(bw) * 1e6) for k, (f, bw) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [one_run(args.batch, args.features, args.repeats) for _ in range(args.runs)]
    print(f"`python benchmarks/fa_linear_paths.py --batch {args.batch} --features {args.features} --runs {args.runs} "
          f"--repeats {args.repeats} --threads {args.threads}` on {platform.machine()}, torch {torch.__version__}.\n")
    print("| path | forward µs | backward µs | forward − torch | backward − torch | runs' range of backward − torch |")
    print("|---|---|---|---|---|---|")
    for name in runs[0]:
        fwd = statistics.median(r[name][0] for r in runs)
        bwd = statistics.median(r[name][1] for r in runs)
        d_fwd = statistics.median(r[name][0] - r["torch"][0] for r in runs)
        d_bwd = sorted(r[name][1] - r["torch"][1] for r in runs)
        print(f"| {name} | {fwd:.1f} | {bwd:.1f} | {d_fwd:+.1f} | {statistics.median(d_bwd):+.1f} | "
              f"{d_bwd[0]:+.1f} to {d_bwd[-1]:+.1f} |")


if __name__ == "__main__":
    main()
