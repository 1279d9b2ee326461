"""A model's state carries what its rule needs to continue exactly: train k steps, save model and
optimiser with torch.save, load (weights_only=True) into a model converted with another seed and initialisation,
continue — bit-identical to the uninterrupted run, for every registered rule, in a plain loop."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import falign
from falign.rules.base import RULE_KEY, SEED_KEY


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5))


class _Sequence(nn.Module):
    """Attention + LSTM + a head on the last step: its layers see (N, T, D) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = x.reshape(x.shape[0], 8, 8)
        h = self.att(x, x, x, need_weights=False)[0]
        return self.head(self.rnn(h)[0][:, -1])


class _Encoder(nn.Module):
    """A Transformer encoder (two layers, dropout off) with a mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.encoder(x.reshape(x.shape[0], 8, 8)).mean(1))


MODELS = {"cnn": _cnn, "mlp": _mlp, "attention+lstm": _Sequence, "transformer": _Encoder}


def _step(model, opt, x, y):
    opt.zero_grad()
    if falign.uses_target(model):
        falign.set_target(model, y)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _resumed_difference(rule: str, arch, drop: tuple[str, ...] = (), weight_decay: float = 0.0, **options) -> float:
    torch.manual_seed(0)
    a = falign.convert(arch(), rule, seed=3, **options)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    falign.attach(a, opt_a)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(6)]
    for x, y in data[:3]:
        _step(a, opt_a, x, y)
    buffer = io.BytesIO()
    state = {k: v for k, v in a.state_dict().items() if not k.endswith(drop)} if drop else a.state_dict()
    torch.save({"model": state, "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)  # another initialisation and another feedback seed
    b = falign.convert(arch(), rule, seed=7, **options)
    b.load_state_dict(saved["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    opt_b.load_state_dict(saved["optimizer"])
    falign.attach(b, opt_b)
    for x, y in data[3:]:
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.dtype.is_floating_point)


CASES = [(rule, name) for rule in falign.available_rules() for name in MODELS]


@pytest.mark.parametrize("rule,model", CASES)
def test_resume_from_a_saved_state_is_bit_identical(rule, model):
    assert _resumed_difference(rule, MODELS[model]) == 0.0


@pytest.mark.parametrize("model", MODELS)
def test_kp_offset_form_resumes_bit_identical(model):
    """kp's offset form keeps a_t, its momentum part and its step count in the state (feedback_offset,
    feedback_step): a resumed run continues exactly."""
    assert _resumed_difference("kp", MODELS[model], weight_decay=0.01, form="offset") == 0.0
    # the control: a state without feedback_offset is refused (PyTorch's missing key), not resumed from a_t = 1
    if model == "mlp":
        with pytest.raises(RuntimeError, match="feedback_offset"):
            _resumed_difference("kp", MODELS[model], drop=("feedback_offset",), weight_decay=0.01, form="offset")


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).per_step])
def test_a_state_without_the_seed_loads_with_a_warning_and_then_differs(rule):
    """The negative control: an earlier falign's state (no seed key) loads, says what it could not restore, and the
    run then continues with other draws than the saved one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        difference = _resumed_difference(rule, _cnn, drop=(SEED_KEY,))
    notes = [w for w in caught if SEED_KEY in str(w.message)]
    assert notes and "earlier falign" in str(notes[0].message)
    assert difference > 1e-4


# -- falign train --resume: the same for every rule, through the command line ----------------------------
class _Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after the kill point runs (no final checkpoint, no summary)."""


def _crashed_and_reference(args: list[str], tmp_path, monkeypatch):
    """``falign train args`` run through (``ref``), and again stopped after step 40 (``crashed``)."""
    from falign.app.cli import main
    from falign.app.train import Trainer

    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main([*args, "--out", str(ref)]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "on_step_end", _kill_at(40))
        with pytest.raises(_Killed):
            main([*args, "--out", str(crashed)])
    return ref, crashed


def _kill_at(step: int):
    """A Trainer.on_step_end that stops the run after ``step`` as SIGKILL would (after that step's checkpoint)."""

    def on_step_end(trainer) -> None:
        if trainer.state.step == step:
            raise _Killed

    return on_step_end


CLI_MODELS = {"mlp": ["--hidden", "16", "--epochs", "3", "--checkpoint-every", "7"],
              "lenet": ["--model", "lenet", "--epochs", "3", "--checkpoint-every", "7", "--train-subset", "512"]}


@pytest.mark.parametrize("rule", falign.available_rules())
@pytest.mark.parametrize("model", list(CLI_MODELS))
def test_falign_train_resume_is_bit_identical(tmp_path, monkeypatch, rule, model):
    """A run killed mid-epoch (after its step-35 checkpoint, at step 40) and resumed with ``falign train --resume``
    ends with the metrics and weights of the run that was never interrupted."""
    from falign.app.cli import main
    from falign.app.train import load_checkpoint

    args = ["train", "--rule", rule, *CLI_MODELS[model], "--batch-size", "32", "--diagnostics-every", "10",
            "--no-progress"]
    ref, crashed = _crashed_and_reference(args, tmp_path, monkeypatch)
    assert load_checkpoint(crashed / "checkpoint.pt")["step"] == 35
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    assert (ref / "metrics.jsonl").read_bytes() == (crashed / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(ref / "checkpoint.pt")["model"], load_checkpoint(crashed / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (rule, k)


def test_falign_train_resume_check_fails_when_a_rule_state_is_not_restored(tmp_path, monkeypatch):
    """The negative control of the test above: brsf made to forget its redraw counter on load (the state a resume can
    lose) ends with other weights than the uninterrupted run, and the comparison sees it."""
    from falign.app.cli import main
    from falign.app.train import load_checkpoint
    from falign.rules.brsf import BatchwiseRandomSignFeedback

    args = ["train", "--rule", "brsf", *CLI_MODELS["mlp"], "--batch-size", "32", "--no-progress"]
    ref, crashed = _crashed_and_reference(args, tmp_path, monkeypatch)
    monkeypatch.setattr(BatchwiseRandomSignFeedback, "after_load", lambda self, layer: None)
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    a, b = load_checkpoint(ref / "checkpoint.pt")["model"], load_checkpoint(crashed / "checkpoint.pt")["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].dtype.is_floating_point) > 1e-4


# -- a loaded state that does not fit the model: a clear error at load, or at the first forward pass ------------
FEEDBACK_RULES = [r for r in falign.available_rules() if falign.get_rule(r).has_feedback]


@pytest.mark.parametrize("saved", FEEDBACK_RULES)
def test_a_state_of_another_rule_is_refused_at_load(saved):
    """Before the rule was in the state, 20 of the 72 ordered pairs of rules with feedback (fa/kp/usf/frsf among
    themselves, dfa/dkp/drtp, brsf/wm) loaded silently and trained one rule with the other's feedback."""
    x = torch.randn(8, 1, 8, 8)
    source = falign.convert(_mlp(), saved)
    source(x)
    state = source.state_dict()
    for rule in FEEDBACK_RULES:
        if rule == saved:
            continue
        target = falign.convert(_mlp(), rule)
        with pytest.raises(falign.LoadedStateMismatch, match=f"saved with rule '{saved}'.*uses '{rule}'"):
            target.load_state_dict(state)


def test_the_remedy_the_error_gives_takes_the_weights_and_keeps_the_own_feedback():
    x = torch.randn(8, 1, 8, 8)
    source = falign.convert(_mlp(), "fa", seed=1)
    source(x)
    target = falign.convert(_mlp(), "kp", seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items() if "feedback" in k}
    state = source.state_dict()
    result = target.load_state_dict({k: v for k, v in state.items() if "feedback" not in k}, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in before if k.endswith("feedback_weight"))
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k] if k in before else state[k]), k


def test_a_state_saved_before_the_rule_name_loads_unchecked():
    source = falign.convert(_mlp(), "fa")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(RULE_KEY)}
    target = falign.convert(_mlp(), "fa", seed=5)
    assert target.load_state_dict(state).missing_keys == []
    assert torch.equal(target[1].feedback_weight, source[1].feedback_weight)


class _PerStep(nn.Module):
    """A Linear stack on (N, T, 8) whose output keeps the T positions (dfa: D per position, (5, 8)) or flattens
    them (per sample, (5·T, 8)): the same weights, another D."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5))

    def forward(self, x):
        out = self.body(x)
        return out.flatten(1) if self.flatten else out


def test_a_loaded_direct_feedback_of_another_shape_is_refused_at_the_first_forward_pass():
    x = torch.randn(4, 6, 8)
    source = falign.convert(_PerStep(flatten=False), "dfa")
    source(x)
    assert source.body[0].feedback_weight.shape == (5, 8)
    target = falign.convert(_PerStep(flatten=True), "dfa")
    target.load_state_dict(source.state_dict())  # the same keys and weights: nothing to tell yet
    with pytest.raises(falign.LoadedStateMismatch, match=r"has shape \(5, 8\).*needs D of shape \(30, 8\)"):
        target(x)
    # the matching model takes it, and plans the mode the saved run used
    same = falign.convert(_PerStep(flatten=False), "dfa", seed=9)
    same.load_state_dict(source.state_dict())
    same(x)
    assert same.body[0].direct_mode == source.body[0].direct_mode


def test_a_direct_rules_state_with_its_d_not_yet_made_loads_and_is_planned_again():
    """A state saved before a direct rule's D existed (right after convert) loaded into a trained model: D is
    made again at the next forward pass, not used empty."""
    model = falign.convert(_mlp(), "dfa", seed=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    assert model[1].feedback_weight.numel() == 0
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    model.load_state_dict(initial)
    nn.functional.cross_entropy(model(x), y).backward()  # was: a shape error on the empty D
    assert model[1].feedback_weight.shape == (5, 64)
