"""Converted layers (``FALinear``, ``FAConv1d/2d/3d``) with a ``feedback_weight`` per layer."""

from falign.nn.layers import FAConv1d, FAConv2d, FAConv3d, FALinear, FeedbackLayer, TracedBackpropWarning

__all__ = ["FAConv1d", "FAConv2d", "FAConv3d", "FALinear", "FeedbackLayer", "TracedBackpropWarning"]
