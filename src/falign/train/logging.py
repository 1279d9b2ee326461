"""What a run reports besides its files: TensorBoard scalars and the summary table printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoard:
    """TensorBoard scalars of a run when the ``tensorboard`` package is installed (else nothing)."""

    def __init__(self, path: Path | None) -> None:
        self.writer = None
        if path is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(str(path))

    def epoch(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            self.writer.add_scalar(f"epoch/{key}", row[key], step)
        self.writer.flush()

    def diagnostics(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        from falign.diagnostics import record_scalars

        for name, value in record_scalars(record).items():
            if name != "loss":
                self.writer.add_scalar(name, value, step)

    def step(self, loss: float, lr: float, step: int) -> None:
        """The training loss of one batch and the learning rate (every step)."""
        if self.writer is not None:
            self.writer.add_scalar("step/train_loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None:
        """The run's configuration beside its final metrics (TensorBoard's HPARAMS tab)."""
        if self.writer is None:
            return
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()
                if v is not None}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def summary_table(summary: dict[str, Any], epoch_rows: list[dict[str, Any]], out: Path) -> str:
    """The table ``falign train`` prints: about five epochs (always the last) of train/test loss and accuracy."""
    step = max(1, len(epoch_rows) // 5)
    shown = epoch_rows[step - 1 :: step]
    if epoch_rows and shown[-1] is not epoch_rows[-1]:
        shown.append(epoch_rows[-1])
    lines = [f"{summary['rule']} / {summary['model']} / {summary['data']}  ({summary['device']}, "
             f"{summary['wall_time_s']:.1f} s)",
             f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'test loss':>9}  {'test acc':>8}"]
    for r in shown:
        lines.append(f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {r['train_acc']:>9.2%}  {r['test_loss']:>9.4f}  "
                     f"{r['test_acc']:>8.2%}")
    lines.append(f"run directory: {out}")
    return "\n".join(lines)
