"""A converted model compiles with torch.compile and trains to the same gradients as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falign
from falign.models import MLP


def compiled_vs_eager(rule: str, backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = MLP([20, 16, 16, 5])
    eager = falign.convert(base, rule, seed=0)
    inner = falign.convert(base, rule, seed=0)
    compiled = torch.compile(inner, backend=backend)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(inner.parameters(), lr=0.1)
    falign.attach(eager, opt_e)
    falign.attach(inner, opt_c)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # a few training steps: the compiled model follows the eager one
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            torch.manual_seed(step)  # per-step work that draws noise (wm) draws the same for both
            if falign.uses_target(inner):
                falign.set_target(model, y)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(eager.state_dict().values(), inner.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", falign.available_rules())
def test_compile_traces_the_feedback_functions(rule):
    compiled_vs_eager(rule, "aot_eager")  # dynamo + AOTAutograd tracing of the custom autograd functions


@pytest.mark.slow
@pytest.mark.parametrize("rule", falign.available_rules())
def test_compile_with_inductor(rule):
    compiled_vs_eager(rule, "inductor")


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if not falign.get_rule(r).direct])
def test_layer_by_layer_rules_compile_as_one_graph(rule):
    """No graph break: the sign rules build B from the forward's W inside the graph when compiling (the direct
    rules' per-forward error session is outside any graph; they compile with one break per layer)."""
    from falign.models import LeNet5

    torch._dynamo.reset()
    torch.manual_seed(0)
    for build, shape in ((lambda: MLP([20, 16, 16, 5]), (20,)), (lambda: LeNet5(1, 5, 28), (1, 28, 28))):
        model = falign.convert(build(), rule, example_input=torch.randn(2, *shape))
        x, y = torch.randn(8, *shape), torch.randint(0, 5, (8,))
        explanation = torch._dynamo.explain(lambda inp, m=model, t=y: nn.functional.cross_entropy(m(inp), t))(x)
        assert explanation.graph_break_count == 0, (rule, explanation.break_reasons)
