"""PyTorch Lightning: ``FeedbackAlignmentCallback`` attaches falign to a LightningModule's optimisers and logs
falign's diagnostics into the Trainer's logger.

Example::

    import lightning.pytorch as pl
    from falign.integrations.lightning import FeedbackAlignmentCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = falign.convert(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), "fa")

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    pl.Trainer(max_epochs=5, callbacks=[FeedbackAlignmentCallback(every=50)]).fit(Classifier(), loader)

What it does:

- at the start of fitting, :func:`falign.attach` on every optimiser the Trainer built, so the rules' per-step work
  (brsf's redraws, wm's mirror steps) runs after every optimiser step; removed again at the end;
- every ``every`` training steps (0: never), after the optimiser step, one extra forward pass and two backward
  passes on that step's batch measure the diagnostics (:class:`falign.diagnostics.DiagnosticsRecorder`: per-layer
  weight, gradient and error-signal alignment, the conservation law's drift, the loss-rate decomposition) at the
  new weights, and log them as scalars (:func:`falign.diagnostics.record_scalars`) under ``falign/`` with the
  Trainer's global step. The measurement's gradients are discarded and the module's buffers (BatchNorm's running
  statistics) and the random number generators are restored: training is unchanged (tested). Under a
  mixed-precision Trainer (``precision="bf16-mixed"``) the measurement runs outside autocast, in float32 at the
  float32 weights: the diagnostics describe the rule, not the rounding of that step (tested).

``loss_fn(module, batch) -> (loss, output)`` computes the measured loss; the default takes ``x, y = batch`` and
the cross-entropy of ``module(x)``. The diagnostics are those of the one model inside the LightningModule that
``falign.convert`` returned (its layer names are that model's own, e.g. ``0`` for ``self.net[0]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("falign.integrations.lightning needs PyTorch Lightning: pip install lightning") from error

import falign
from falign.diagnostics import DiagnosticsRecorder, record_scalars


def _cross_entropy(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    x, y = batch[0], batch[1]
    output = module(x)
    return nn.functional.cross_entropy(output, y), output


def _converted_root(module: nn.Module) -> nn.Module:
    """The model ``falign.convert`` returned, inside a LightningModule (or the module itself)."""
    from falign.convert import ConversionReport

    roots = [m for m in module.modules() if isinstance(getattr(m, "falign_report", None), ConversionReport)]
    if len(roots) != 1:
        raise ValueError(f"FeedbackAlignmentCallback: the LightningModule holds {len(roots)} models returned by "
                         f"falign.convert; diagnostics need exactly one")
    return roots[0]


class FeedbackAlignmentCallback(Callback):
    """Attach falign's per-step work to the Trainer's optimisers and log diagnostics every ``every`` steps.

    Args:
        every: measure and log the diagnostics every this many training steps (0: only attach).
        loss_fn: ``(module, batch) -> (loss, output)``, the measured loss (default: cross-entropy of
            ``module(batch[0])`` against ``batch[1]``).
        margin: the alignment-dominance margin ``c`` of the loss-rate decomposition.
        prefix: the logged scalars' prefix.
    """

    def __init__(self, every: int = 0, loss_fn: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
                 margin: float = 0.1, prefix: str = "falign/") -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.every, self.loss_fn, self.margin, self.prefix = every, loss_fn or _cross_entropy, margin, prefix
        self.handles: list[Any] = []
        self.recorder: DiagnosticsRecorder | None = None
        self.records: list[dict[str, Any]] = []  # every measured record (also what was logged)

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not falign.feedback_layers(pl_module):
            raise ValueError("FeedbackAlignmentCallback: the LightningModule holds no converted layer; convert its "
                             "model with falign.convert first")
        self.handles = [falign.attach(pl_module, optimizer) for optimizer in trainer.optimizers]
        if self.every:
            self.recorder = DiagnosticsRecorder(_converted_root(pl_module), margin=self.margin)

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every or self.recorder is None or step % self.every:
            return
        saved = {n: p.grad for n, p in pl_module.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}  # BatchNorm's running statistics
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        was_training = pl_module.training
        try:
            for p in pl_module.parameters():
                p.grad = None
            with torch.enable_grad():
                first = batch[0] if isinstance(batch, (tuple, list)) else batch
                _, _, record = self.recorder.step(lambda: self.loss_fn(pl_module, batch), example=first)
        finally:
            for n, p in pl_module.named_parameters():
                p.grad = saved[n]
            with torch.no_grad():
                for n, b in pl_module.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            pl_module.train(was_training)
        record["step"] = step
        self.records.append(record)
        scalars = {self.prefix + k: v for k, v in record_scalars(record).items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
