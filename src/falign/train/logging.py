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
        w = self.writer
        if w is None:
            return
        for kind in ("gradient_alignment", "signal_alignment"):
            for layer, value in record[kind].items():
                w.add_scalar(f"{kind}/{layer}", value, step)
        for layer, value in record["weight_alignment"].items():
            w.add_scalar(f"weight_alignment/{layer}", value["angle"], step)
        for pair, value in record["conservation"].items():
            if "max_drift" in value:
                w.add_scalar(f"conservation_max_drift/{pair}", value["max_drift"], step)
        for layer, value in record["decomposition"]["terms"].items():
            w.add_scalar(f"decomposition/{layer}", value, step)

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
