"""falign.integrations.huggingface.FeedbackAlignmentCallback: a converted HuggingFace model trained by
transformers.Trainer keeps its rule's per-step work and logs weight–feedback angles."""

from __future__ import annotations

import warnings

import pytest
import torch

import falign

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
pytest.importorskip("accelerate", reason="the test extra installs accelerate (transformers.Trainer needs it)")

from falign.integrations.huggingface import FeedbackAlignmentCallback  # noqa: E402


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(0, 50, (48, 8), generator=g), torch.randint(0, 3, (48,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class _Reporter(transformers.TrainerCallback):
    """Stands for a report_to integration: the Trainer puts those before the callbacks it is given."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.rows.append(dict(logs))


def _train(rule: str, tmp_path, callbacks, install: bool = False) -> tuple[torch.nn.Module, list[dict]]:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = falign.convert(transformers.BertForSequenceClassification(config), rule, seed=1)
    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                                          logging_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)
    if install:
        FeedbackAlignmentCallback.install(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, trainer.state.log_history


@pytest.mark.parametrize("rule", ["brsf", "wm"])
def test_the_trainer_runs_the_per_step_work_with_the_callback_and_stops_without(rule, tmp_path):
    reporter = _Reporter()
    model, logs = _train(rule, tmp_path, [reporter], install=True)
    steps = {int(layer.feedback_step) for layer in falign.feedback_layers(model)}
    assert steps == {6}  # every layer's work ran after each of the 6 optimiser steps
    logged = [row for row in logs if "loss" in row]
    assert len(logged) == 3
    angles = {k: v for k, v in logged[-1].items() if k.startswith("falign/weight_alignment/")}
    assert "falign/weight_alignment/classifier" in angles and all(0 <= v <= 180 for v in angles.values())
    assert [set(row) >= set(angles) for row in reporter.rows if "loss" in row] == [True] * 3  # reporters see them
    with pytest.raises(falign.StepWorkSkipped):  # the negative control: the same Trainer without the callback
        _train(rule, tmp_path, [])


def test_kp_trains_under_the_trainers_adamw(tmp_path):
    torch.manual_seed(0)
    untrained = falign.convert(transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3)), "kp", seed=1)
    model, _ = _train("kp", tmp_path, [FeedbackAlignmentCallback()])
    assert not torch.equal(model.classifier.feedback_weight, untrained.classifier.feedback_weight)  # B trained


def test_a_reporter_ahead_of_the_callback_misses_its_values_hence_install(tmp_path):
    """Why install() exists: given in callbacks= after a reporter (where the Trainer puts its report_to
    integrations), the callback's values reach the history but not the reporter."""
    reporter = _Reporter()
    _, logs = _train("fa", tmp_path, [reporter, FeedbackAlignmentCallback()])
    assert any(k.startswith("falign/") for row in logs for k in row)
    assert not any(k.startswith("falign/") for row in reporter.rows for k in row)
