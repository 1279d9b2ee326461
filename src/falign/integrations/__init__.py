"""Integrations with training frameworks (optional extras; the core needs only torch and numpy).

- :mod:`falign.integrations.lightning`: ``FeedbackAlignmentCallback`` for PyTorch Lightning.
"""
