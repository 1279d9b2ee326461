"""Converted layers (``FALinear``, ``FAConv1d/2d/3d``, ``FAConvTranspose1d/2d/3d``), each with a
``feedback_weight``."""

from falign.nn.layers import (
    FAConv1d,
    FAConv2d,
    FAConv3d,
    FAConvTranspose1d,
    FAConvTranspose2d,
    FAConvTranspose3d,
    FALinear,
    FeedbackLayer,
    TracedBackpropWarning,
)

__all__ = ["FAConv1d", "FAConv2d", "FAConv3d", "FAConvTranspose1d", "FAConvTranspose2d", "FAConvTranspose3d",
           "FALinear", "FeedbackLayer", "TracedBackpropWarning"]
