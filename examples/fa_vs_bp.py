"""FA and backprop side by side from Python: two runs with falign.app.train, one figure.

Run:  python examples/fa_vs_bp.py [--epochs 30] [--out runs/fa-vs-bp]

The same as the README's quickstart (``falign train`` twice, then ``falign plot``), written as a script: trains
the default MLP on scikit-learn's digits under fa and under bp with diagnostics every 20 steps, and writes
``--out/compare/compare.png`` (loss, accuracy, and each layer's gradient alignment).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from falign.app.report.plots import plot_runs
from falign.app.train import TrainConfig, train


def main(epochs: int = 30, out: str = "runs/fa-vs-bp") -> list[Path]:
    root = Path(out)
    for rule in ("fa", "bp"):
        summary = train(TrainConfig(rule=rule, epochs=epochs, diagnostics_every=20), root / rule, progress=False)
        print(f"{rule}: test accuracy {summary['final']['test_acc']:.2%}")
    paths = plot_runs([root / "fa", root / "bp"], root / "compare")
    print(paths[0])
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="runs/fa-vs-bp")
    args = parser.parse_args()
    main(args.epochs, args.out)
