"""Training configuration: one dataclass, validated, saved with every run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from falign.convert import OUTPUT_SIGNALS
from falign.data import DATASETS
from falign.errors import FalignError
from falign.models import MODELS
from falign.models.mlp import ACTIVATIONS
from falign.pipeline import SCHEDULES
from falign.rules import FEEDBACK_INITS, RULES, get_rule
from falign.seeding import MAX_SEED
from falign.train.logging import wandb_installed

BUNDLED = ("digits", "synthetic")
"""Datasets made in-process (no ``data_dir``)."""


OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("none", "step", "cosine")
LOSSES = ("ce", "mse")
DEVICES = ("auto", "cpu", "cuda")
ON_DIVERGENCE = ("stop", "skip-batch")


class ConfigError(FalignError, ValueError):
    """A configuration value is unknown or out of range."""


def _one_of(default: str, choices: Any) -> Any:
    """A field whose value is one of ``choices`` (a tuple, or a registry whose keys are the names): declared here
    once, checked by :meth:`TrainConfig.validate` and offered by the command line (:meth:`TrainConfig.choices`)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class TrainConfig:
    """Everything that defines a training run (``falign train`` flags map one-to-one onto fields)."""

    rule: str = _one_of("fa", RULES)
    model: str = _one_of("mlp", MODELS)
    hidden: tuple[int, ...] = (256, 256)
    activation: str = _one_of("relu", ACTIVATIONS)
    bias: bool = True
    init_scale: float = 1.0
    data: str = _one_of("digits", DATASETS)
    data_dir: str | None = None
    n_classes: int | None = None
    label_noise: float = 0.0
    train_subset: int | None = None
    val_size: int = 0
    resize: int | None = None
    synthetic_classes: int = 10
    epochs: int = 30
    batch_size: int = 32
    drop_last: bool = False
    optimizer: str = _one_of("sgd", OPTIMIZERS)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = _one_of("none", LR_SCHEDULES)
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    loss: str = _one_of("ce", LOSSES)
    seed: int = 0
    device: str = _one_of("auto", DEVICES)
    feedback_init: str = _one_of("kaiming_uniform", FEEDBACK_INITS)
    feedback_scale: float = 1.0
    output_signal: str = _one_of("rule", OUTPUT_SIGNALS)
    freeze_hidden: bool = False
    rule_options: dict[str, Any] = field(default_factory=dict)
    diagnostics_every: int = 0
    scale_every: int = 50
    reference_check: bool = True
    checkpoint_every: int = 0
    on_divergence: str = _one_of("stop", ON_DIVERGENCE)
    eval_batch_size: int = 1000
    pipeline_stages: int = 0
    pipeline_schedule: str = _one_of("auto", SCHEDULES)
    microbatches: int = 0
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self.hidden = tuple(int(h) for h in self.hidden)
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        self.validate()

    def _check_types(self) -> None:
        """Every field has its declared type (a config read from JSON may hold anything)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_TYPES.get(f.name)
            if kind is None:
                continue
            optional, base = kind
            if value is None and optional:
                continue
            if base is tuple:
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                want = "a list of numbers"
            elif base is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                want = "a number"
            elif base is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
                want = "an integer"
            elif base is bool:
                ok = isinstance(value, bool)
                want = "true or false"
            elif base is dict:
                ok = isinstance(value, dict)
                want = "a mapping"
            else:
                ok = isinstance(value, str)
                want = "a string"
            if not ok:
                raise ConfigError(f"{f.name} must be {want}{' or null' if optional else ''}, got {value!r}")

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                options = self.choices(f.name)
                value = getattr(self, f.name)
                check(value in options, f"unknown {f.name} {value!r}; choose one of {', '.join(options)}")
        check(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
              f"hidden widths must be >= 1, got {self.hidden}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
              f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        check(0 <= self.label_noise < 1, f"label noise rate must be in [0, 1), got {self.label_noise}")
        check(self.n_classes is None or self.n_classes >= 2, f"n_classes must be >= 2, got {self.n_classes}")
        check(self.train_subset is None or self.train_subset >= 1,
              f"train_subset must be >= 1, got {self.train_subset}")
        check(self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}")
        check(self.resize is None or self.resize >= 4, f"resize must be >= 4 pixels, got {self.resize}")
        check(self.synthetic_classes >= 2, f"synthetic_classes must be >= 2, got {self.synthetic_classes}")
        check(math.isfinite(self.init_scale) and self.init_scale > 0,
              f"init_scale must be a finite number > 0, got {self.init_scale}")
        check(math.isfinite(self.feedback_scale) and self.feedback_scale > 0,
              f"feedback_scale must be a finite number > 0, got {self.feedback_scale}")
        check(0 <= self.seed <= MAX_SEED, f"seed must be an integer in [0, 2**63 - 1] (what torch.manual_seed "
                                          f"takes), got {self.seed}")
        check(self.data_dir is None or self.data not in BUNDLED,
              f"--data-dir does not apply to --data {self.data} (made in-process, it reads no files); leave it "
              f"out, or choose a dataset read from files ({', '.join(d for d in DATASETS if d not in BUNDLED)})")
        check(all(0 < m < 1 for m in self.lr_milestones),
              f"lr_milestones are fractions in (0, 1), got {self.lr_milestones}")
        check(self.diagnostics_every >= 0, f"diagnostics_every must be >= 0, got {self.diagnostics_every}")
        check(not (self.freeze_hidden and self.pipeline_stages),
              "freeze_hidden (the depth-utility baseline) is not available in pipeline mode")
        check(not (self.freeze_hidden and self.diagnostics_every),
              "freeze_hidden trains the output layer alone: there is no rule to diagnose; leave --diagnostics-every "
              "at 0")
        check(self.scale_every >= 0, f"scale_every must be >= 0, got {self.scale_every}")
        check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        check(self.pipeline_stages == 0 or self.pipeline_stages >= 2,
              f"pipeline_stages must be 0 (off) or >= 2, got {self.pipeline_stages}")
        check(self.microbatches >= 0, f"microbatches must be >= 0, got {self.microbatches}")
        check(self.pipeline_stages or (self.pipeline_schedule == "auto" and not self.microbatches),
              "--pipeline-schedule and --microbatches are for pipeline mode: give --pipeline-stages K too")
        if self.pipeline_stages:
            m = self.microbatches or 2 * self.pipeline_stages
            check(self.batch_size % m == 0, f"batch_size {self.batch_size} must split into {m} equal microbatches "
                                            f"(--microbatches; default 2 x --pipeline-stages)")
            check(self.diagnostics_every == 0, "diagnostics are not recorded in pipeline mode (a stage sees only its "
                                               "own layers): leave --diagnostics-every at 0")
        check(self.wandb_project is None or (self.wandb_project.strip() != "" and wandb_installed()),
              "wandb_project must be a non-empty project name" if self.wandb_project is not None
              and not self.wandb_project.strip() else
              "--wandb-project needs the wandb package: pip install 'falign[wandb]' (or leave the flag out)")
        try:
            rule = get_rule(self.rule, **self.rule_options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"rule_options for {self.rule}: {err}") from None
        check(rule.supports_optimizer(self.optimizer),
              f"{rule!r} does not train under --optimizer {self.optimizer}; choose another optimizer or rule option")

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The values field ``name`` may take (a registry's names sorted)."""
        options = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"]
        return tuple(sorted(options)) if isinstance(options, dict) else tuple(options)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rule_options"] = dict(self.rule_options)
        d["hidden"] = list(self.hidden)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def rule_object(self):
        """The configured rule, with its options."""
        return get_rule(self.rule, **self.rule_options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are an error that lists them. Configs written by earlier
        versions (``wm_lr``/``wm_decay``/``wm_steps`` fields, an ``extra`` field) are read as they meant."""
        data = dict(data)
        legacy = {"wm_lr": "lr", "wm_decay": "decay", "wm_steps": "steps"}
        if any(k in data for k in legacy):
            moved = {new: data.pop(old) for old, new in legacy.items() if old in data}
            rule = RULES.get(data.get("rule"))
            if rule is not None and set(moved) <= {f.name for f in dataclasses.fields(rule.Options)}:
                data["rule_options"] = {**moved, **data.get("rule_options", {})}
        if data.get("extra") == {}:
            data.pop("extra")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})


def _field_types() -> dict[str, tuple[bool, type]]:
    """``{field: (optional, base type)}`` read off the annotations of :class:`TrainConfig`."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        text = str(f.type).replace(" ", "")
        optional = text.endswith("|None")
        text = text.removesuffix("|None")
        base = {"int": int, "float": float, "bool": bool, "str": str}.get(text)
        if base is None:
            base = tuple if text.startswith("tuple") else dict if text.startswith("dict") else None
        if base is not None:
            out[f.name] = (optional, base)
    return out


_FIELD_TYPES = _field_types()
