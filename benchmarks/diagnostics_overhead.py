"""Overhead of the live diagnostics: training time with diagnostics every K steps against none.

Each measurement trains the same model from the same initialisation for ``--steps`` SGD steps through
:class:`falign.app.train.Trainer`'s own ``train_step`` (the code path of ``falign train
--diagnostics-every K``); configurations are interleaved and repeated, and the table reports the
median time of each and its ratio to no diagnostics, measured in the same run.

Run:  python benchmarks/diagnostics_overhead.py
      python benchmarks/diagnostics_overhead.py --every 50,10,1 --steps 200 --repeats 5
Target: every 50 steps costs at most 5% extra.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from falign.app.train import TrainConfig, Trainer

SETUPS = {
    # name: (config fields, batch shape); data comes from the dataset the config names
    "mlp-digits": {"model": "mlp", "data": "digits", "hidden": (256, 256), "batch_size": 32},
    "mlp-fashion": {"model": "mlp", "data": "fashion-mnist", "hidden": (1024, 1024), "batch_size": 128},
    "lenet-fashion": {"model": "lenet", "data": "fashion-mnist", "batch_size": 64},
}


def time_steps(setup: dict, rule: str, every: int, steps: int, workdir: str) -> float:
    trainer = Trainer(TrainConfig(rule=rule, momentum=0.0, diagnostics_every=every, **setup),
                      f"{workdir}/{rule}-{every}", progress=False, overwrite=True)
    trainer.out.mkdir(parents=True, exist_ok=True)
    trainer.setup()
    x, y = trainer.dataset.x_train, trainer.dataset.y_train
    bs = trainer.config.batch_size
    n = len(y) // bs
    trainer.train_step(x[:bs], y[:bs])  # warm-up (and the first diagnostics record)
    trainer.step = 1
    t0 = time.perf_counter()
    for i in range(steps):
        j = (i % n) * bs
        trainer.train_step(x[j : j + bs], y[j : j + bs])
        trainer.step += 1
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="mlp-digits,mlp-fashion,lenet-fashion")
    parser.add_argument("--rule", default="fa")
    parser.add_argument("--every", default="50,1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    everies = [0] + [int(e) for e in args.every.split(",")]
    print(f"# diagnostics overhead, rule {args.rule}, {args.steps} steps x {args.repeats} repeats (median), "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| setup | diagnostics every | median s | × none | target | met |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.setups.split(","):
            setup = SETUPS[name]
            times: dict[int, list[float]] = {e: [] for e in everies}
            for _ in range(args.repeats):
                for every in everies:
                    times[every].append(time_steps(setup, args.rule, every, args.steps, workdir))
            base = statistics.median(times[0])
            for every in everies:
                med = statistics.median(times[every])
                target = "≤1.05" if every == 50 else ""
                met = ("yes" if med / base <= 1.05 else "NO") if every == 50 else ""
                label = "none" if every == 0 else str(every)
                print(f"| {name} | {label} | {med:.3f} | {med / base:.3f} | {target} | {met} |")


if __name__ == "__main__":
    main()
