"""The training loop behind ``falign train``.

A run directory holds ``config.json`` (resolved config), ``versions.json``, ``metrics.jsonl`` (one
JSON row per epoch, plus diagnostics rows; deterministic for a seed), ``timing.jsonl`` (wall-clock time
per epoch), ``checkpoint.pt`` (latest: model with feedback weights, optimiser, scheduler, RNG states,
data position, written atomically) and ``summary.json``. The folder and its files are handled by
:class:`~falign.app.train.rundir.RunDir`, data parallelism by :class:`~falign.app.train.distributed.Distributed`,
TensorBoard and the printed table by :mod:`falign.app.train.logging`.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import falign
from falign.app.train.checkpoint import CheckpointError
from falign.app.train.config import ConfigError, TrainConfig
from falign.app.train.distributed import Distributed
from falign.app.train.engines import (  # noqa: F401  (make_optimizer ... freeze_hidden: importable from here too)
    Engine,
    evaluate,
    freeze_hidden,
    loss_fn,
    make_engine,
    make_optimizer,
    make_scheduler,
    shard_loss,
)
from falign.app.train.logging import Loggers, run_loggers
from falign.app.train.progress import progress_bar
from falign.app.train.rundir import RunDir, RunDirError, versions
from falign.data import Dataset, batches, epoch_order, load_dataset
from falign.diagnostics import DiagnosticsRecorder, jsonable
from falign.diagnostics.scale import ScaleMonitor, find_runaway
from falign.errors import FalignError
from falign.models import build_model
from falign.seeding import rng_state, seed_everything, set_rng_state

RunError = RunDirError
"""A run directory cannot be used as asked (exists, locked, unreadable checkpoint, conflicting resume...)."""

# Config fields that may change when a run is resumed (every other field must match the saved run).
RESUMABLE = frozenset({"epochs", "checkpoint_every", "device", "eval_batch_size", "scale_every", "reference_check",
                       "wandb_project"})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


def xavier_init(model: nn.Module) -> None:
    """Every ``nn.Linear`` and convolution weight drawn ``xavier_uniform`` (bound sqrt(6 / (fan_in + fan_out)))
    and every bias of those layers set to 0, from the current RNG: the forward initialisation of BioTorch's
    feedback layers (``--weight-init xavier``; with ``--feedback-init xavier_uniform``, its whole FA init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.modules.conv._ConvNd):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()


def build_run(config: TrainConfig, device: torch.device) -> tuple[Dataset, nn.Module]:
    """The dataset (on ``device``) and the converted model (on ``device``) of a config."""
    ds = load_dataset(config.data, data_dir=config.data_dir, n_classes=config.n_classes,
                      label_noise=config.label_noise, train_subset=config.train_subset, seed=config.seed,
                      synthetic_classes=config.synthetic_classes, val_size=config.val_size, resize=config.resize)
    seed_everything(config.seed)
    base = build_model(config.model, ds.input_shape, ds.num_classes, hidden=config.hidden,
                       activation=config.activation, bias=config.bias, init_scale=config.init_scale)
    if config.weight_init == "xavier":
        xavier_init(base)
    model = falign.convert(base, config.rule_object(), feedback_init=config.feedback_init,
                           feedback_scale=config.feedback_scale, seed=config.seed,
                           output_signal=config.output_signal, inplace=True)
    return ds.to(device), model.to(device)


@dataclass
class Progress:
    """Where a run stands: the data position and the running sums of the current epoch."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    sums: defaultdict = field(default_factory=lambda: defaultdict(float))
    elapsed_before: float = 0.0


class Trainer:
    """Train one config into one run directory.

    Args:
        config: the run's :class:`TrainConfig` (on resume, the saved one is used).
        out: run directory (default ``runs/<rule>-<model>-<data>-<time>``).
        progress: show a progress bar.
        overwrite: replace an existing run directory: only the files a falign run writes are deleted, and a
            folder holding anything else is refused (:mod:`falign.app.outdir`).
        resume: continue the run in ``out`` from its latest checkpoint.
        changes: on resume, config fields given again (e.g. by command-line flags): fields in
            :data:`RESUMABLE` may change (recorded in ``resumes.jsonl`` and ``summary.json``); any other
            field must equal the saved value, else :class:`RunError`.

    Data-parallel: started by ``torchrun --nproc_per_node=N -m falign train ...`` (``WORLD_SIZE`` > 1):
    see :mod:`falign.app.train.distributed`; ``--batch-size`` is the global batch, each rank trains on an
    equal slice of it, and only rank 0 writes metrics, diagnostics and checkpoints.
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
        self.show_progress = progress
        self.overwrite = overwrite
        self.resume = resume
        self.device = resolve_device(config.device)
        self.dist: Distributed | None = None
        self.run_dir = RunDir(self.out)
        self.loggers = Loggers()
        self.state = Progress()
        self._training = False  # the training loop has started (a failure from then on is in summary.json)
        # built by setup(): data, model, the engine that trains it (falign.app.train.engines), the lr schedule
        self.dataset: Dataset | None = None
        self.model: nn.Module | None = None
        self.engine: Engine | None = None
        self.scheduler: Any = None
        self._saved: dict[str, Any] | None = None  # on resume: the checkpoint, read by _resolve_resume
        self._t0 = time.perf_counter()

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def recorder(self) -> DiagnosticsRecorder | None:
        return self.engine.recorder if self.engine is not None else None

    @property
    def scale(self) -> ScaleMonitor | None:
        return self.engine.scale if self.engine is not None else None

    # -- resume --------------------------------------------------------------------------------------
    def _resolve_resume(self) -> None:
        """Read the saved config of the run to resume and apply the changes allowed on resume."""
        saved = self.run_dir.read_config()
        try:
            config = TrainConfig.from_dict(saved)
        except ConfigError as err:
            raise RunError(f"{self.out / 'config.json'}: {err}") from None
        saved_values = config.to_dict()
        conflicts = [k for k, v in self.changes.items()
                     if k not in RESUMABLE and _normal(v) != _normal(saved_values.get(k))]
        if conflicts:
            listed = ", ".join(f"{_flag(k)} {_normal(self.changes[k])!r} (the run has "
                               f"{_normal(saved_values.get(k))!r})" for k in conflicts)
            verb = "conflicts" if len(conflicts) == 1 else "conflict"
            raise RunError(f"--resume {self.out}: {listed} {verb} with the saved run; on resume only "
                           f"{', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE))} may change. "
                           f"Start a new run (--out) to train with other settings")
        applied = {k: v for k, v in self.changes.items()
                   if k in RESUMABLE and _normal(v) != _normal(saved_values[k])}
        if "epochs" in applied and config.lr_schedule != "none":
            raise RunError(f"--resume {self.out}: --epochs cannot change for a run with --lr-schedule "
                           f"{config.lr_schedule}: its learning-rate schedule is laid out over the epochs")
        self.config = config.replace(**applied) if applied else config
        self.applied_changes = {k: [saved_values[k], _normal(v)] for k, v in applied.items()}
        if self.dist is None or self.dist.world == 1:
            self.device = resolve_device(self.config.device)
        self._saved = self.run_dir.load_checkpoint(self.device)
        if self._saved is not None:
            self._check_saved_config(saved_values)
        elif (self.out / "summary.json").exists() or (self.run_dir.metrics.is_file()
                                                      and self.run_dir.metrics.stat().st_size > 0):
            raise RunError(f"--resume {self.out}: the run has trained (metrics.jsonl, summary.json) but has no "
                           f"checkpoint.pt to continue from; resuming would start it again from step 0: pass "
                           f"--out {self.out} --overwrite to do that")

    def _check_saved_config(self, saved_values: dict[str, Any]) -> None:
        """Refuse a ``config.json`` that differs from the config the checkpoint was trained with (edited by hand
        after the run saved it: resuming would silently train with other settings)."""
        path = self.run_dir.checkpoint
        if "config" not in self._saved:
            return  # written before checkpoints held their config
        try:
            trained = TrainConfig.from_dict(self._saved["config"]).to_dict()
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{path}: its config is not a valid falign config ({err})") from None
        differ = sorted(k for k in trained if k not in RESUMABLE and _normal(trained[k]) != _normal(saved_values[k]))
        if differ:
            listed = ", ".join(f"{k} {_normal(saved_values[k])!r} (the checkpoint has {_normal(trained[k])!r})"
                               for k in differ)
            raise RunError(f"--resume {self.out}: config.json was changed after the checkpoint was written: {listed}; "
                           f"restore config.json, or start a new run (--out) to train with other settings")

    # -- state ---------------------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint (the engine adds the model's and optimiser's)."""
        s = self.state
        return {
            "scheduler": self.scheduler.state_dict(),
            "epoch": s.epoch,
            "batch": s.batch,
            "step": s.step,
            "epoch_sums": dict(s.sums),
            "metrics_rows": self.run_dir.rows,
            "elapsed": self.elapsed(),
            "rng": rng_state(),
            "diagnostics": self.recorder.state_dict() if self.recorder is not None else None,
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0 only; every rank calls this: the engine may gather the
        state of several processes first)."""
        state = self.engine.state_dict(self._checkpoint_state())
        if state is not None:
            self.run_dir.save_checkpoint(state, before_replace=self.on_checkpoint_written)

    # -- extension points: they do nothing here; a subclass (or a test) acts at these moments ------------------
    def on_step_end(self) -> None:
        """Called after every training step, once the step's checkpoint (if one was due) is written."""

    def on_checkpoint_written(self) -> None:
        """Called inside every checkpoint write, after the temporary file is complete and before it replaces
        ``checkpoint.pt``."""

    def _load_checkpoint(self, saved: dict[str, Any]) -> None:
        """Restore the run's state from ``saved``; a checkpoint that does not fit this run (entries missing, or
        tensors of another model or optimiser: tampered with, or copied from another run) is a
        :class:`CheckpointError` naming the file."""
        path = self.run_dir.checkpoint
        missing = [k for k in _CHECKPOINT_KEYS if k not in saved]
        if missing:
            raise CheckpointError(f"{path}: not a checkpoint of a falign run (no {', '.join(missing)} "
                                  f"entr{'y' if len(missing) == 1 else 'ies'}); it cannot be resumed")
        counters = ("epoch", "batch", "step", "metrics_rows")
        bad = [k for k in counters if type(saved[k]) is not int or saved[k] < 0]
        bad += [] if isinstance(saved["elapsed"], (int, float)) else ["elapsed"]
        bad += [] if isinstance(saved["epoch_sums"], dict) else ["epoch_sums"]
        if bad:
            raise CheckpointError(f"{path}: its {', '.join(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not "
                                  f"what falign writes (tampered with); it cannot be resumed")
        try:
            self._restore(saved)
        except FalignError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            why = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
            raise CheckpointError(f"{path}: does not fit this run's model or optimiser (tampered with, or from "
                                  f"another run): {why[:300]}") from None

    def _restore(self, saved: dict[str, Any]) -> None:
        saved = self.engine.load_state_dict(saved)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = Progress(saved["epoch"], saved["batch"], saved["step"],
                              defaultdict(float, saved["epoch_sums"]), saved["elapsed"])
        set_rng_state(saved["rng"])
        if self.recorder is not None and saved.get("diagnostics"):
            self.recorder.load_state_dict(saved["diagnostics"])
        self.run_dir.keep_rows(saved["metrics_rows"])  # exactly the rows written when it was taken

    def elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self._t0

    # -- training ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build data, model, the engine that trains it (optimiser, per-step work, diagnostics), the schedule."""
        cfg = self.config
        self.dataset, self.model = build_run(cfg, self.device)
        self.engine = make_engine(cfg, self.model, self.dataset, self.dist, self.device, self.out)
        self.scheduler = make_scheduler(cfg, self.engine.optimizer)

    def train_step(self, x: Tensor, y: Tensor, total: int | None = None) -> tuple[float, Tensor]:
        """One optimiser step on this rank's shard ``(x, y)`` of a global batch of ``total`` examples
        (default: ``len(y)`` times the ranks); returns the global batch's mean loss (a float) and this
        shard's number of correct predictions.

        On a diagnostics step the recorder runs the forward pass, the rule's backward and one extra
        backward in backprop mode before the update; the record goes to ``metrics.jsonl`` after the step.
        A non-finite loss skips the update (the caller decides what happens next). The step itself is the
        engine's (:mod:`falign.app.train.engines`); its measurements are logged here.
        """
        total = len(y) * self.dist.world if total is None else total
        result = self.engine.step(x, y, total, self.state.step)
        if result.record is not None:
            self.run_dir.log({"event": "diagnostics", "step": self.state.step, "epoch": self.state.epoch + 1,
                              **jsonable(result.record)})
            self.loggers.diagnostics(result.record, self.state.step)
        if result.scale_row is not None:
            self.run_dir.log({"epoch": self.state.epoch + 1, **jsonable(result.scale_row)}, "scale.jsonl")
        return result.loss, result.correct

    def run(self) -> dict[str, Any]:
        """Train to the end (or from the checkpoint to the end); returns the summary.

        Everything that can be checked is checked before the run directory is touched (the folder,
        the saved config on resume, the data and the model), so a run that fails to start leaves
        nothing behind. A new run that fails after claiming its folder but before its first training step
        leaves nothing either; one that fails later says why in ``summary.json`` (``"status": "failed"``).
        """
        self.dist = Distributed(self.device)
        self.device = self.dist.device
        self.run_dir = RunDir(self.out, main=self.dist.is_main)
        try:
            if self.is_main:
                self.run_dir.check(resume=self.resume, overwrite=self.overwrite)
            if self.resume:
                self._resolve_resume()
            self.setup()
            if self.is_main:
                self.run_dir.claim(resume=self.resume, overwrite=self.overwrite)
            self.dist.barrier()
            return self._run()
        except BaseException as err:
            if self.run_dir.claimed and not isinstance(err, DivergenceError):  # a divergence has its summary
                self._record_failure(err)
            raise
        finally:
            self.run_dir.release()
            self.loggers.close()
            if self.engine is not None:
                self.engine.close()
            self.dist.close()

    def _record_failure(self, err: BaseException) -> None:
        """A failure after the folder was claimed: a new run that took no training step leaves nothing behind;
        a run that trained says why in ``summary.json`` (``"status": "failed"``). A resume that failed before
        training keeps the run as it was."""
        try:
            if not self.resume and self.state.step == 0:
                self.run_dir.abandon()
            elif self._training:
                self.run_dir.write_json("summary.json", self._summary("failed", f"{type(err).__name__}: {err}"))
        except Exception:  # e.g. the disk is still full: the original error is the one reported
            pass

    def _start(self) -> None:
        """Step 0 of a new run, or the checkpoint of the run being resumed; the run's config and versions."""
        cfg = self.config
        self._t0 = time.perf_counter()
        saved, self._saved = self._saved, None  # the checkpoint read by _resolve_resume (None: a new run)
        if saved is not None:
            self._load_checkpoint(saved)
            if self.state.epoch > cfg.epochs:
                raise RunError(f"--resume {self.out}: --epochs {cfg.epochs} is fewer than the "
                               f"{self.state.epoch} epochs already completed")
        else:
            self.run_dir.start_fresh()
        if not self.resume or self.applied_changes:
            self.run_dir.write_json("config.json", cfg.to_dict())
        if self.resume:  # every resume is recorded: by hand (--resume) or by torchrun after a failure
            self.run_dir.log({"step": self.state.step, "epoch": self.state.epoch, "changes": self.applied_changes,
                              "elastic_restart": elastic_restart()}, "resumes.jsonl")
        self.run_dir.write_json("versions.json", {**versions(), "world_size": self.dist.world})
        if self.is_main:
            self.loggers = run_loggers(self.out, cfg.to_dict(), resume=self.resume)

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        self._start()
        s = self.state
        n = len(self.dataset.y_train)
        bar = progress_bar(cfg.epochs * math.ceil(n / cfg.batch_size), f"{cfg.rule} {cfg.model} {cfg.data}",
                           self.show_progress and self.is_main, initial=s.step)
        status, message = "completed", ""
        self._training = True
        try:
            while s.epoch < cfg.epochs:
                order = epoch_order(n, cfg.seed, s.epoch, self.device)
                for x, y in batches(self.dataset.x_train, self.dataset.y_train, cfg.batch_size, order, s.batch,
                                    drop_last=cfg.drop_last):
                    total = len(y)  # the global batch (a last one may be smaller, and not divide by the ranks)
                    x, y = self.engine.shard(x, y)
                    loss_value, correct = self.train_step(x, y, total)
                    if not math.isfinite(loss_value):
                        if cfg.on_divergence == "stop":
                            status = "diverged"
                            message = (f"loss became {loss_value} at step {s.step} (epoch {s.epoch + 1}) "
                                       f"under rule {cfg.rule!r}; stopped, the last good checkpoint is kept")
                            raise _Diverged
                        s.sums["skipped"] += 1
                    else:
                        s.sums["loss"] += loss_value * len(y)  # summed over ranks: the global mean × total
                        s.sums["correct"] += int(correct)
                        s.sums["seen"] += len(y)
                        self.loggers.step(loss_value, self.optimizer.param_groups[0]["lr"], s.step)
                    s.batch += 1
                    s.step += 1
                    bar.update(1)
                    if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    self.on_step_end()
                if s.sums["skipped"] and not s.sums["seen"]:
                    status = "diverged"
                    message = (f"every batch of epoch {s.epoch + 1} had a non-finite loss under rule "
                               f"{cfg.rule!r} (--on-divergence skip-batch); stopped")
                    raise _Diverged
                self._end_epoch(bar)
            if self.is_main:
                epochs = [r for r in self.run_dir.rows_of("metrics.jsonl") if r.get("event") == "epoch"]
                keys = ("train_loss", "train_acc", "test_loss", "test_acc")
                final = {k: epochs[-1][k] for k in keys} if epochs else {}
                self.loggers.hparams(self.config.to_dict(), final)
        except _Diverged:
            pass
        finally:
            bar.close()
            self.loggers.close()
        if status == "completed":
            self.save_checkpoint()
        summary = self._summary(status, message)
        self.run_dir.write_json("summary.json", summary)
        self.dist.barrier()  # every rank leaves together: none tears down the process group under another
        if status == "diverged":
            raise DivergenceError(message)
        return summary

    def _end_epoch(self, bar) -> None:
        s = self.state
        test_loss, test_acc = self.engine.evaluate(self.dataset.x_test, self.dataset.y_test)
        val = {}
        if self.dataset.y_val is not None:
            val_loss, val_acc = self.engine.evaluate(self.dataset.x_val, self.dataset.y_val)
            val = {"val_loss": val_loss, "val_acc": val_acc}
        loss_sum, correct, seen, skipped = self.dist.all_sum(
            [s.sums["loss"], s.sums["correct"], s.sums["seen"], s.sums["skipped"]])
        seen = max(seen, 1.0)
        row = {
            "event": "epoch", "epoch": s.epoch + 1, "step": s.step,
            "train_loss": loss_sum / seen, "train_acc": correct / seen,
            **val, "test_loss": test_loss, "test_acc": test_acc, "lr": self.optimizer.param_groups[0]["lr"],
        }
        if skipped:
            row["skipped_batches"] = int(skipped / self.dist.world)
        self.run_dir.log(row)
        self.run_dir.log({"epoch": s.epoch + 1, "step": s.step, "seconds": round(self.elapsed(), 3)}, "timing.jsonl")
        self.loggers.epoch(row, s.step)
        bar.set_postfix({"train_acc": f"{row['train_acc']:.3f}", "test_acc": f"{test_acc:.3f}"})
        self.scheduler.step()
        s.epoch += 1
        s.batch = 0
        s.sums = defaultdict(float)

    def _scale_summary(self) -> dict[str, Any] | None:
        """The scale-stability check of the run (:func:`falign.diagnostics.scale.find_runaway`) on its
        ``scale.jsonl``: the runaway (or ``None``) and the last record's logit scale."""
        if not self.is_main or self.scale is None:
            return None
        records = self.run_dir.rows_of("scale.jsonl")
        runaway = find_runaway(records, self.dataset.num_classes) if records else None
        return jsonable({"runaway": runaway, "records": len(records),
                         "last_logit_scale": records[-1]["logit_scale"] if records else None,
                         "every": self.config.scale_every})

    def _summary(self, status: str, message: str) -> dict[str, Any]:
        rows = [r for r in self.run_dir.rows_of("metrics.jsonl") if r.get("event") == "epoch"] if self.is_main else []
        final = rows[-1] if rows else {}
        return {
            "status": status,
            "message": message,
            "rule": self.config.rule, "model": self.config.model, "data": self.config.data,
            "num_classes": self.dataset.num_classes if self.dataset is not None else None,
            "epochs_completed": len(rows), "steps": self.state.step,
            "final": {k: final.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
            "best_test_acc": max((r["test_acc"] for r in rows), default=None),
            **_val_selected(rows),
            "scale": self._scale_summary(),
            "diagnostics": _diagnostics_digest(self.run_dir.rows_of("metrics.jsonl")) if self.is_main else None,
            "wall_time_s": round(self.elapsed(), 3),
            "device": str(self.device),
            "world_size": self.dist.world,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "conversion": [vars(r) for r in falign.conversion_report(self.model).layers],
            "conservation_assumptions": self.engine.assumptions if self.engine is not None else {},
            "resumes": self.run_dir.rows_of("resumes.jsonl") if self.is_main else [],
        }


def _diagnostics_digest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the diagnostics rows flag, for ``summary.json``: per layer, how many records found backprop's reference
    gradient to be rounding noise (the angle then undefined) or needed float64, and the last record's effective
    rank of each layer's error signal (the rule's and backprop's)."""
    diag = [r for r in rows if r.get("event") == "diagnostics"]
    if not diag:
        return None
    counts: dict[str, dict[str, int]] = {}
    for r in diag:
        if isinstance(r.get("reference"), dict):
            for layer, info in r["reference"].items():
                used = (info or {}).get("used")
                if used in ("undefined", "float64"):
                    counts.setdefault(used, {}).setdefault(layer, 0)
                    counts[used][layer] += 1
    last = diag[-1]
    return {"records": len(diag), "reference_undefined": counts.get("undefined", {}),
            "reference_float64": counts.get("float64", {}), "signal_rank_last": last.get("signal_rank"),
            "signal_rank_bp_last": last.get("signal_rank_bp")}


def _val_selected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """With a validation split: the epoch of the best validation accuracy (the first, on ties) and its test
    accuracy — the test error a run selected without looking at the test set reports."""
    scored = [r for r in rows if "val_acc" in r]
    if not scored:
        return {}
    best = max(scored, key=lambda r: r["val_acc"])
    return {"val_selected": {"epoch": best["epoch"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]}}


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "batch", "step", "epoch_sums", "elapsed", "rng",
                    "metrics_rows")
"""The entries of a run's checkpoint that a resume reads."""


def _flag(field_name: str) -> str:
    """The command-line flag of a config field."""
    return "--rule-option" if field_name == "rule_options" else "--" + field_name.replace("_", "-")


def _normal(value: Any) -> Any:
    """Config values compared on resume as JSON sees them (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def elastic_restart() -> int:
    """How many times ``torchrun --max-restarts`` has restarted this worker (0: the first attempt, or no torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


class _Diverged(Exception):
    pass


class DivergenceError(FalignError, RuntimeError):
    """The loss became NaN or infinite under ``on_divergence='stop'``."""


def train(config: TrainConfig, out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train ``config`` into ``out``; returns the summary (see :class:`Trainer`)."""
    return Trainer(config, out, **kwargs).run()
