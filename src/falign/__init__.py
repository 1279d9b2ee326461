"""falign: feedback-alignment-family learning rules for PyTorch, and the diagnostics of
Robertson & Koyejo, "Implicit Regularization in Feedback Alignment Learning Mechanisms for Neural
Networks" (ICML 2024, arXiv:2306.01870).

>>> import falign, torch.nn as nn
>>> model = falign.convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), rule="fa")
>>> falign.available_rules()
['bp', 'brsf', 'dfa', 'dkp', 'drtp', 'fa', 'frsf', 'kp', 'usf', 'wm']
"""

from falign import diagnostics, functional, nn, rules
from falign.convert import (
    ConversionError,
    ConversionReport,
    conversion_report,
    convert,
    feedback_layers,
    install_error_tap,
    set_target,
    unconvert,
    uses_target,
)
from falign.errors import FalignError, LoadedStateMismatch, StepWorkSkipped
from falign.rules import available_rules, get_rule
from falign.steps import TrainStep, attach, step_rules

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "ConversionReport",
    "FalignError",
    "LoadedStateMismatch",
    "StepWorkSkipped",
    "TrainStep",
    "__version__",
    "attach",
    "available_rules",
    "conversion_report",
    "convert",
    "diagnostics",
    "feedback_layers",
    "functional",
    "get_rule",
    "install_error_tap",
    "nn",
    "rules",
    "set_target",
    "step_rules",
    "unconvert",
    "uses_target",
]
