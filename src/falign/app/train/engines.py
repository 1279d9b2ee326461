"""How a run trains: one engine per way of training, behind one protocol that :class:`~falign.app.train.Trainer`'s
loop calls.

- :class:`LocalEngine`: one process, or data-parallel (DDP: each rank trains on a slice of the global batch);
- :class:`PipelineEngine`: pipeline stages, one per process (:mod:`falign.app.pipeline`: PyTorch's schedules, or the
  unlocked schedule of the direct rules).

The trainer owns the run (its folder, the loop over epochs and batches, the schedule, logs, checkpoints); an
engine owns the model's training machinery (the optimiser, the rules' per-step work, diagnostics) and answers
:class:`Engine`'s methods. The loss helpers the engines share (:func:`loss_fn`, :func:`shard_loss`,
:func:`evaluate`, :func:`make_optimizer`, :func:`make_scheduler`) live here too.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import falign
from falign.app.train.config import TrainConfig
from falign.app.train.distributed import Distributed
from falign.app.train.rundir import RunDirError
from falign.data import Dataset, batches
from falign.diagnostics import DiagnosticsRecorder, conservation_assumptions, find_pairs
from falign.diagnostics.scale import ScaleMonitor
from falign.seeding import rng_state


# -- what every engine shares -------------------------------------------------------------------------------
def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Per-epoch schedule: constant, ÷10 at each milestone fraction of the epochs, or cosine."""
    if config.lr_schedule == "step":
        milestones = sorted({max(1, round(m * config.epochs)) for m in config.lr_milestones})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def loss_fn(config: TrainConfig, output: Tensor, target: Tensor) -> Tensor:
    if config.loss == "ce":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, F.one_hot(target, output.shape[-1]).to(output.dtype))


def shard_loss(config: TrainConfig, output: Tensor, target: Tensor, total: int, world: int) -> Tensor:
    """This rank's term of the global batch's mean loss, scaled so that DDP's gradient *average* over the
    ``world`` ranks is the gradient of the global mean: ``Σ_shard loss × world / total``, ``total`` the
    global batch's number of examples. Every example weighs ``1/total`` however the batch was split (a last
    batch need not divide by the ranks), and the mean of this value over ranks is the global mean loss. A
    rank with no example contributes an exact zero that still runs backward, so every rank joins DDP's
    gradient all-reduce."""
    n = len(target)
    if n == 0:
        return output.sum() * 0.0
    loss = loss_fn(config, output, target)
    return loss if n * world == total else loss * (n * world / total)


@torch.no_grad()
def evaluate(model: nn.Module, config: TrainConfig, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for xb, yb in batches(x, y, config.eval_batch_size):
        out = model(xb)
        total_loss += float(loss_fn(config, out, yb)) * len(yb)
        correct += int((out.argmax(-1) == yb).sum())
    model.train(was_training)
    return total_loss / len(y), correct / len(y)


def freeze_hidden(model: nn.Module) -> list[str]:
    """The depth-utility baseline: every parameter outside the output layer stays at its random initial value
    (``requires_grad`` off, so the optimiser and weight decay leave it alone); only the output layer trains.
    Returns the frozen parameters' names. The model must have run once (the output layer is found by running)."""
    out = falign.conversion_report(model).output_layer
    if out is None:
        raise RunDirError("freeze_hidden: the output layer of this model is not known (no converted layer ran)")
    frozen = [n for n, p in model.named_parameters() if not n.startswith(out + ".")]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


# -- the protocol --------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """One training step: the global batch's mean loss, this rank's correct predictions, and what was measured on
    the way (a diagnostics record, a scale record; ``None`` when not due)."""

    loss: float
    correct: Tensor
    record: dict[str, Any] | None = None
    scale_row: dict[str, Any] | None = None


class Engine(Protocol):
    """What the trainer's loop asks of a way of training. Built for one run (config, model, data, processes)."""

    model: nn.Module  # the whole converted model (a stage engine's other stages hold their weights elsewhere)
    optimizer: torch.optim.Optimizer
    assumptions: dict[str, Any]  # whether the conservation law's assumptions hold for this run (summary.json)
    recorder: DiagnosticsRecorder | None
    scale: ScaleMonitor | None

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This process's part of a global batch."""
        ...

    def step(self, x: Tensor, y: Tensor, total: int, step: int) -> StepResult:
        """One optimiser step (none when the loss is not finite); ``total`` the global batch's size."""
        ...

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """Mean loss and accuracy on ``(x, y)`` in eval mode (the same on every process)."""
        ...

    def state_dict(self, common: dict[str, Any]) -> dict[str, Any] | None:
        """The checkpoint: ``common`` (the trainer's part) with the model's and optimiser's state; ``None`` on a
        process that does not write it. A collective call: every process calls it."""
        ...

    def load_state_dict(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Restore the model and optimiser from a checkpoint; returns the checkpoint as this process should read
        the rest of it (its own random state)."""
        ...

    def close(self) -> None:
        """The end of training (also after a failure): let go of process-group wrappers."""
        ...


# -- one process, or data-parallel -----------------------------------------------------------------------
class LocalEngine:
    """One process, or DDP over ``dist``'s ranks (``--batch-size`` is the global batch; the model is wrapped by
    :meth:`Distributed.wrap`). Diagnostics and the scale monitor run here."""

    def __init__(self, config: TrainConfig, model: nn.Module, dataset: Dataset, dist: Distributed) -> None:
        if config.batch_size % dist.world:
            raise RunDirError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
                              f"{dist.world} processes")
        self.config, self.model, self.dist = config, model, dist
        self.uses_target = falign.uses_target(model)
        unpaired: dict[str, str] = {}
        if self.uses_target:
            falign.set_target(model, dataset.y_train[:2])
        # one forward pass first: it makes every feedback matrix a direct rule sizes from the output, so the
        # optimiser and the DDP wrapper see the final parameters
        pairs = find_pairs(model, dataset.x_train[:2], not_applicable=unpaired)
        if config.freeze_hidden:
            freeze_hidden(model)
        self.forward = dist.wrap(model)
        self.optimizer = make_optimizer(config, model)
        falign.attach(model, self.optimizer)  # the rules' per-step work after every step
        reduce = dist.average if dist.world > 1 else None  # one process: the float64 reference check too
        self.recorder = DiagnosticsRecorder(model, reduce=reduce) if config.diagnostics_every else None
        self.scale = ScaleMonitor(model, config.scale_every) if config.scale_every else None
        self.assumptions: dict[str, Any] = conservation_assumptions(
            pairs, config.rule_object(), optimizer=config.optimizer,
            momentum=config.momentum if config.optimizer == "sgd" else 0.0, weight_decay=config.weight_decay,
            single_lr=config.lr_schedule == "none", not_applicable=unpaired)

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.dist.shard(x, y)

    def step(self, x: Tensor, y: Tensor, total: int, step: int) -> StepResult:
        """On a diagnostics step the recorder runs the forward pass, the rule's backward and one extra backward in
        backprop mode (the record is measured before the update)."""
        self.optimizer.zero_grad(set_to_none=True)
        every = self.config.diagnostics_every
        record = None
        watch = self.scale.watch(step) if self.scale is not None else contextlib.nullcontext()
        with watch:
            if self.recorder is not None and step % every == 0:
                check = partial(self._float64_loss, x, y, total) if self.config.reference_check else None
                loss, output, record = self.recorder.step(partial(self._forward_loss, x, y, total), x, check)
            else:
                loss, output = self._forward_loss(x, y, total)
                loss.backward()
        # the mean over ranks of the shards' terms is the global batch's mean loss (the step's one host sync)
        value = float(self.dist.mean(loss.detach()))
        scale_row = None
        if self.scale is not None and self.scale.due(step):
            scale_row = self.scale.record(step, value, output)
        if not math.isfinite(value):
            return StepResult(value, torch.zeros((), dtype=torch.int64), record, scale_row)
        self.optimizer.step()
        return StepResult(value, (output.detach().argmax(-1) == y).sum(), record, scale_row)

    def _float64_loss(self, x: Tensor, y: Tensor, total: int, model64: nn.Module) -> Tensor:
        """The batch's loss through a float64 copy of the model (the recorder's reference check)."""
        if self.uses_target:
            falign.set_target(model64, y)
        out = model64(x.double() if x.is_floating_point() else x)
        return shard_loss(self.config, out, y, total, self.dist.world)

    def _forward_loss(self, x: Tensor, y: Tensor, total: int) -> tuple[Tensor, Tensor]:
        if self.uses_target:
            falign.set_target(self.model, y)
        out = self.forward(x)
        return shard_loss(self.config, out, y, total, self.dist.world), out

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        return evaluate(self.model, self.config, x, y)

    def state_dict(self, common: dict[str, Any]) -> dict[str, Any] | None:
        if not self.dist.is_main:
            return None
        return {**common, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> dict[str, Any]:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return saved

    def close(self) -> None:
        self.forward = self.model  # the DDP wrapper goes before its process group


# -- pipeline stages ------------------------------------------------------------------------------------------
class PipelineEngine:
    """One stage of the model per process (:class:`falign.app.pipeline.Pipeline`): this rank's optimiser and per-step
    work; rank 0 gathers every stage's state into one checkpoint. No diagnostics (a stage sees only its layers).
    ``run_dir``: the run's folder, named in the error a stopped stage leaves."""

    recorder: DiagnosticsRecorder | None = None
    scale: ScaleMonitor | None = None

    def __init__(self, config: TrainConfig, model: nn.Module, dataset: Dataset, dist: Distributed,
                 device: torch.device, run_dir: Path) -> None:
        from falign.app.pipeline import Pipeline

        if dist.world != config.pipeline_stages:
            raise RunDirError(f"--pipeline-stages {config.pipeline_stages} runs one stage per process, but "
                              f"{dist.world} processes were started (torchrun "
                              f"--nproc_per_node={config.pipeline_stages})")
        self.config, self.model, self.dist, self.run_dir = config, model, dist, run_dir
        self.pipeline = Pipeline(model, config.pipeline_stages, schedule=config.pipeline_schedule,
                                 n_microbatches=config.microbatches or None, loss_fn=partial(loss_fn, config),
                                 example=dataset.x_train[:2], device=device)
        self.optimizer = make_optimizer(config, self.pipeline.module)
        falign.attach(self.pipeline.module, self.optimizer)
        self.assumptions = {"applies": False, "why": "not checked in pipeline mode (a stage sees only its own layers)"}

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, y  # every stage sees the whole batch (the first its inputs, the last its labels)

    def step(self, x: Tensor, y: Tensor, total: int, step: int) -> StepResult:
        import torch.distributed as dist

        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss, correct = self.pipeline.step(x, y)
            # the last stage knows the loss; every rank takes the same decision on it (one small all-reduce)
            values = torch.zeros(2, dtype=torch.float64)
            if loss is not None:
                values[0], values[1] = float(loss), float(correct)
            dist.all_reduce(values)
        except RuntimeError as err:
            if "closed" in str(err).lower() or "connection" in str(err).lower():
                raise RunDirError(f"pipeline mode: the process of another stage stopped at step {step} "
                                  f"({str(err).splitlines()[0][:200]}); the last complete checkpoint is kept, "
                                  f"continue with --resume {self.run_dir}") from None
            raise
        value = float(values[0])
        if not math.isfinite(value):
            return StepResult(value, torch.zeros((), dtype=torch.int64))
        self.optimizer.step()
        self.pipeline.after_step()
        return StepResult(value, torch.tensor(int(values[1])))

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        self.pipeline.close()  # this rank's messages of the last step land before evaluation's own
        return self.pipeline.evaluate(x, y, self.config.eval_batch_size)

    def state_dict(self, common: dict[str, Any]) -> dict[str, Any] | None:
        """Rank 0 gathers every stage's weights (under the whole model's keys), optimiser state and random state;
        a rank that died makes the gather fail, and nothing is written."""
        import torch.distributed as dist

        mine = {"model": {k: v.detach().cpu() for k, v in self.pipeline.stage_state().items()},
                "optimizer": self.optimizer.state_dict(), "rng": rng_state()}
        parts: list[Any] | None = [None] * self.dist.world if self.dist.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return None
        state = {**common, "model": self.model.state_dict(), "optimizer": None}
        for part in parts:
            state["model"].update(part["model"])
        state["pipeline"] = {"stages": self.config.pipeline_stages, "cuts": self.pipeline.cuts,
                             "optimizers": [p["optimizer"] for p in parts], "rng": [p["rng"] for p in parts]}
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> dict[str, Any]:
        self.model.load_state_dict(saved["model"])
        layout = saved.get("pipeline")
        if layout is None or layout["cuts"] != self.pipeline.cuts:
            raise RunDirError(f"--resume {self.run_dir}: the checkpoint was not written by this pipeline layout "
                              f"(stages cut at {None if layout is None else layout['cuts']}, now "
                              f"{self.pipeline.cuts})")
        mine = {**saved, "optimizer": layout["optimizers"][self.dist.rank], "rng": layout["rng"][self.dist.rank]}
        self.optimizer.load_state_dict(mine["optimizer"])
        return mine

    def close(self) -> None:
        """Nothing to let go of: the messages of a finished epoch were waited for before its evaluation, and after a
        failure a message to a stage that died must not be waited for."""


def make_engine(config: TrainConfig, model: nn.Module, dataset: Dataset, dist: Distributed, device: torch.device,
                run_dir: Path) -> Engine:
    """The engine of a config: pipeline stages when ``pipeline_stages`` is set, else one process or DDP."""
    if config.pipeline_stages:
        return PipelineEngine(config, model, dataset, dist, device, run_dir)
    return LocalEngine(config, model, dataset, dist)
