"""falign.integrations.lightning.FeedbackAlignmentCallback: attach + diagnostics into Lightning's logger,
training unchanged by the measurement."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import falign

pl = pytest.importorskip("lightning.pytorch", reason="the test extra installs lightning")
from lightning.pytorch.loggers.logger import Logger  # noqa: E402

from falign.integrations.lightning import FeedbackAlignmentCallback  # noqa: E402


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


class Module(pl.LightningModule):
    def __init__(self, rule: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        self.net = falign.convert(net, rule, seed=1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(rule: str, callback: FeedbackAlignmentCallback, logger=False, precision: str = "32-true") -> Module:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Module(rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers
        torch.manual_seed(0)
        trainer = pl.Trainer(max_epochs=2, logger=logger, callbacks=[callback], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             precision=precision)
        trainer.fit(module, loader)
    return module


def test_diagnostics_reach_the_logger_every_k_steps():
    logger = MemoryLogger()
    callback = FeedbackAlignmentCallback(every=4)
    _fit("fa", callback, logger)
    logged = [(step, m) for step, m in logger.rows if any(k.startswith("falign/") for k in m)]
    assert [step for step, _ in logged] == [4, 8, 12]  # 12 steps: after optimiser steps 4, 8, 12
    names = set(logged[-1][1])
    assert {"falign/gradient_alignment/0", "falign/gradient_alignment/4", "falign/decomposition/rho",
            "falign/conservation_max_drift/0->4"} <= names
    assert 0 < logged[-1][1]["falign/gradient_alignment/0"] < 180
    assert len(callback.records) == 3 and callback.handles == []  # detached at the end


def test_the_measurement_leaves_training_unchanged():
    measured = _fit("fa", FeedbackAlignmentCallback(every=3))
    plain = _fit("fa", FeedbackAlignmentCallback(every=0))
    for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    # the control: an extra forward pass in training mode does move BatchNorm's statistics (what is restored)
    before = measured.net[1].running_mean.clone()
    measured.train()
    measured(torch.randn(16, 8))
    assert not torch.equal(before, measured.net[1].running_mean)


def test_diagnostics_under_mixed_precision():
    """Under ``precision="bf16-mixed"`` the training steps run in autocast; the callback measures after the step,
    outside autocast, in float32 at the (float32) weights, and training is still unchanged by the measurement."""
    logger = MemoryLogger()
    measured = _fit("fa", FeedbackAlignmentCallback(every=4), logger, precision="bf16-mixed")
    plain = _fit("fa", FeedbackAlignmentCallback(every=0), precision="bf16-mixed")
    for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    logged = [(step, m) for step, m in logger.rows if "falign/gradient_alignment/0" in m]
    assert [step for step, _ in logged] == [4, 8, 12]
    # the control: the bf16 run trained differently from the float32 one (autocast was on)
    fp32 = _fit("fa", FeedbackAlignmentCallback(every=0))
    assert not torch.equal(fp32.net[0].weight, measured.net[0].weight)
    # the first layer's outputs: bfloat16 in the 12 training steps, float32 in the 3 measurements
    dtypes: list[torch.dtype] = []
    original = Module.forward
    try:
        Module.forward = lambda self, x: (lambda out: dtypes.append(self.net[0](x).dtype) or out)(original(self, x))
        _fit("fa", FeedbackAlignmentCallback(every=4), precision="bf16-mixed")
    finally:
        Module.forward = original
    assert dtypes.count(torch.bfloat16) == 12 and dtypes.count(torch.float32) >= 3, dtypes


def test_per_step_work_runs_under_the_callback():
    module = _fit("brsf", FeedbackAlignmentCallback())
    assert all(int(layer.feedback_step) == 12 for layer in falign.feedback_layers(module))


def test_a_module_without_converted_layers_is_refused():
    class Plain(Module):
        def __init__(self) -> None:
            pl.LightningModule.__init__(self)
            self.net = nn.Linear(8, 3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[FeedbackAlignmentCallback()],
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8),
                                                                            torch.randint(0, 3, (8,))), batch_size=4)
        with pytest.raises(ValueError, match="no converted layer"):
            trainer.fit(Plain(), loader)
