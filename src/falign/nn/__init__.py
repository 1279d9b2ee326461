"""Converted layers (``FALinear``, ``FAConv1d/2d/3d``, ``FAConvTranspose1d/2d/3d``), each with a
``feedback_weight``, and converted containers (``FAMultiheadAttention``, ``FARNN``, ``FAGRU``, ``FALSTM``),
which keep their parameters and hold one :class:`FeedbackView` per transported weight."""

from falign.nn.attention import FAMultiheadAttention
from falign.nn.containers import FeedbackContainer, FeedbackView
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
from falign.nn.recurrent import FAGRU, FALSTM, FARNN

__all__ = ["FAGRU", "FALSTM", "FARNN", "FAConv1d", "FAConv2d", "FAConv3d", "FAConvTranspose1d", "FAConvTranspose2d",
           "FAConvTranspose3d", "FALinear", "FAMultiheadAttention", "FeedbackContainer", "FeedbackLayer",
           "FeedbackView", "TracedBackpropWarning"]
