"""The application around the library: the command line (:mod:`~falign.app.cli`), the trainer behind ``falign
train`` (:mod:`~falign.app.train`), pipeline stages (:mod:`~falign.app.pipeline`), the paper's experiments and
their report (:mod:`~falign.app.experiments`, :mod:`~falign.app.report`), the benchmarks (:mod:`~falign.app.bench`),
and the output folders, result tables and figures they write (:mod:`~falign.app.outdir`,
:mod:`~falign.app.results`, :mod:`~falign.app.plotting`).

The library core (``falign.convert``, ``falign.rules``, ``falign.nn``, ``falign.diagnostics``, ...) imports
nothing from here (``tests/test_import_graph.py``).
"""
