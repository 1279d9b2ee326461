"""FA in a plain PyTorch loop, with falign's diagnostics measured live every few steps.

Run:  python examples/plain_loop_diagnostics.py [--steps 300] [--every 50] [--rule fa]

Prints, every ``--every`` steps, the loss and each layer's angle between the rule's update and the true gradient
(degrees; 90 = orthogonal) and the alignment-dominance ratio ρ. Needs only torch and scikit-learn's digits.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import falign
from falign.diagnostics import DiagnosticsRecorder


def main(steps: int = 300, every: int = 50, rule: str = "fa", seed: int = 0) -> list[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    model = falign.convert(net, rule=rule, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    falign.attach(model, opt)
    recorder = DiagnosticsRecorder(model)
    records = []
    g = torch.Generator().manual_seed(seed)
    for step in range(steps + 1):
        idx = torch.randint(0, len(y), (64,), generator=g)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        if step % every == 0:  # the rule's backward and the true one; the rule's gradients stay in .grad
            loss, _, record = recorder.step(lambda xb=xb, yb=yb: _loss(model, xb, yb), example=xb)
            angles = "  ".join(f"{k} {v:5.1f}°" for k, v in record["gradient_alignment"].items())
            print(f"step {step:4d}  loss {float(loss):.3f}  ∠(update, gradient): {angles}  "
                  f"ρ {record['decomposition']['rho']:.2f}", flush=True)
            records.append({"step": step, **record})
        else:
            loss, _ = _loss(model, xb, yb)
            loss.backward()
        opt.step()
    return records


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    output = model(x)
    return nn.functional.cross_entropy(output, y), output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--rule", default="fa", choices=falign.available_rules())
    args = parser.parse_args()
    main(args.steps, args.every, args.rule)
