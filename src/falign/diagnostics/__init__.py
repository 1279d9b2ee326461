"""Diagnostics of Robertson & Koyejo (ICML 2024): alignment, the conservation law, alignment dominance.

Pure functions on tensors and models, plus :class:`DiagnosticsRecorder` used by the trainer.
Definitions follow ``DESIGN.md`` §2 exactly: angles in degrees, zero norm → undefined (``nan``).
"""

from falign.diagnostics.alignment import (
    backprop_gradients,
    error_signal_alignment,
    gradient_alignment,
    weight_alignment,
)
from falign.diagnostics.angles import angle
from falign.diagnostics.decomposition import loss_decomposition
from falign.diagnostics.law import (
    LayerPair,
    conservation,
    conservation_assumptions,
    drift,
    find_pairs,
    pair_quantities,
)
from falign.diagnostics.recorder import DiagnosticsRecorder, jsonable

__all__ = [
    "DiagnosticsRecorder",
    "LayerPair",
    "angle",
    "backprop_gradients",
    "conservation",
    "conservation_assumptions",
    "drift",
    "error_signal_alignment",
    "find_pairs",
    "gradient_alignment",
    "jsonable",
    "loss_decomposition",
    "pair_quantities",
    "weight_alignment",
]
