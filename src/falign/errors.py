"""Base class of falign's own errors (the command line prints these as one line, without a traceback)."""


class FalignError(Exception):
    """An error about the user's input or files that falign explains in its message."""
