"""A PyTorch Lightning module trained with FA, falign's diagnostics in Lightning's logger.

Run:  python examples/lightning_callback.py [--epochs 5] [--every 20] [--out runs/lightning]

Writes Lightning's CSV log to ``--out`` (``metrics.csv``, with the ``falign/...`` columns: per-layer gradient
alignment, conservation drift, the decomposition) and prints the last logged angles. Needs ``lightning``
(``pip install lightning``) and scikit-learn.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import falign


def main(epochs: int = 5, every: int = 20, out: str = "runs/lightning", rule: str = "fa") -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from sklearn.datasets import load_digits

    from falign.integrations.lightning import FeedbackAlignmentCallback

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
            self.net = falign.convert(net, rule, seed=0)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    digits = load_digits()
    data = torch.utils.data.TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16.0,
                                          torch.tensor(digits.target))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    callback = FeedbackAlignmentCallback(every=every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers
        trainer = pl.Trainer(max_epochs=epochs, logger=CSVLogger(out, name="", version=""), callbacks=[callback],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu")
        trainer.fit(Classifier(), loader)
    last = callback.records[-1]
    print(f"step {last['step']}: ∠(update, gradient) " + ", ".join(
        f"{k} {v:.1f}°" for k, v in last["gradient_alignment"].items()))
    print(f"Lightning's log: {out}/metrics.csv")
    return last


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args()
    main(args.epochs, args.every, args.out)
