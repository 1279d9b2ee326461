"""Base class of falign's own errors (the command line prints these as one line, without a traceback)."""


class FalignError(Exception):
    """An error about the user's input or files that falign explains in its message."""


class StepWorkSkipped(FalignError, RuntimeError):
    """A rule with per-step work (``wm``'s mirror steps, ``brsf``'s redraws) saw its layer's weights change
    without that work having run (an optimiser without :func:`falign.attach`, a write through ``.data``, new
    weights passed by ``torch.func.functional_call``)."""


class LoadedStateMismatch(FalignError, RuntimeError):
    """A state loaded into a converted model does not fit it (feedback of another shape, saved from another model,
    output size or rule)."""
