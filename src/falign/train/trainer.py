"""The training loop behind ``falign train``.

A run directory holds ``config.json`` (resolved config), ``versions.json``, ``metrics.jsonl`` (one
JSON row per epoch, plus diagnostics rows; deterministic for a seed), ``timing.jsonl`` (wall-clock time
per epoch), ``checkpoint.pt`` (latest: model with feedback weights, optimiser, scheduler, RNG states,
data position, written atomically) and ``summary.json``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import signal
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import falign
from falign.data import Dataset, batches, epoch_order, load_dataset
from falign.diagnostics import DiagnosticsRecorder, conservation_assumptions, find_pairs, jsonable
from falign.errors import FalignError
from falign.models import build_model
from falign.outdir import OutputDir
from falign.train.checkpoint import load_checkpoint
from falign.train.config import ConfigError, TrainConfig
from falign.train.progress import progress_bar
from falign.train.rundir import atomic_write, read_metrics, versions, write_json


class RunError(FalignError, RuntimeError):
    """A run directory cannot be used as asked (exists, locked, unreadable checkpoint...)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_run(config: TrainConfig, device: torch.device) -> tuple[Dataset, nn.Module]:
    """The dataset (on ``device``) and the converted model (on ``device``) of a config."""
    ds = load_dataset(config.data, data_dir=config.data_dir, n_classes=config.n_classes,
                      label_noise=config.label_noise, train_subset=config.train_subset, seed=config.seed,
                      synthetic_classes=config.synthetic_classes)
    seed_everything(config.seed)
    base = build_model(config.model, ds.input_shape, ds.num_classes, hidden=config.hidden,
                       activation=config.activation, bias=config.bias, init_scale=config.init_scale)
    rule_options = {}
    if config.rule == "wm":
        rule_options = {"lr": config.wm_lr, "decay": config.wm_decay, "steps": config.wm_steps}
    model = falign.convert(base, config.rule, feedback_init=config.feedback_init,
                           feedback_scale=config.feedback_scale, seed=config.seed,
                           output_signal=config.output_signal, inplace=True, **rule_options)
    return ds.to(device), model.to(device)


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


class Trainer:
    """Train one config into one run directory.

    Args:
        config: the run's :class:`TrainConfig`.
        out: run directory (default ``runs/<rule>-<model>-<data>-<time>``).
        progress: show a progress bar.
        overwrite: replace an existing run directory: only the files a falign run writes are deleted, and a
            folder holding anything else is refused (:mod:`falign.outdir`).
        resume: continue the run in ``out`` from its latest checkpoint.
        changes: on resume, config fields given again (e.g. by command-line flags): fields in
            :data:`RESUMABLE` may change (recorded in ``resumes.jsonl`` and ``summary.json``); any other
            field must equal the saved value, else :class:`RunError`.

    Data-parallel: started by ``torchrun --nproc_per_node=N -m falign train ...`` (``WORLD_SIZE`` > 1),
    the trainer joins PyTorch's process group (gloo on CPU, nccl on GPU), wraps the model in
    ``DistributedDataParallel`` and gives each rank an equal slice of every global batch
    (``--batch-size`` is the global batch). Feedback matrices are identical on every rank (they derive
    from the seed, brsf's draws from the seed and the step), gradients are averaged as for backprop,
    and only rank 0 writes metrics, diagnostics and checkpoints.
    """

    def __init__(self, config: TrainConfig, out: str | Path | None = None, *, progress: bool = True,
                 overwrite: bool = False, resume: bool = False, changes: dict[str, Any] | None = None) -> None:
        if changes and not resume:
            raise ValueError("changes= is for resume=True")
        self.config = config
        self.changes = dict(changes or {})
        self.applied_changes: dict[str, list[Any]] = {}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default = Path("runs") / f"{config.rule}-{config.model}-{config.data}-{stamp}"
        self.out = Path(out) if out is not None else default
        self.outdir = OutputDir(self.out, "run", "run directory")
        self.progress = progress
        self.overwrite = overwrite
        self.resume = resume
        self.device = resolve_device(config.device)
        self.tensorboard = None
        self.metrics_path = self.out / "metrics.jsonl"
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.rank, self.world = 0, 1
        self._owns_process_group = False
        self._lock = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- distributed ---------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        if self.device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_process_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.config.batch_size % self.world:
            raise RunError(f"--batch-size {self.config.batch_size} (the global batch) must be divisible by the "
                           f"{self.world} processes")

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _average_grads(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Average a dict of gradients over ranks (diagnostics' true gradients, outside DDP)."""
        if self.world == 1:
            return grads
        import torch.distributed as dist

        for g in grads.values():
            dist.all_reduce(g)
            g.div_(self.world)
        return grads

    # -- run directory -------------------------------------------------------------------------
    def _check_dir(self) -> None:
        """Refuse an unusable run directory before any work (nothing is written here)."""
        if self.resume:
            if self.out.exists() and not self.out.is_dir():
                raise RunError(f"--resume {self.out} is a file, not a run directory")
            if not (self.out / "config.json").is_file():
                raise RunError(f"{self.out}: no run to resume here (config.json missing)")
            return
        self.outdir.check()
        if self.outdir.holds_output() and not self.overwrite:
            raise RunError(f"{self.out} already holds a run; pass --resume to continue it or --overwrite to "
                           f"replace it (which deletes only the files a falign run writes)")

    def _prepare_dir(self) -> None:
        """Claim the run directory (rank 0): marker, lock; ``--overwrite`` deletes only a run's own files."""
        self._check_dir()
        if self.resume:
            self._lock_or_fail()
            return
        if self.outdir.holds_output():
            self._lock_or_fail()  # refuse to wipe a directory another process is writing
            self._lock.close()
            self._lock = None
        self.outdir.claim(overwrite=self.overwrite)
        self._lock_or_fail()

    def _lock_or_fail(self) -> None:
        self._lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RunError(f"{self.out} is locked by another falign process writing this run") from None

    def _resolve_resume(self) -> None:
        """Read the saved config of the run to resume and apply the changes allowed on resume."""
        path = self.out / "config.json"
        try:
            saved = json.loads(path.read_text())
        except OSError as err:
            raise RunError(f"{path}: cannot read it: {err.strerror or err}") from None
        except ValueError as err:
            raise RunError(f"{path} is not valid JSON ({err}); the run cannot be resumed") from None
        if not isinstance(saved, dict):
            raise RunError(f"{path} must hold a JSON object of config fields, got a {type(saved).__name__}")
        try:
            config = TrainConfig.from_dict(saved)
        except ConfigError as err:
            raise RunError(f"{path}: {err}") from None
        changes = dict(self.changes)
        saved_values = config.to_dict()
        conflicts = [k for k, v in changes.items()
                     if k not in RESUMABLE and _normal(v) != _normal(saved_values.get(k))]
        if conflicts:
            listed = ", ".join(f"--{k.replace('_', '-')} {_normal(changes[k])!r} (the run has "
                               f"{_normal(saved_values.get(k))!r})" for k in conflicts)
            verb = "conflicts" if len(conflicts) == 1 else "conflict"
            raise RunError(f"--resume {self.out}: {listed} {verb} with the saved run; on resume only "
                           f"{', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE))} may change. "
                           f"Start a new run (--out) to train with other settings")
        applied = {k: v for k, v in changes.items() if k in RESUMABLE and _normal(v) != _normal(saved_values[k])}
        if "epochs" in applied and config.lr_schedule != "none":
            raise RunError(f"--resume {self.out}: --epochs cannot change for a run with --lr-schedule "
                           f"{config.lr_schedule}: its learning-rate schedule is laid out over the epochs")
        self.config = config.replace(**applied) if applied else config
        self.applied_changes = {k: [saved_values[k], _normal(v)] for k, v in applied.items()}
        if self.world == 1:
            self.device = resolve_device(self.config.device)

    # -- state ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_sums": dict(self.sums),
            "metrics_rows": self.metrics_rows,
            "elapsed": self.elapsed(),
            "rng": rng_state(),
            "diagnostics": self.recorder.state_dict() if self.recorder is not None else None,
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0 only)."""
        if not self.is_main:
            return
        state = self._state()
        fault = os.environ.get("FALIGN_FAULT_KILL_IN_CHECKPOINT")
        crash = _kill_self if fault is not None and int(fault) == self.step else None
        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f), before_replace=crash)

    def _load_checkpoint(self) -> None:
        state = load_checkpoint(self.checkpoint_path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.sums = defaultdict(float, state["epoch_sums"])
        self._elapsed_before = state["elapsed"]
        set_rng_state(state["rng"])
        if self.recorder is not None and state.get("diagnostics"):
            self.recorder.load_state_dict(state["diagnostics"])
        self.metrics_rows = state["metrics_rows"]
        if self.is_main:  # keep exactly the rows written when the checkpoint was taken
            lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
            atomic_write(self.metrics_path, lambda f: f.write("".join(lines[: self.metrics_rows])), "w")

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._t0

    def log(self, row: dict[str, Any], path: Path | None = None) -> None:
        """Append a JSON row to ``metrics.jsonl`` (or ``path``); rank 0 only."""
        if not self.is_main:
            return
        with open(path or self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if path is None:
            self.metrics_rows += 1

    def _tensorboard_diagnostics(self, record: dict[str, Any]) -> None:
        if self.tensorboard is None:
            return
        w, step = self.tensorboard, self.step
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

    # -- training ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build data, model (+ DDP wrapper), optimiser, scheduler, diagnostics; step 0 state."""
        self.dataset, self.model = build_run(self.config, self.device)
        self.forward: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.config, self.model)
        self.scheduler = make_scheduler(self.config, self.optimizer)
        falign.attach(self.model, self.optimizer)  # brsf's redraws, wm's mirror steps after every step
        self.epoch, self.batch, self.step, self.metrics_rows = 0, 0, 0, 0
        self.sums: defaultdict[str, float] = defaultdict(float)
        self._elapsed_before = 0.0
        cfg = self.config
        self.recorder = (DiagnosticsRecorder(self.model, reduce=self._average_grads)
                         if cfg.diagnostics_every else None)
        unpaired: dict[str, str] = {}
        pairs = find_pairs(self.model, self.dataset.x_train[:2], not_applicable=unpaired)
        self.assumptions = conservation_assumptions(
            pairs, cfg.rule, optimizer=cfg.optimizer, momentum=cfg.momentum if cfg.optimizer == "sgd" else 0.0,
            weight_decay=cfg.weight_decay, single_lr=cfg.lr_schedule == "none", not_applicable=unpaired)

    def train_step(self, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
        """One optimiser step; returns the batch loss (a float) and the number of correct predictions.

        On a diagnostics step the recorder runs the forward pass, the rule's backward and one extra
        backward in backprop mode, and the measurements go to ``metrics.jsonl`` before the update.
        A non-finite loss skips the update (the caller decides what happens next).
        """
        self.optimizer.zero_grad(set_to_none=True)
        every = self.config.diagnostics_every
        if self.recorder is not None and self.step % every == 0:
            loss, output, record = self.recorder.step(partial(self._forward_loss, x, y), x)
            self.log({"event": "diagnostics", "step": self.step, "epoch": self.epoch + 1, **jsonable(record)})
            self._tensorboard_diagnostics(record)
        else:
            loss, output = self._forward_loss(x, y)
            loss.backward()
        loss = loss.detach()
        if self.world > 1:  # every rank takes the same divergence decision
            import torch.distributed as dist

            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world
        value = float(loss)  # the step's one host synchronisation for the loss
        if not math.isfinite(value):
            return value, torch.zeros((), dtype=torch.int64)
        self.optimizer.step()
        return value, (output.detach().argmax(-1) == y).sum()

    def _forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = self.forward(x)
        return loss_fn(self.config, out, y), out

    def run(self) -> dict[str, Any]:
        """Train to the end (or from the checkpoint to the end); returns the summary.

        Everything that can be checked is checked before the run directory is touched (the folder,
        the saved config on resume, the data and the model), so a run that fails to start leaves
        nothing behind.
        """
        self._init_distributed()
        try:
            if self.is_main:
                self._check_dir()
            if self.resume:
                self._resolve_resume()
            self.setup()
            if self.is_main:
                self._prepare_dir()
                for stale in self.out.glob(".*.tmp"):  # left by a crash during an atomic write
                    stale.unlink()
            self._barrier()
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.close()
            if self._owns_process_group:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        self._t0 = time.perf_counter()
        if self.resume and self.checkpoint_path.exists():
            self._load_checkpoint()
            if self.epoch > cfg.epochs:
                raise RunError(f"--resume {self.out}: --epochs {cfg.epochs} is fewer than the "
                               f"{self.epoch} epochs already completed")
        elif self.is_main:
            self.metrics_path.unlink(missing_ok=True)
            (self.out / "timing.jsonl").unlink(missing_ok=True)
        if self.is_main and (not self.resume or self.applied_changes):
            write_json(self.out / "config.json", cfg.to_dict())
        if self.is_main and self.applied_changes:
            self.log({"step": self.step, "epoch": self.epoch, "changes": self.applied_changes},
                     self.out / "resumes.jsonl")
        if self.is_main:
            write_json(self.out / "versions.json", {**versions(), "world_size": self.world})
            self.tensorboard = _tensorboard_writer(self.out / "tensorboard")
        n = len(self.dataset.y_train)
        per_epoch = math.ceil(n / cfg.batch_size)
        bar = progress_bar(cfg.epochs * per_epoch, f"{cfg.rule} {cfg.model} {cfg.data}",
                           self.progress and self.is_main, initial=self.step)
        kill_at = os.environ.get("FALIGN_FAULT_KILL_AT_STEP")
        status, message = "completed", ""
        try:
            while self.epoch < cfg.epochs:
                order = epoch_order(n, cfg.seed, self.epoch, self.device)
                for x, y in batches(self.dataset.x_train, self.dataset.y_train, cfg.batch_size, order, self.batch):
                    if self.world > 1:
                        x, y = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
                    loss_value, correct = self.train_step(x, y)
                    if not math.isfinite(loss_value):
                        if cfg.on_divergence == "stop":
                            status = "diverged"
                            message = (f"loss became {loss_value} at step {self.step} (epoch {self.epoch + 1}) "
                                       f"under rule {cfg.rule!r}; stopped, the last good checkpoint is kept")
                            raise _Diverged
                        self.sums["skipped"] += 1
                    else:
                        self.sums["loss"] += loss_value * len(y)
                        self.sums["correct"] += int(correct)
                        self.sums["seen"] += len(y)
                    self.batch += 1
                    self.step += 1
                    bar.update(1)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if kill_at is not None and int(kill_at) == self.step:
                        _kill_self()  # fault injection for the crash/resume tests
                if self.sums["skipped"] and not self.sums["seen"]:
                    status = "diverged"
                    message = (f"every batch of epoch {self.epoch + 1} had a non-finite loss under rule "
                               f"{cfg.rule!r} (--on-divergence skip-batch); stopped")
                    raise _Diverged
                self._end_epoch(bar)
        except _Diverged:
            pass
        finally:
            bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        if status == "completed":
            self.save_checkpoint()
        summary = self._summary(status, message)
        if self.is_main:
            write_json(self.out / "summary.json", summary)
        if status == "diverged":
            raise DivergenceError(message)
        return summary

    def _end_epoch(self, bar) -> None:
        cfg = self.config
        test_loss, test_acc = evaluate(self.model, cfg, self.dataset.x_test, self.dataset.y_test)
        loss_sum, correct, seen, skipped = self._all_sum(
            [self.sums["loss"], self.sums["correct"], self.sums["seen"], self.sums["skipped"]])
        seen = max(seen, 1.0)
        row = {
            "event": "epoch", "epoch": self.epoch + 1, "step": self.step,
            "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "test_loss": test_loss, "test_acc": test_acc, "lr": self.optimizer.param_groups[0]["lr"],
        }
        if skipped:
            row["skipped_batches"] = int(skipped / self.world)
        self.log(row)
        self.log({"epoch": self.epoch + 1, "step": self.step, "seconds": round(self.elapsed(), 3)},
                 self.out / "timing.jsonl")
        if self.tensorboard is not None:
            for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                self.tensorboard.add_scalar(f"epoch/{key}", row[key], self.step)
            self.tensorboard.flush()
        bar.set_postfix({"train_acc": f"{row['train_acc']:.3f}", "test_acc": f"{test_acc:.3f}"})
        self.scheduler.step()
        self.epoch += 1
        self.batch = 0
        self.sums = defaultdict(float)

    def _summary(self, status: str, message: str) -> dict[str, Any]:
        rows = read_metrics(self.metrics_path) if (self.is_main and self.metrics_path.exists()) else []
        rows = [r for r in rows if r.get("event") == "epoch"]
        final = rows[-1] if rows else {}
        return {
            "status": status,
            "message": message,
            "rule": self.config.rule, "model": self.config.model, "data": self.config.data,
            "epochs_completed": len(rows), "steps": self.step,
            "final": {k: final.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
            "best_test_acc": max((r["test_acc"] for r in rows), default=None),
            "wall_time_s": round(self.elapsed(), 3),
            "device": str(self.device),
            "world_size": self.world,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "conversion": [vars(r) for r in falign.conversion_report(self.model).layers],
            "conservation_assumptions": self.assumptions,
            "resumes": _read_rows(self.out / "resumes.jsonl") if self.is_main else [],
        }


# Config fields that may change when a run is resumed (every other field must match the saved run).
RESUMABLE = frozenset({"epochs", "checkpoint_every", "device", "eval_batch_size"})


def _normal(value: Any) -> Any:
    """Config values compared on resume as JSON sees them (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path) if path.exists() else []


def _kill_self() -> None:
    """SIGKILL this process (fault injection: ``FALIGN_FAULT_KILL_AT_STEP`` / ``_IN_CHECKPOINT``)."""
    os.kill(os.getpid(), signal.SIGKILL)


def _tensorboard_writer(path: Path):
    """A TensorBoard ``SummaryWriter`` when the ``tensorboard`` package is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class _Diverged(Exception):
    pass


class DivergenceError(FalignError, RuntimeError):
    """The loss became NaN or infinite under ``on_divergence='stop'``."""


def train(config: TrainConfig, out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train ``config`` into ``out``; returns the summary (see :class:`Trainer`)."""
    return Trainer(config, out, **kwargs).run()

