"""falign inside the rest of the PyTorch toolbox: loops it did not write (plain, PyTorch Lightning), torch.func,
unconvert and plain state dicts, numerically sound angles."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import falign
from falign.diagnostics import angle
from falign.models import MLP

DT = torch.float64
PER_STEP = [r for r in falign.available_rules() if falign.get_rule(r).per_step]


def task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    return x, (x @ torch.randn(10, 4, generator=g)).argmax(1)


def mean_angle(model) -> float:
    return sum(angle(l.weight, l.current_feedback()) for l in falign.feedback_layers(model)) / 3


def test_wm_learns_its_feedback_in_a_plain_loop_through_the_step_hook():
    torch.manual_seed(0)
    model = falign.convert(MLP([10, 32, 32, 4]), "wm", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    falign.attach(model, opt)  # the only falign call in this loop
    x, y = task()
    before = mean_angle(model)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert before > 60 and mean_angle(model) < 15


@pytest.mark.parametrize("rule", PER_STEP)
def test_per_step_rule_without_the_hook_fails_loudly(rule):
    model = falign.convert(MLP([10, 16, 4]), rule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = task()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        break
    with pytest.raises(RuntimeError, match=r"falign\.attach\(model, optimizer\)"):
        model(x)
    falign.step_rules(model)  # running the work by hand is the other way
    model(x)


def test_wm_trains_under_pytorch_lightning():
    lightning = pytest.importorskip("lightning.pytorch", reason="the test extra installs lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = falign.convert(MLP([10, 32, 32, 4]), "wm", seed=0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            falign.attach(self.net, opt)
            return opt

    torch.manual_seed(0)
    x, y = task()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    module = Module()
    before = mean_angle(module.net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and loggers
        trainer = lightning.Trainer(max_epochs=100, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(module, loader)
    assert before > 60 and mean_angle(module.net) < 15


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).feedback_is_parameter])
def test_an_optimiser_built_right_after_convert_trains_the_feedback(rule):
    """Feedback parameters made at the first forward pass (direct rules) keep the object the optimiser holds."""
    model = falign.convert(MLP([6, 8, 3]), rule, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    falign.attach(model, opt)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = None
    for _ in range(2):
        opt.zero_grad()
        if falign.uses_target(model):
            falign.set_target(model, y)
        nn.functional.cross_entropy(model(x), y).backward()
        before = model.fc2.feedback_weight.detach().clone() if before is None else before
        opt.step()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(model.fc2.feedback_weight) in held
    assert not torch.equal(model.fc2.feedback_weight.detach(), before)


@pytest.mark.parametrize("rule", falign.available_rules())
def test_torch_func_grad_and_per_example_gradients(rule):
    """``torch.func.grad`` gives the rule's gradients, and ``vmap`` of it per-example gradients whose mean is
    the batch gradient of the mean loss (the rule's, not backprop's)."""
    torch.manual_seed(0)
    model = falign.convert(MLP([6, 8, 8, 3]).to(DT), rule, seed=1, example_input=torch.randn(2, 6, dtype=DT))
    x, y = torch.randn(5, 6, dtype=DT), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in model.named_parameters() if "feedback" not in k}
    buffers = {k: v for k, v in model.named_buffers()}

    def loss(p, xb, yb):
        if falign.uses_target(model):
            falign.set_target(model, yb)
        out = torch.func.functional_call(model, {**p, **buffers}, (xb,))
        return nn.functional.cross_entropy(out, yb)

    grads = torch.func.grad(loss)(params, x, y)
    model.zero_grad()
    if falign.uses_target(model):
        falign.set_target(model, y)
    nn.functional.cross_entropy(model(x), y).backward()
    for k, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[k].grad, msg=k)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    for k, g in per_example.items():
        assert g.shape == (5, *params[k].shape)
        torch.testing.assert_close(g.mean(0), grads[k], msg=k)


def test_unconvert_gives_the_plain_model_and_plain_state_dicts_load_into_converted_ones():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = falign.convert(net, "kp", seed=0)
    x = torch.randn(5, 4)
    model(x)
    plain = falign.unconvert(model)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    assert list(plain.state_dict()) == list(net.state_dict())
    torch.testing.assert_close(plain(x), model(x))
    assert isinstance(model[0], falign.nn.FALinear)  # not in place: the converted model is untouched
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh.load_state_dict(plain.state_dict())  # exports load into the plain architecture
    torch.testing.assert_close(fresh(x), model(x))
    # a plain checkpoint into a converted model: the feedback keys are the only missing ones
    other = falign.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), "kp", seed=0)
    result = other.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["0.feedback_weight", "2.feedback_weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(other(x), net(x))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.floats(1e-6, 1e6), st.sampled_from([torch.float32, torch.float64]))
def test_angle_is_exact_at_0_and_180_degrees(seed, c, dtype):
    a = torch.randn(500, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if dtype == torch.float32:  # c·a rounded to float32 is itself off the line of a by ~1e-6°
        c = 2.0 ** round(math.log2(c))
        assert angle(a, 3 * a) < 1e-5  # (0.014° with a float32 dot product)
    assert angle(a, c * a) == pytest.approx(0.0, abs=1e-6)
    assert angle(a, -c * a) == pytest.approx(180.0, abs=1e-6)
    b = torch.randn(500, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    cos = float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))
    assert angle(a, b) == pytest.approx(math.degrees(math.acos(cos)), abs=1e-6)
    assert math.isnan(angle(a, torch.zeros_like(a)))


# -- found by an adversarial pass ----------------------------------------------------------------------------
def _steps(model, opt, x, y, n: int = 3) -> None:
    for _ in range(n):
        opt.zero_grad()
        if falign.uses_target(model):
            falign.set_target(model, y)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("rule", PER_STEP)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_attached_model_checks_its_own_per_step_work(rule, how):
    """A copy (deepcopy, torch.save of the whole model) has no step hook: trained by another optimiser without
    falign.attach it fails loudly (it used to inherit the original's hook count and skip its redraws / mirror steps
    silently); attached, it trains exactly as the original does."""
    import copy
    import io

    model = falign.convert(MLP([10, 16, 4]), rule, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)

    def duplicate():
        if how == "deepcopy":
            return copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    x, y = task()
    loose = duplicate()
    with pytest.raises(falign.StepWorkSkipped):
        _steps(loose, torch.optim.SGD(loose.parameters(), lr=0.1), x, y)
    twin = duplicate()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    falign.attach(twin, twin_opt)
    _steps(model, opt, x, y)
    _steps(twin, twin_opt, x, y)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


class _Checkpointed(nn.Module):
    """Two blocks, each run through torch.utils.checkpoint inside the model's forward (or not: mode 'plain')."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        if self.mode == "plain":
            return self.b(self.a(x))
        from torch.utils.checkpoint import checkpoint

        reentrant = self.mode == "reentrant"
        return checkpoint(self.b, checkpoint(self.a, x, use_reentrant=reentrant), use_reentrant=reentrant)


def _checkpointed_state(rule: str, mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = falign.convert(_Checkpointed(mode), rule, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    falign.attach(model, opt)
    x, y = task()
    _steps(model, opt, x.requires_grad_(mode == "reentrant"), y)  # reentrant checkpoints need an input with grad
    return model.state_dict()


@pytest.mark.parametrize("rule", falign.available_rules())
def test_activation_checkpointing_trains_exactly_as_without(rule):
    """torch.utils.checkpoint inside the model's forward: 3 SGD steps give the weights of the same model without
    checkpointing, bit for bit (use_reentrant=False for every rule; use_reentrant=True for the layer-by-layer rules).
    The direct rules under a reentrant checkpoint (whose recomputation runs in the backward pass, outside the
    model's forward) fail loudly with the remedy."""
    plain = _checkpointed_state(rule, "plain")
    modes = ["nonreentrant"] if falign.get_rule(rule).direct else ["nonreentrant", "reentrant"]
    for mode in modes:
        for (name, a), b in zip(plain.items(), _checkpointed_state(rule, mode).values()):
            assert torch.equal(a, b), (mode, name)
    if falign.get_rule(rule).direct:
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            _checkpointed_state(rule, "reentrant")
    # the control: another feedback seed is seen by the same comparison
    torch.manual_seed(0)
    other = falign.convert(_Checkpointed("plain"), rule, seed=3)
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    falign.attach(other, opt)
    _steps(other, opt, *task())
    if rule not in ("bp", "usf"):  # the two whose backward uses no random draw
        assert any(not torch.equal(a, b) for a, b in zip(plain.values(), other.state_dict().values()))


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).direct])
def test_checkpoint_sequential_under_a_direct_rule_names_the_cause(rule):
    from torch.utils.checkpoint import checkpoint_sequential

    model = falign.convert(nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)),
                           rule)
    x, y = task()
    falign.set_target(model, y)
    model(x)  # the output size is known: the failure is about the missing forward pass of the model
    falign.set_target(model, y)
    with pytest.raises(RuntimeError, match="checkpoint_sequential"):
        out = checkpoint_sequential(model, 2, x.requires_grad_(), use_reentrant=False)
        nn.functional.cross_entropy(out, y).backward()


# -- third-party models: HuggingFace transformers built from configs (no download) ----------------------------
def _bert(seed: int = 0):
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class _Logits(nn.Module):
    """What the direct rules need of a HuggingFace model: a forward that returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def _bert_state(rule: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    direct = falign.get_rule(rule).direct
    bert = _bert()
    if checkpointing:
        bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = falign.convert(_Logits(bert) if direct else bert, rule, seed=4)
    report = falign.conversion_report(model)
    linears = [n for n, m in model.named_modules() if type(m).__name__.endswith("Linear")]
    assert linears and all(r.status == "converted" for r in report.layers if r.name in linears)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    calls = []
    dense = next(m for n, m in model.named_modules() if n.endswith("layer.0.intermediate.dense"))
    dense.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 50, (6, 8), generator=g), torch.randint(0, 3, (6,), generator=g)
    for _ in range(3):
        opt.zero_grad()
        if direct:
            if falign.uses_target(model):
                falign.set_target(model, labels)
            loss = nn.functional.cross_entropy(model(ids), labels)
        else:
            loss = model(input_ids=ids, labels=labels).loss  # HuggingFace's own loss, inside the model
        loss.backward()
        opt.step()
    # recomputed in the backward pass: checkpointing is on (a direct rule's first call is probed once more)
    assert len(calls) == (6 if checkpointing else 3) + direct
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rule", falign.available_rules())
def test_a_huggingface_bert_trains_under_every_rule_with_and_without_activation_checkpointing(rule):
    plain = _bert_state(rule, checkpointing=False)
    for (name, a), b in zip(plain.items(), _bert_state(rule, checkpointing=True).values()):
        assert torch.equal(a, b), name
    untrained = _bert().state_dict()
    key = "model.classifier.weight" if falign.get_rule(rule).direct else "classifier.weight"
    assert not torch.equal(plain[key], untrained["classifier.weight"])


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).direct])
def test_a_model_returning_a_structure_is_refused_by_the_direct_rules_with_the_wrapper_to_write(rule):
    model = falign.convert(_bert(), rule)
    with pytest.raises(TypeError, match=r"SequenceClassifierOutput.*\.logits.*without labels="):
        model(input_ids=torch.randint(0, 50, (2, 8)))


def test_huggingface_conv1d_layers_are_refused_by_name():
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=16))
    with pytest.raises(falign.ConversionError, match=r"'transformer\.h\.0\.attn\.c_attn' \(Conv1D.*unsupported="):
        falign.convert(gpt2, "fa")
