"""The CUDA checks of ``benchmarks/gpu_check.py`` as a marked test: ``pytest -m gpu`` on a machine with a GPU
(deselected by default; skipped, with the reason, where CUDA is not available). Each section must pass: every
rule's gradients on CUDA equal the CPU's, diagnostics and conservation on CUDA, ``torch.compile``, and the
converted RNN/GRU/LSTM through cuDNN's fused kernels with the rule's B."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (pytest -m gpu on a GPU)")]

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("section", ["check_devices", "check_diagnostics", "check_conservation", "check_compile",
                                     "check_fused_rnn"])
def test_gpu_check_section(section):
    result = getattr(_gpu_check(), section)()
    failed = {k: v for k, v in result.items() if isinstance(v, dict) and not v.get("ok", True)}
    assert result.get("ok", True) and not failed, failed or result
