"""Why fa misses BioTorch's published LeNet / Fashion-MNIST error: the initialisation, run side by side.

BioTorch's FA layers (its ``fa_constructor`` code) draw W and B from ``xavier_uniform`` and set every bias to 1;
falign keeps PyTorch's default W and bias initialisation and draws B ``kaiming_uniform``. This trains fa with
BioTorch's setup (LeNet, SGD momentum 0.9, weight decay 1e-3, batch 64, lr 0.01 ÷ 10 at 50% and 75%, the
10k test images) under either initialisation, one process each with one thread, and records per epoch the
test error and the W–B angle of every layer whose input receives a signal.

Run:  python benchmarks/fa_init.py --epochs 100          # both initialisations in parallel (2 processes)
      python benchmarks/fa_init.py --init biotorch --epochs 5 --out runs/fa-init
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import falign
from falign.data import batches, epoch_order, load_dataset
from falign.diagnostics import weight_alignment
from falign.models import LeNet5


def biotorch_init(model: nn.Module) -> None:
    """W and B xavier_uniform, biases 1 (BioTorch's FA layers), drawn from the current RNG."""
    with torch.no_grad():
        for layer in falign.feedback_layers(model):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.xavier_uniform_(layer.feedback_weight)
            if layer.bias is not None:
                layer.bias.fill_(1.0)


def train(init: str, epochs: int, seed: int, out: Path) -> None:
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist")
    torch.manual_seed(seed)
    model = falign.convert(LeNet5(1, 10, 28), "fa", seed=seed)
    if init == "biotorch":
        biotorch_init(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2, (3 * epochs) // 4], 0.1)
    rows = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for xb, yb in batches(data.x_train, data.y_train, 64, epoch_order(len(data.y_train), seed, epoch)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(data.x_test[i:i + 1000]).argmax(1) == data.y_test[i:i + 1000]).sum())
                          for i in range(0, len(data.y_test), 1000))
        angles = {k: round(v["angle"], 2) for k, v in weight_alignment(model).items()}
        rows.append({"epoch": epoch + 1, "test_error": 100 * (1 - correct / len(data.y_test)), "angles": angles,
                     "seconds": round(time.perf_counter() - start, 1)})
        out.write_text(json.dumps({"init": init, "seed": seed, "epochs": epochs, "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=("falign", "biotorch", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fa-init")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.init != "both":
        train(args.init, args.epochs, args.seed, out / f"{args.init}.json")
        return
    procs = [subprocess.Popen([sys.executable, __file__, "--init", init, "--epochs", str(args.epochs), "--seed",
                               str(args.seed), "--out", str(out)]) for init in ("falign", "biotorch")]
    if any(p.wait() for p in procs):
        raise SystemExit("a training process failed")
    for init in ("falign", "biotorch"):
        result = json.loads((out / f"{init}.json").read_text())
        rows = result["rows"]
        best = min(r["test_error"] for r in rows)
        print(f"{init:9s} best-epoch error {best:.2f}%  final {rows[-1]['test_error']:.2f}%  "
              f"angles at end {rows[-1]['angles']}  ({rows[-1]['seconds'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
