"""Weight mirror's schedule: mirror steps after every k-th optimiser step (``--rule-option every=k``).

For k in 1, 2, 4, 8: the step time against plain PyTorch (MLP 784-1024-1024-10, batch 128, SGD momentum 0.9,
round-robin medians, as ``falign bench speed``), and on digits (MLP 64-256-256-10, ReLU, SGD momentum 0.9,
lr 0.01, batch 64, 20 epochs, 3 seeds) the final test accuracy and the W–B angle of the hidden layers
(mean over layers) at the end. Prints its section; ``--docs docs/benchmarks.md`` also writes it into that file.

Run:  python benchmarks/wm_schedule.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import falign
from falign.app.bench.accuracy import update_docs
from falign.data import load_digits
from falign.diagnostics import weight_alignment
from falign.models import MLP

BEGIN, END = "<!-- wm-schedule:begin -->", "<!-- wm-schedule:end -->"


def step_ratio(every: int, repeats: int) -> float:
    torch.manual_seed(0)
    base = MLP([784, 1024, 1024, 10])
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    models = {"torch": base, "wm": falign.convert(base, "wm", every=every)}
    steps = {}
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if name == "wm":
            falign.attach(model, opt)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    times = {k: [] for k in steps}
    for _ in range(10):
        for s in steps.values():
            s()
    for _ in range(repeats):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times["wm"]) / statistics.median(times["torch"])


def train_digits(every: int, seed: int) -> tuple[float, float]:
    data = load_digits(seed=0)
    torch.manual_seed(seed)
    model = falign.convert(MLP([64, 256, 256, 10]), "wm", seed=seed, every=every)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    falign.attach(model, opt)
    g = torch.Generator().manual_seed(seed)
    x, y = data.x_train.reshape(len(data.x_train), -1), data.y_train
    for _ in range(20):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        xt = data.x_test.reshape(len(data.x_test), -1)
        acc = float((model(xt).argmax(1) == data.y_test).float().mean())
    angles = [v["angle"] for v in weight_alignment(model).values()]
    return acc, float(np.mean(angles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", default="1,2,4,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3, help="timing runs (the spread is reported)")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help="also write the section into this Markdown file, e.g. docs/benchmarks.md")
    args = parser.parse_args()
    start = time.perf_counter()
    ks = [int(k) for k in args.every.split(",")]
    rows = []
    for k in ks:
        ratios = [step_ratio(k, args.repeats) for _ in range(args.runs)]
        results = [train_digits(k, seed) for seed in range(args.seeds)]
        accs, angles = zip(*results)
        rows.append((k, ratios, accs, angles))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [BEGIN, "## Weight mirror every k steps", "",
             f"`python benchmarks/wm_schedule.py` on {machine}, torch {torch.__version__}, "
             f"{(time.perf_counter() - start) / 60:.0f} min. Step time: median of {args.repeats} round-robin steps "
             f"× plain PyTorch (MLP 784-1024-1024-10, batch 128), median and range of {args.runs} runs. Digits "
             f"(MLP 64-256-256-10, 20 epochs, SGD momentum 0.9, lr 0.01): test accuracy and the mean W–B angle of "
             f"the hidden layers at the end, mean ± std over {args.seeds} seeds.", "",
             "| every k | step × torch | range | digits test accuracy % | W–B angle ° |", "|---|---|---|---|---|"]
    for k, ratios, accs, angles in rows:
        lines.append(f"| {k} | {statistics.median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} | "
                     f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1):.1f} | "
                     f"{np.mean(angles):.1f} ± {np.std(angles, ddof=1):.1f} |")
    lines += ["", END]
    section = "\n".join(lines)
    print(section)
    if args.docs:
        update_docs(Path(args.docs), section, BEGIN, END)

if __name__ == "__main__":
    main()
