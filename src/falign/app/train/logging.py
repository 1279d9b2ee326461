"""What a run reports besides its files: TensorBoard scalars, Weights & Biases, and the summary table printed at
the end.

Every logger has the methods of :class:`RunLogger`; the trainer calls them through :class:`Loggers`, so a new
logging service is one class here and one line in :func:`run_loggers`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol

from falign.app.outdir import atomic_write
from falign.errors import FalignError


class RunLogger(Protocol):
    """What the trainer tells a logging service (every method is called on the main process only)."""

    def step(self, loss: float, lr: float, step: int) -> None: ...

    def epoch(self, row: dict[str, Any], step: int) -> None: ...

    def diagnostics(self, record: dict[str, Any], step: int) -> None: ...

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None: ...

    def close(self) -> None: ...


EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
"""The scalars of an epoch row sent to the loggers (as ``epoch/<key>``; the validation pair when there is one)."""


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
        for key in EPOCH_KEYS:
            if key in row:
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


class WandbMissing(FalignError, ImportError):
    """``--wandb-project`` was given but the ``wandb`` package is not installed."""


def wandb_installed() -> bool:
    """Whether ``import wandb`` would find the package (checked without importing it)."""
    return importlib.util.find_spec("wandb") is not None


class WandB:
    """A run's scalars in Weights & Biases (``falign train --wandb-project NAME``; ``pip install 'falign[wandb]'``).

    The same values as :class:`TensorBoard` (``step/train_loss``, ``step/lr``, ``epoch/*``, every diagnostics
    scalar) at the same global step, the run's config as W&B's config and its final metrics as the summary. The W&B
    run id is kept in ``<run>/wandb.json`` so that ``--resume`` continues the same W&B run. W&B's own files go
    where W&B puts them (``./wandb`` or ``$WANDB_DIR``; not into the run directory, since W&B links files there
    and falign never writes into a folder that holds links). W&B's environment variables apply as usual:
    ``WANDB_MODE=offline`` logs to disk only (``wandb sync`` uploads later), ``WANDB_MODE=disabled`` turns it off.
    """

    ID_FILE = "wandb.json"

    def __init__(self, project: str, run_dir: Path, config: dict[str, Any], *, resume: bool = False) -> None:
        try:
            import wandb
        except ImportError as err:
            raise WandbMissing("--wandb-project needs the wandb package: pip install 'falign[wandb]'") from err
        id_file = run_dir / self.ID_FILE
        run_id = None
        if resume and id_file.is_file():
            run_id = json.loads(id_file.read_text())["id"]
        self.run: Any = wandb.init(project=project, name=run_dir.name, config=config,
                                   id=run_id, resume="allow" if run_id else None)
        record = json.dumps({"project": project, "id": self.run.id}) + "\n"
        atomic_write(id_file, lambda f: f.write(record), "w")  # as every run file: never through a link

    def step(self, loss: float, lr: float, step: int) -> None:
        if self.run is not None:
            self.run.log({"step/train_loss": loss, "step/lr": lr}, step=step)

    def epoch(self, row: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({f"epoch/{k}": row[k] for k in EPOCH_KEYS if k in row} | {"epoch": row["epoch"]},
                         step=step)

    def diagnostics(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        from falign.diagnostics import record_scalars

        self.run.log({k: v for k, v in record_scalars(record).items() if k != "loss"}, step=step)

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Loggers:
    """Every logger of a run, called in turn (an empty one does nothing)."""

    def __init__(self, loggers: list[RunLogger] | None = None) -> None:
        self.loggers = list(loggers or [])

    def step(self, loss: float, lr: float, step: int) -> None:
        for logger in self.loggers:
            logger.step(loss, lr, step)

    def epoch(self, row: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.epoch(row, step)

    def diagnostics(self, record: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.diagnostics(record, step)

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.hparams(config, final)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def run_loggers(run_dir: Path, config: dict[str, Any], *, resume: bool) -> Loggers:
    """The loggers of a training run: TensorBoard (when installed) and W&B (when ``wandb_project`` is set)."""
    loggers: list[RunLogger] = [TensorBoard(run_dir / "tensorboard")]
    if config.get("wandb_project"):
        loggers.append(WandB(config["wandb_project"], run_dir, config, resume=resume))
    return Loggers(loggers)


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
