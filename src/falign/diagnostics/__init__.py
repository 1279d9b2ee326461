"""Diagnostics of Robertson & Koyejo (ICML 2024): alignment, the conservation law, alignment dominance.

Pure functions on tensors and models, plus :class:`DiagnosticsRecorder` used by the trainer, and the checks that
say when a run is not what it seems: scale runaway (:mod:`~falign.diagnostics.scale`), reference validity and the
effective rank of error signals (:mod:`~falign.diagnostics.reference`).
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
from falign.diagnostics.recorder import DiagnosticsRecorder, jsonable, record_scalars
from falign.diagnostics.reference import choose_reference, effective_rank
from falign.diagnostics.scale import ScaleMonitor, find_runaway, logit_scale, weight_norms

__all__ = [
    "DiagnosticsRecorder",
    "LayerPair",
    "ScaleMonitor",
    "angle",
    "backprop_gradients",
    "choose_reference",
    "conservation",
    "conservation_assumptions",
    "drift",
    "effective_rank",
    "error_signal_alignment",
    "find_pairs",
    "find_runaway",
    "gradient_alignment",
    "jsonable",
    "logit_scale",
    "loss_decomposition",
    "pair_quantities",
    "record_scalars",
    "weight_alignment",
    "weight_norms",
]
