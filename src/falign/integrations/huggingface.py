"""HuggingFace ``transformers.Trainer``: ``FeedbackAlignmentCallback`` attaches falign to the Trainer's optimiser and
adds each layer's weight–feedback angle to the Trainer's logs.

Example::

    from transformers import Trainer, TrainingArguments
    from falign.integrations.huggingface import FeedbackAlignmentCallback

    model = falign.convert(BertForSequenceClassification(config), "brsf")
    trainer = Trainer(model=model, args=TrainingArguments("out", logging_steps=50), train_dataset=data)
    FeedbackAlignmentCallback.install(trainer)  # first among the callbacks: the report_to integrations see its values
    trainer.train()

What it does:

- when training begins, :func:`falign.attach` on the optimiser the Trainer built (also through accelerate's
  wrapper), so the rules' per-step work (brsf's redraws, wm's mirror steps, kp's offset form) runs after every
  optimiser step; without it a per-step rule stops the run at its second step (:class:`falign.StepWorkSkipped`);
  removed again when training ends;
- at every logging step, ``falign/weight_alignment/<layer>`` (the angle between ``W_l`` and the ``B_l`` the backward
  uses, :func:`falign.diagnostics.weight_alignment`, in degrees) is added to the Trainer's logs and its
  ``state.log_history``. A callback's ``on_log`` sees the values of the callbacks before it only: the Trainer puts
  its ``report_to`` integrations (TensorBoard, Weights & Biases, ...) before the ``callbacks=`` it is given, so add
  this one with :meth:`FeedbackAlignmentCallback.install`, which puts it first.

The direct rules need the model to return its output tensor (see :func:`falign.convert`): a HuggingFace model that
computes its loss inside (``labels=``) cannot run them; the layer-by-layer rules train with the model's own loss.
"""

from __future__ import annotations

from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("falign.integrations.huggingface needs transformers: pip install transformers") from error

import falign
from falign.diagnostics import weight_alignment
from falign.steps import StepHook


class FeedbackAlignmentCallback(TrainerCallback):
    """Attach falign's per-step work to a ``transformers.Trainer``'s optimiser; log weight–feedback angles.

    Args:
        log_alignment: add ``falign/weight_alignment/<layer>`` to the Trainer's logs at every logging step.
    """

    def __init__(self, log_alignment: bool = True) -> None:
        self.log_alignment = log_alignment
        self.handle: StepHook | None = None

    @classmethod
    def install(cls, trainer: Any, **options: Any) -> FeedbackAlignmentCallback:
        """Add a callback to ``trainer`` ahead of its others (its reporting integrations included); returns it."""
        callback = cls(**options)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or not falign.feedback_layers(model):
            raise ValueError("FeedbackAlignmentCallback: the Trainer's model has no converted layer; pass the model "
                             "falign.convert returned")
        if optimizer is None:
            raise ValueError("FeedbackAlignmentCallback: the Trainer built no optimiser before training began")
        self.handle = falign.attach(model, optimizer)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               model: nn.Module | None = None, **kwargs: Any) -> None:
        if not self.log_alignment or logs is None or model is None or "loss" not in logs:
            return  # the training logs only (not evaluation's)
        values = {f"falign/weight_alignment/{name}": v["angle"] for name, v in weight_alignment(model).items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # appended before the callbacks ran

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
