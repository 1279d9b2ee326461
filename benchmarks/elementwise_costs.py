"""The per-step elementwise work of the sign rules and brsf, op by op, on the speed benchmark's MLP layers.

The three weight matrices of the MLP 784-1024-1024-10 (1.86 M entries), each piece timed round-robin in one
process (median over ``--repeats`` rounds, then the median and range over ``--runs`` runs), in ms for all three
layers:

- the random words of brsf's 8-bit redraw (one 64-bit word gives 8 draws): torch's CPU generator
  (``random_``, what falign used before) and numpy's SFC64 (``random_raw``, what it uses now), and the set-up of
  one SFC64 generator from a seed (per layer and step);
- the byte-to-float pass (``copy_`` of the bytes, ``+ ½``, ``× a/256``);
- ``B = M ⊙ sign(W)`` as the sign rules build it (``sign`` then ``mul_``: two passes), ``torch.copysign(M, W)``
  (one pass, but ±M where W is exactly 0) and ``torch.count_nonzero(W)`` (what finding exact zeros would add).

Run:  python benchmarks/elementwise_costs.py            # 3 runs of 100 rounds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

SHAPES = [(1024, 784), (1024, 1024), (10, 1024)]


def one_run(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    w = [torch.randn(s) for s in SHAPES]
    m = [torch.rand(s) for s in SHAPES]
    out = [torch.empty(s) for s in SHAPES]
    n_words = [(t.numel() + 7) // 8 for t in w]
    words = [torch.empty(k, dtype=torch.int64) for k in n_words]
    raw = [np.random.SFC64(1).random_raw(k) for k in n_words]
    gen = torch.Generator().manual_seed(1)

    def torch_words() -> None:
        for t in words:
            t.random_(-(2**63), None, generator=gen)

    def numpy_words() -> None:
        for k in n_words:
            np.random.SFC64(12345).random_raw(k)

    def numpy_setup() -> None:
        for _ in SHAPES:
            np.random.SFC64(12345)

    def to_float() -> None:
        for o, r in zip(out, raw):
            o.view(-1).copy_(torch.from_numpy(r.view(np.uint8)[:o.numel()]))
            o.add_(0.5).mul_(0.01 / 256)

    def sign_product() -> None:
        for o, a, b in zip(out, w, m):
            torch.sign(a, out=o).mul_(b)

    def copysign() -> None:
        for o, a, b in zip(out, w, m):
            torch.copysign(b, a, out=o)

    def count_zeros() -> None:
        for a in w:
            int(torch.count_nonzero(a))

    pieces: dict[str, Callable[[], None]] = {
        "random words, torch random_": torch_words, "random words, numpy SFC64": numpy_words,
        "SFC64 set-up from a seed (3 layers)": numpy_setup, "bytes to floats": to_float,
        "B = M ⊙ sign(W): sign, mul_": sign_product, "torch.copysign(M, W)": copysign,
        "torch.count_nonzero(W)": count_zeros}
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for i in range(repeats + 5):
        for key, piece in pieces.items():
            t0 = time.perf_counter()
            piece()
            if i >= 5:
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    runs = [one_run(args.repeats) for _ in range(args.runs)]
    print(f"`python benchmarks/elementwise_costs.py --runs {args.runs} --repeats {args.repeats}`, "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, numpy {np.__version__}"
          f"\n\n| piece (the MLP's three layers) | ms, median of runs | range |\n|---|---|---|")
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        print(f"| {key} | {statistics.median(values):.3f} | {values[0]:.3f}–{values[-1]:.3f} |")


if __name__ == "__main__":
    main()
