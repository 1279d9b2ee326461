"""fa under falign's initialisation and under BioTorch's, run side by side (LeNet / Fashion-MNIST).

BioTorch's FA layers (its ``fa_constructor`` code) draw W and B from ``xavier_uniform`` and set every bias to 0;
falign keeps PyTorch's default W and bias initialisation and draws B ``kaiming_uniform``. This trains fa with
BioTorch's setup (LeNet, SGD momentum 0.9, weight decay 1e-3, batch 64, the lr ÷ 10 at 50% and 75%, the 10k test
images) under either initialisation, one process each with one thread, and records per epoch the test error, the
W–B angle of every layer whose input receives a signal, the logit scale (median |z| on the test images) and the
training loss; a logit scale above 1e3 is reported as a scale runaway (:mod:`falign.diagnostics.scale`).

The default lr is 0.001, the lr of BioTorch's own CIFAR-10 LeNet fa configuration: at lr 0.01 BioTorch's xavier
feedback runs away (its own code: training loss 3.9e12 in epoch 2), so a comparison there says nothing about
BioTorch's setup. An earlier version of this script set the biases to 1 and ran at lr 0.01; its conclusion is
withdrawn (docs/benchmarks.md).

Run:  python benchmarks/fa_init.py --epochs 100                 # both initialisations in parallel (2 processes)
      python benchmarks/fa_init.py --scale-at-init 3              # the untrained models' logit scale, seeds 0-2
      python benchmarks/fa_init.py --init biotorch --epochs 5 --lr 0.01 --out runs/fa-init
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
from falign.diagnostics.scale import FLAG_AT, logit_scale
from falign.models import LeNet5


def biotorch_init(model: nn.Module) -> None:
    """W and B xavier_uniform, biases 0 (BioTorch's FA layers), drawn from the current RNG."""
    with torch.no_grad():
        for layer in falign.feedback_layers(model):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.xavier_uniform_(layer.feedback_weight)
            if layer.bias is not None:
                layer.bias.zero_()


def build(init: str, seed: int) -> nn.Module:
    """fa LeNet under one initialisation, seeded."""
    torch.manual_seed(seed)
    model = falign.convert(LeNet5(1, 10, 28), "fa", seed=seed)
    if init == "biotorch":
        biotorch_init(model)
    return model


def scale_at_init(seeds: int) -> None:
    """Print the median |logit| on the first 1,000 test images of the untrained model, per init and seed."""
    x = load_dataset("fashion-mnist").x_test[:1000]
    for init in ("falign", "biotorch"):
        with torch.no_grad():
            scales = [logit_scale(build(init, seed)(x)) for seed in range(seeds)]
        print(f"{init:9s} median |logit| at initialisation, seeds 0–{seeds - 1}: "
              + ", ".join(f"{v:.3f}" for v in scales))


def train(init: str, epochs: int, seed: int, out: Path, lr: float) -> None:
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist")
    model = build(init, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs // 2), max(1, (3 * epochs) // 4)], 0.1)
    rows = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for xb, yb in batches(data.x_train, data.y_train, 64, epoch_order(len(data.y_train), seed, epoch)):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + loss.item() * len(yb), seen + len(yb)
        sched.step()
        model.eval()
        with torch.no_grad():
            out_test = torch.cat([model(data.x_test[i:i + 1000]) for i in range(0, len(data.y_test), 1000)])
        correct = int((out_test.argmax(1) == data.y_test).sum())
        angles = {k: round(v["angle"], 2) for k, v in weight_alignment(model).items()}
        rows.append({"epoch": epoch + 1, "test_error": 100 * (1 - correct / len(data.y_test)), "angles": angles,
                     "logit_scale": logit_scale(out_test), "train_loss": loss_sum / seen,
                     "seconds": round(time.perf_counter() - start, 1)})
        out.write_text(json.dumps({"init": init, "seed": seed, "epochs": epochs, "lr": lr, "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=("falign", "biotorch", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.001, help="initial lr (default: 0.001, BioTorch's fa lr)")
    parser.add_argument("--out", default="runs/fa-init")
    parser.add_argument("--scale-at-init", type=int, default=0, metavar="SEEDS",
                        help="train nothing: print the untrained model's logit scale under either init for SEEDS seeds")
    args = parser.parse_args()
    if args.scale_at_init:
        scale_at_init(args.scale_at_init)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.init != "both":
        train(args.init, args.epochs, args.seed, out / f"{args.init}.json", args.lr)
        return
    procs = [subprocess.Popen([sys.executable, __file__, "--init", init, "--epochs", str(args.epochs), "--seed",
                               str(args.seed), "--lr", str(args.lr), "--out", str(out)])
             for init in ("falign", "biotorch")]
    if any(p.wait() for p in procs):
        raise SystemExit("a training process failed")
    for init in ("falign", "biotorch"):
        result = json.loads((out / f"{init}.json").read_text())
        rows = result["rows"]
        best = min(r["test_error"] for r in rows)
        worst = max(r["logit_scale"] for r in rows)
        scale = (f"SCALE RUNAWAY (logit scale up to {worst:.3g})" if not worst <= FLAG_AT
                 else f"logit scale ≤ {worst:.3g}")
        print(f"{init:9s} lr {args.lr:g}  best-epoch error {best:.2f}%  final {rows[-1]['test_error']:.2f}%  "
              f"angles at end {rows[-1]['angles']}  {scale}  ({rows[-1]['seconds'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
