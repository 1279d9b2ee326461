"""Training configuration: one dataclass, validated, saved with every run."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from falign.app.pipeline import SCHEDULES
from falign.app.train.logging import wandb_installed
from falign.convert import OUTPUT_SIGNALS
from falign.data import DATASETS
from falign.errors import FalignError
from falign.models import MODELS
from falign.models.mlp import ACTIVATIONS
from falign.rules import FEEDBACK_INITS, RULES, get_rule
from falign.seeding import MAX_SEED

BUNDLED = ("digits", "synthetic")
"""Datasets made in-process (no ``data_dir``)."""


OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("none", "step", "cosine")
LOSSES = ("ce", "mse")
DEVICES = ("auto", "cpu", "cuda")
ON_DIVERGENCE = ("stop", "skip-batch")
WEIGHT_INITS = ("torch", "xavier")


class ConfigError(FalignError, ValueError):
    """A configuration value is unknown or out of range."""


def option(default: Any = None, help: str = "", *, choices: Any = None, metavar: str | None = None,
           flag: str | None = None, factory: Any = None) -> Any:
    """A :class:`TrainConfig` field declared once: its default, the ``falign train`` flag's help (a
    ``%(default)s`` in it shows the default), ``choices`` (a tuple, or a registry whose keys are the names;
    checked by :meth:`TrainConfig.validate`, offered by the command line), and where the flag differs from the
    field's name, ``flag``. The command line is generated from these fields (:func:`falign.app.cli.add_config_flags`):
    a bool that defaults to True becomes ``--no-<name>``, a tuple a comma-separated list."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "flag": flag}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that defines a training run (``falign train`` flags are generated from these fields)."""

    rule: str = option("fa", "learning rule (default: %(default)s)", choices=RULES)
    model: str = option("mlp", "model (default: %(default)s)", choices=MODELS)
    hidden: tuple[int, ...] = option((256, 256), "hidden widths, e.g. 256,256 (mlp; default: 256,256)")
    activation: str = option("relu", "mlp activation (default: %(default)s)", choices=ACTIVATIONS)
    bias: bool = option(True, "mlp without biases")
    init_scale: float = option(1.0, "multiply initial weights (default: %(default)s)")
    weight_init: str = option("torch", "initial forward weights and biases: torch (PyTorch's layer defaults) or "
                                       "xavier (every Linear/Conv weight xavier_uniform, biases 0: BioTorch's "
                                       "feedback layers; default: %(default)s)", choices=WEIGHT_INITS)
    data: str = option("digits", "dataset (default: %(default)s)", choices=DATASETS)
    data_dir: str | None = option(None, "folder of the dataset's files (fashion-mnist default: "
                                        "/usr/share/datasets/fashion-mnist; mnist, cifar10, cifar100: required)")
    n_classes: int | None = option(None, "keep the first N classes", metavar="N")
    label_noise: float = option(0.0, "symmetric label-noise rate in [0, 1)")
    train_subset: int | None = option(None, "seeded random subset of N training examples", metavar="N")
    val_size: int = option(0, "hold N training examples out as a validation split (val_loss/val_acc per epoch; "
                              "summary.json's val_selected is the test accuracy at the best validation epoch)",
                           metavar="N")
    resize: int | None = option(None, "resize images to SIDE×SIDE by bilinear interpolation (BioTorch's "
                                      "Fashion-MNIST: 32)", metavar="SIDE")
    synthetic_classes: int = option(10, "classes of --data synthetic (default: %(default)s)")
    epochs: int = option(30, "epochs (default: %(default)s)")
    batch_size: int = option(32, "batch size (default: %(default)s)")
    drop_last: bool = option(False, "drop each epoch's last partial batch")
    optimizer: str = option("sgd", "(default: %(default)s)", choices=OPTIMIZERS)
    lr: float = option(0.01, "learning rate (default: %(default)s)")
    momentum: float = option(0.9, "SGD momentum (default: %(default)s)")
    weight_decay: float = option(0.0, "weight decay (default: %(default)s)")
    lr_schedule: str = option("none", "none, step (÷10 at --lr-milestones of the epochs) or cosine "
                                      "(default: %(default)s)", choices=LR_SCHEDULES)
    lr_milestones: tuple[float, ...] = option((0.5, 0.75), "fractions of the epochs, default 0.5,0.75")
    loss: str = option("ce", "cross-entropy or squared error on one-hot (default: %(default)s)", choices=LOSSES)
    seed: int = option(0, "seed of data order, init and feedback (default: %(default)s)")
    device: str = option("auto", "(default: %(default)s)", choices=DEVICES)
    feedback_init: str = option("kaiming_uniform", "(default: %(default)s)", choices=FEEDBACK_INITS)
    feedback_scale: float = option(1.0, "(default: %(default)s)")
    output_signal: str = option("rule", "whether the output layer's input signal uses the rule (default) or "
                                        "backprop", choices=OUTPUT_SIGNALS)
    freeze_hidden: bool = option(False, "depth-utility baseline: train only the output layer, every other layer "
                                        "frozen at its random init (compare a rule's accuracy with this run's to see "
                                        "what its hidden layers learned)")
    rule_options: dict[str, Any] = option(help="an option of the rule, repeatable (e.g. --rule wm --rule-option "
                                               "decay=0.1); `falign rules` lists each rule's options",
                                          factory=dict, flag="--rule-option", metavar="KEY=VALUE")
    diagnostics_every: int = option(0, "record alignment/conservation/loss-decomposition diagnostics every K "
                                       "steps (0: off)", metavar="K")
    scale_every: int = option(50, "record loss, logit scale and per-layer weight/activation norms every K steps "
                                  "to scale.jsonl; summary.json flags a scale runaway (default: %(default)s; 0: off)",
                              metavar="K")
    reference_check: bool = option(True, "diagnostics: skip the float64 recomputation of backprop's reference "
                                         "gradient (a float64 copy of the model per record) that marks an angle "
                                         "undefined where the reference is rounding noise")
    checkpoint_every: int = option(0, "checkpoint every K steps (0: at the end)", metavar="K")
    on_divergence: str = option("stop", "on a NaN/inf loss: stop the run (default) or skip the batch",
                                choices=ON_DIVERGENCE)
    eval_batch_size: int = option(1000, "(default: %(default)s)")
    pipeline_stages: int = option(0, "pipeline mode: cut the model into K stages, one per process (torchrun "
                                     "--nproc_per_node=K); the model must be a chain of modules (mlp, lenet); a last "
                                     "partial batch is split into as many equal microbatches as divide it (0: off)",
                                  metavar="K")
    pipeline_schedule: str = option("auto", "pipeline schedule: gpipe, 1f1b, zbv (zero-bubble) for bp and the "
                                            "layer-by-layer rules, unlocked for the direct rules (no backward "
                                            "messages between stages); auto picks unlocked for a direct rule, else "
                                            "1f1b", choices=SCHEDULES)
    microbatches: int = option(0, "microbatches per batch in pipeline mode (0: 2 x --pipeline-stages); "
                                  "--batch-size must split into M equal microbatches (a last partial batch: into as "
                                  "many as divide it)", metavar="M")
    wandb_project: str | None = option(None, "also log to Weights & Biases, project NAME (needs falign[wandb]; "
                                             "WANDB_MODE=offline logs to disk only)", metavar="NAME")

    def __post_init__(self) -> None:
        self._check_types()
        for name, (_, hint) in field_types(type(self)).items():  # a list read from JSON: the declared tuple
            if typing.get_origin(hint) is tuple:
                item = typing.get_args(hint)[0]
                setattr(self, name, tuple(item(v) for v in getattr(self, name)))
        self.validate()

    def _check_types(self) -> None:
        """Every field has its declared type (a config read from JSON may hold anything)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = field_types(type(self)).get(f.name)
            if kind is None:
                continue
            optional, hint = kind
            if value is None and optional:
                continue
            base = typing.get_origin(hint) or hint
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
        check(self.weight_init == "torch" or self.init_scale == 1.0,
              f"init_scale {self.init_scale} scales PyTorch's default init; it does not combine with weight_init "
              f"{self.weight_init!r}")
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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # JSON's lists

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


@functools.cache
def field_types(cls: type = TrainConfig) -> dict[str, tuple[bool, Any]]:
    """``{field: (optional, type)}`` from the config's resolved type hints: ``int | None`` is ``(True, int)``,
    ``tuple[int, ...]`` is ``(False, tuple[int, ...])``."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args and typing.get_origin(hint) in (types.UnionType, typing.Union)
        if optional:
            (hint,) = [a for a in args if a is not type(None)]
        out[name] = (optional, hint)
    return out

