"""Pipeline-parallel training: a sequential model cut into K stages on K processes.

``torchrun --nproc_per_node=K -m falign train --pipeline-stages K ...`` (or :class:`Pipeline` in a script
that has joined a process group of K ranks) cuts a model that is a chain of modules (``nn.Sequential``,
nested ones flattened) into stages of about equal forward cost (multiply-accumulates), each beginning with a
module that has weights (under a direct rule: a layer it converted) and not after a module whose output is a
view (e.g. ``nn.Flatten``: PyTorch's zero-bubble split cannot handle one); stage ``r`` runs on rank ``r``, each batch
is split into ``M`` microbatches and activations flow forward point to point.

Schedules:

- ``gpipe``, ``1f1b``, ``zbv`` (zero-bubble, V-shaped: ``2K`` chunks, rank ``r`` holding chunks ``r`` and
  ``2K−1−r``): PyTorch's own schedules (:mod:`torch.distributed.pipelining`), run through falign's layers,
  for ``bp`` and every rule whose signal travels layer by layer (fa, the sign rules, kp, wm): a stage's
  backward needs the signal ``g·B`` of the stage after it.
- ``unlocked``, for the direct rules (dfa, dkp, drtp): a hidden layer's input signal is ``q·D`` with ``q``
  the output error (dfa, dkp) or the target (drtp), so a stage computes the signal at its own output with
  the next stage's first layer's ``D`` (:meth:`~falign.nn.FeedbackLayer.direct_input_signal`) and needs no
  backward message. The last stage computes the error ``e_m = ∂L_m/∂output`` of microbatch ``m`` and sends it
  to every stage in one broadcast; each stage runs all its forward passes, then its backward passes as the
  errors arrive, and steps its optimiser. drtp's stages project the target, known before the forward pass:
  nothing is sent backwards at all. A stage's next forward pass waits only for its own update, so stages
  overlap across optimiser steps. dkp's ``D`` is learned: after each optimiser step a stage sends its first
  layer's ``D`` to the stage before it (one message per step).

Same updates: one :meth:`Pipeline.step` leaves in each parameter's ``.grad`` the mean over microbatches of the
microbatch gradients, as :func:`accumulate` does on one process; with the same optimiser the weights are
bit-identical to single-process training with the same microbatching (``tests/app/test_pipeline.py``).
A batch that ``M`` does not divide (a last partial batch) is split into as many equal microbatches as divide it
(:func:`split_count`; under ``1f1b`` with fewer microbatches than stages it runs GPipe's order), so the update is
still the batch's mean gradient and a pipelined run trains on every example, as a single-process run does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import falign
from falign.convert import error_tap_of
from falign.errors import FalignError
from falign.nn.layers import FeedbackLayer

SCHEDULES = ("auto", "gpipe", "1f1b", "zbv", "unlocked")
LAYER_SCHEDULES = ("gpipe", "1f1b", "zbv")
_HEADER = 8  # dims of a shape header


class PipelineError(FalignError, ValueError):
    """A model, rule or schedule that pipeline mode cannot run as asked."""


def _is_chain(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as a chain of ``(qualified name, module)``: nested ``nn.Sequential`` flattened, any other
    module one link. Raises :class:`PipelineError` for a model with its own ``forward`` (a graph the splitter
    cannot cut)."""
    if not _is_chain(model):
        raise PipelineError(
            f"pipeline mode cuts a chain of modules (nn.Sequential, nested ones included); {type(model).__name__} "
            f"has its own forward, a graph the splitter cannot cut. Express the model as nn.Sequential (falign's "
            f"mlp and lenet are) or train it on one process")

    def walk(prefix: str, module: nn.Module):
        for name, child in module.named_children():
            if _is_chain(child):
                yield from walk(f"{prefix}{name}.", child)
            else:
                yield f"{prefix}{name}", child

    return list(walk("", model))


def probe_links(links: list[tuple[str, nn.Module]], example: Tensor) -> tuple[list[float], list[bool]]:
    """One forward pass of the chain on ``example``: each link's multiply-accumulates per sample (for every module
    with a weight of two or more dimensions, ``weight.numel()`` times the output positions; deterministic, so every
    rank computes the same cut) and whether its output is a view of another tensor (``nn.Flatten``, a reshape:
    PyTorch's zero-bubble schedules cannot split the backward of a stage whose output is a view, so no cut
    follows one)."""
    costs = [0.0] * len(links)
    views = [False] * len(links)
    current = [0]

    def hook(module, inputs, output):
        w = getattr(module, "weight", None)
        if isinstance(w, Tensor) and w.dim() >= 2 and isinstance(output, Tensor) and output.dim() >= 2:
            channels = output.shape[-1] if w.dim() == 2 else output.shape[1]
            costs[current[0]] += w.numel() * output.numel() / (output.shape[0] * channels)

    handles = [m.register_forward_hook(hook) for _, link in links for m in link.modules()]
    try:
        with torch.no_grad(), falign.functional.backprop_mode():
            x = example
            for i, (_, link) in enumerate(links):
                current[0] = i
                x = link(x)
                views[i] = bool(isinstance(x, Tensor) and x._is_view())
    finally:
        for h in handles:
            h.remove()
    return [c + 1.0 for c in costs], views  # weightless links cost a little: they still run


def plan_cuts(costs: list[float], chunks: int, allowed: list[int]) -> list[int]:
    """Start index of each of ``chunks`` consecutive pieces of the chain, cut only at ``allowed`` positions,
    minimising the largest piece's cost (dynamic programming)."""
    n = len(costs)
    starts = [0, *sorted(i for i in set(allowed) if 0 < i < n)]
    if len(starts) < chunks:
        raise PipelineError(f"the model can be cut in {len(starts) - 1} places but {chunks} pieces need "
                            f"{chunks - 1}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][j]: the smallest max cost of cutting links [0, starts[j]) into k pieces
    p = len(starts)
    inf = math.inf
    best = [[inf] * (p + 1) for _ in range(chunks + 1)]
    arg = [[-1] * (p + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    bounds = [*starts, n]
    for k in range(1, chunks + 1):
        for j in range(1, p + 1):
            for i in range(j):
                if best[k - 1][i] == inf:
                    continue
                cost = max(best[k - 1][i], prefix[bounds[j]] - prefix[bounds[i]])
                if cost < best[k][j]:
                    best[k][j], arg[k][j] = cost, i
    cuts, j = [], p
    for k in range(chunks, 0, -1):
        i = arg[k][j]
        cuts.append(bounds[i])
        j = i
    return cuts[::-1]


def split_count(n: int, m: int) -> int:
    """How many equal microbatches a batch of ``n`` examples is split into when ``m`` are asked for: ``m`` where it
    divides ``n``, else the largest count below ``m`` that does (a last partial batch; at worst 1). With equal
    microbatches the mean of their mean gradients is the batch's mean gradient, so any batch gives the update of
    single-process training on it."""
    if m < 1:
        raise PipelineError(f"--microbatches must be at least 1, got {m}")
    return next(k for k in range(min(m, max(n, 1)), 0, -1) if n % k == 0)


def microbatches(t: Tensor, m: int) -> tuple[Tensor, ...]:
    """``t`` split along dimension 0 into ``m`` equal microbatches (as PyTorch's pipeline schedules split)."""
    if t.shape[0] % m:
        raise PipelineError(f"a batch of {t.shape[0]} does not split into {m} equal microbatches; choose a batch "
                            f"size divisible by --microbatches {m}")
    return torch.tensor_split(t, m)


def accumulate(model: nn.Module, x: Tensor, y: Tensor, n_microbatches: int,
               loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[Tensor]:
    """Single-process reference of one pipeline step: the mean over the microbatches (``n_microbatches``, or as
    many as divide the batch: :func:`split_count`) of each microbatch's gradient, left in ``.grad``; returns the
    microbatch outputs (detached)."""
    outputs = []
    uses_target = falign.uses_target(model)
    m = split_count(x.shape[0], n_microbatches)
    for xm, ym in zip(microbatches(x, m), microbatches(y, m)):
        if uses_target:
            falign.set_target(model, ym)
        out = model(xm)
        loss_fn(out, ym).backward()
        outputs.append(out.detach())
    _scale_grads((p for p in model.parameters()), m)
    return outputs


def _wire(t: Tensor) -> Tensor:
    """A tensor as it travels between stages: detached, contiguous, floating point in the default dtype (under
    ``torch.autocast`` a bfloat16 activation is sent as float32, which the next stage's layers cast back
    exactly), so sender and receiver always agree on the message's size."""
    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t.contiguous()


def _scale_grads(params, m: int) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.div_(m)


@dataclass
class Layout:
    """How a model is cut: the resolved schedule, the chain, each link's forward cost and each chunk's start."""

    schedule: str
    links: list[tuple[str, nn.Module]]
    costs: list[float]
    cuts: list[int]
    output_tail: tuple[int, ...]


def plan(model: nn.Module, stages: int, schedule: str = "auto", example: Tensor | None = None) -> Layout:
    """Check that ``model`` under its rule can run ``schedule`` on ``stages`` stages and cut it (no process group
    needed: every rank computes the same layout). ``example``: a few inputs (their forward pass also sizes a direct
    rule's ``D``, as :func:`falign.convert`'s probe does)."""
    if stages < 2:
        raise PipelineError(f"--pipeline-stages must be at least 2, got {stages}")
    if schedule not in SCHEDULES:
        raise PipelineError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    layers = falign.feedback_layers(model)
    direct = any(layer.rule.direct for layer in layers)
    rule = next((layer.rule for layer in layers if layer.rule.direct), layers[0].rule if layers else None)
    name = rule.name if rule is not None else "this model"
    if schedule == "auto":
        schedule = "unlocked" if direct else "1f1b"
    if schedule == "unlocked" and not direct:
        raise PipelineError(
            f"--pipeline-schedule unlocked is for the direct rules (dfa, dkp, drtp), whose hidden layers need only "
            f"the output error or the target; under {name} a stage's backward needs the signal of the stage after "
            f"it: use gpipe, 1f1b or zbv")
    if schedule != "unlocked" and direct:
        raise PipelineError(
            f"{name} sends every hidden layer the output error (or the target) directly, so its stages need no "
            f"backward messages: it trains with --pipeline-schedule unlocked (or auto), not {schedule}")
    if schedule == "zbv" and any(layer.rule.feedback_is_parameter for layer in layers):
        raise PipelineError(
            f"zbv splits each backward into an input pass and a weight pass, and that split does not give "
            f"{name}'s feedback parameter the gradient it gets in one backward (the weights drift from "
            f"single-process training within 3 steps): use gpipe or 1f1b")
    links = chain(model)
    if example is None:
        raise PipelineError("plan needs an example batch of inputs")
    example = example[:2]
    if falign.uses_target(model):
        falign.set_target(model, torch.zeros(len(example), dtype=torch.long, device=example.device))
    with torch.no_grad():  # the whole model once: direct layers size their D from its output (convert's probe)
        out = model(example)
    costs, views = probe_links(links, example)
    n_chunks = 2 * stages if schedule == "zbv" else stages
    if schedule == "unlocked":  # a stage must begin with a direct layer, whose D gives its input's signal
        allowed = [i for i, (_, m) in enumerate(links) if i > 0 and isinstance(m, FeedbackLayer) and m.rule.direct]
        where = "before a layer the direct rule converted"
    else:  # a stage begins with a module that has weights (never with a lone activation)
        allowed = [i for i, (_, m) in enumerate(links) if i > 0 and next(m.parameters(), None) is not None]
        where = "before a module with weights"
    allowed = [i for i in allowed if not views[i - 1]]
    if len(allowed) < n_chunks - 1:
        pieces = "chunks (zbv: 2 per stage)" if schedule == "zbv" else "stages"
        raise PipelineError(
            f"cannot cut {type(model).__name__} into {n_chunks} {pieces}: "
            f"it has {len(links)} modules in its chain and {len(allowed)} places to cut ({where}); use fewer "
            f"--pipeline-stages")
    return Layout(schedule, links, costs, plan_cuts(costs, n_chunks, allowed), tuple(out.shape[1:]))


class Pipeline:
    """This rank's part of a model cut into ``stages`` pipeline stages (see the module docstring).

    ``Pipeline(...)`` returns the class of its schedule: :class:`TorchSchedulePipeline` (PyTorch's GPipe, 1F1B and
    zero-bubble schedules, for bp and the layer-by-layer rules) or :class:`UnlockedPipeline` (the direct rules'
    unlocked schedule); what they share (the cut, messages, evaluation, state) is here.

    Args:
        model: a converted model (:func:`falign.convert`) that is a chain of modules; built identically on
            every rank (same seed), as ``falign train`` does. Each rank runs and trains only its stage.
        stages: number of stages = processes in the default process group.
        schedule: ``auto`` (``unlocked`` for the direct rules, ``1f1b`` otherwise), ``gpipe``, ``1f1b``,
            ``zbv`` or ``unlocked``.
        n_microbatches: microbatches per batch (default ``2·stages``).
        loss_fn: ``loss_fn(output, target)`` of one microbatch (a mean over it).
        example: a batch of inputs (a few samples) to measure the cut and shapes on.

    After :meth:`step`, the parameters of :meth:`parameters` hold the step's gradients; build the optimiser
    over them, call :func:`falign.attach` on :attr:`module`, and call :meth:`after_step` after each
    optimiser step; :meth:`close` when done.

    Example (``torchrun --nproc_per_node=2 script.py``)::

        dist.init_process_group("gloo")
        model = falign.convert(nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                                             nn.ReLU(), nn.Linear(512, 10)), "dfa", seed=0)  # same seed everywhere
        pipe = falign.app.pipeline.Pipeline(model, 2, example=x[:2])       # dfa: the unlocked schedule
        opt = torch.optim.SGD(pipe.parameters(), lr=0.01)
        falign.attach(pipe.module, opt)
        for x, y in batches:                                           # every rank iterates the same batches
            opt.zero_grad()
            loss, correct = pipe.step(x, y)                            # (None, None) except on the last stage
            opt.step()
            pipe.after_step()
        pipe.close()
    """

    _layout: Layout | None = None

    def __new__(cls, model: nn.Module, stages: int, *, schedule: str = "auto", example: Tensor,
                device: torch.device | str = "cpu", **_: Any) -> Pipeline:
        if cls is not Pipeline:
            return super().__new__(cls)
        layout = plan(model, stages, schedule, example.to(torch.device(device)))  # every check that needs no process
        kind = UnlockedPipeline if layout.schedule == "unlocked" else TorchSchedulePipeline
        obj = super().__new__(kind)
        obj._layout = layout
        return obj

    def __init__(self, model: nn.Module, stages: int, *, schedule: str = "auto", n_microbatches: int | None = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, example: Tensor,
                 device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        self.device, self.loss_fn, self.model = torch.device(device), loss_fn, model
        layout = self._layout or plan(model, stages, schedule, example.to(self.device))
        if isinstance(self, UnlockedPipeline) != (layout.schedule == "unlocked"):
            raise PipelineError(f"{type(self).__name__} does not run the {layout.schedule} schedule; Pipeline(...) "
                                f"picks the class of the schedule")
        if not dist.is_initialized():
            raise PipelineError("pipeline mode needs a process group: start it with torchrun --nproc_per_node=K")
        self.rank, world = dist.get_rank(), dist.get_world_size()
        if world != stages:
            raise PipelineError(f"--pipeline-stages {stages} runs one stage per process, but {world} processes "
                                f"were started (torchrun --nproc_per_node={stages})")
        self.stages = stages
        self.m = n_microbatches or 2 * stages
        if self.m < 1:
            raise PipelineError(f"--microbatches must be at least 1, got {self.m}")
        self.schedule_name, self.links, self.costs, self.cuts = (layout.schedule, layout.links, layout.costs,
                                                                 layout.cuts)
        self.output_tail = layout.output_tail
        self.uses_target = falign.uses_target(model)
        self.tap = error_tap_of(model)
        bounds = [*self.cuts, len(self.links)]
        self.chunks = [nn.Sequential(*[m for _, m in self.links[a:b]]) for a, b in itertools.pairwise(bounds)]
        self.chunk_names = [[n for n, _ in self.links[a:b]] for a, b in itertools.pairwise(bounds)]
        self.mine = [self.rank, 2 * stages - 1 - self.rank] if self.schedule_name == "zbv" else [self.rank]
        self.module = nn.ModuleList([self.chunks[i] for i in self.mine])
        """This rank's modules (optimise and attach these)."""
        self.bytes_sent = 0
        self._shapes: dict[tuple[int, int], torch.Size] = {}
        self._sends: list[Any] = []
        self._feedback_handle: Any = None
        self._setup()

    def _setup(self) -> None:
        """What the schedule needs before its first step."""

    def parameters(self):
        """This rank's parameters."""
        return self.module.parameters()

    @property
    def is_first(self) -> bool:
        return 0 in self.mine

    @property
    def is_last(self) -> bool:
        return len(self.chunks) - 1 in self.mine

    # -- point to point ---------------------------------------------------------------------------------
    def _send(self, t: Tensor, dst: int, header: bool) -> None:
        import torch.distributed as dist

        t = _wire(t)
        if header:
            shape = torch.zeros(_HEADER, dtype=torch.int64)
            shape[: t.dim()] = torch.tensor(t.shape)
            self._sends.append(dist.isend(shape, dst))
        self._sends.append(dist.isend(t, dst))
        self.bytes_sent += t.numel() * t.element_size()

    def _recv(self, src: int, shape: torch.Size | None, dtype: torch.dtype) -> Tensor:
        import torch.distributed as dist

        if shape is None:
            header = torch.zeros(_HEADER, dtype=torch.int64)
            dist.recv(header, src)
            shape = torch.Size([int(d) for d in header.tolist() if d > 0])
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src)
        return t

    def _wait_sends(self) -> None:
        for h in self._sends:
            h.wait()
        self._sends.clear()

    # -- training ---------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Forward and backward of one batch on this rank's stage; grads = mean over microbatches.

        Every rank passes the same ``x`` and ``y`` (the first stage reads ``x``, the last ``y``; drtp's stages
        read ``y`` too). Returns ``(mean loss, number correct)`` on the rank holding the last stage, else
        ``(None, None)``.
        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Call after each optimiser step (the unlocked schedule's dkp stages exchange their ``D`` here)."""

    @property
    def _last_rank(self) -> int:
        return self.stages - 1

    def close(self) -> None:
        """Wait for this rank's messages still in flight (call when training ends, before other communication)."""
        if self._feedback_handle is not None:
            self._feedback_handle.wait()
            self._feedback_handle = None
        self._wait_sends()

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[float, float]:
        """Mean loss and accuracy of the pipelined model on ``(x, y)`` in eval mode, on every rank."""
        import torch.distributed as dist

        loss_fn = loss_fn or self.loss_fn
        was = self.module.training
        self.module.train(False)
        total, correct = 0.0, 0
        dtype = torch.get_default_dtype()
        try:
            for i in range(0, len(y), batch_size):
                h = x[i: i + batch_size].to(self.device)
                yb = y[i: i + batch_size].to(self.device)
                for c in range(len(self.chunks)):
                    owner = self._owner(c)
                    prev = self._owner(c - 1) if c > 0 else owner
                    if owner == self.rank:
                        if prev != self.rank:
                            h = self._recv(prev, None, dtype)
                        h = self.chunks[c](h)
                        nxt = self._owner(c + 1) if c + 1 < len(self.chunks) else self.rank
                        if nxt != self.rank:
                            self._send(h, nxt, header=True)
                            self._wait_sends()
                if self.is_last:
                    total += float(loss_fn(h, yb)) * len(yb)
                    correct += int((h.argmax(-1) == yb).sum())
        finally:
            self.module.train(was)
        sums = torch.tensor([total, correct], dtype=torch.float64)
        dist.all_reduce(sums)
        return float(sums[0]) / len(y), float(sums[1]) / len(y)

    def _owner(self, chunk: int) -> int:
        if self.schedule_name == "zbv":
            return chunk if chunk < self.stages else 2 * self.stages - 1 - chunk
        return chunk

    # -- state ------------------------------------------------------------------------------------------
    def stage_state(self) -> dict[str, Tensor]:
        """This rank's entries of the model's ``state_dict`` (the full model's keys)."""
        out: dict[str, Tensor] = {}
        for i in self.mine:
            for name, link in zip(self.chunk_names[i], self.chunks[i]):
                for k, v in link.state_dict().items():
                    out[f"{name}.{k}"] = v
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Each chunk: its rank, first and last module names and forward cost share."""
        total = sum(self.costs)
        bounds = [*self.cuts, len(self.links)]
        return [{"chunk": i, "rank": self._owner(i), "modules": f"{names[0]} … {names[-1]}",
                 "cost_share": round(sum(self.costs[a:b]) / total, 3)}
                for i, (names, a, b) in enumerate(zip(self.chunk_names, bounds[:-1], bounds[1:]))]


class TorchSchedulePipeline(Pipeline):
    """Pipeline stages under PyTorch's schedules (``torch.distributed.pipelining``: GPipe, 1F1B, zero-bubble ZBV),
    built at the first step of each batch size, when the microbatch size is known. For bp and the layer-by-layer
    rules (their backward passes a gradient from stage to stage)."""

    def _setup(self) -> None:
        self._schedules: dict[int, tuple[Any, int, list[int]]] = {}

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        from torch.distributed import pipelining as pp

        n = x.shape[0]
        m = split_count(n, self.m)
        if n not in self._schedules:  # one schedule per batch size: the full batches, and a last partial one
            n_chunks = len(self.chunks)
            ex = x[: n // m].to(self.device)
            shapes = [ex]
            modes = {mod: mod.training for chunk in self.chunks for mod in chunk.modules()}
            try:  # eval mode: the shape pass moves no BatchNorm statistic and draws no dropout mask
                for chunk in self.chunks:
                    chunk.eval()
                with torch.no_grad(), falign.functional.backprop_mode():
                    for chunk in self.chunks[:-1]:
                        shapes.append(chunk(shapes[-1]))
            finally:
                for mod, mode in modes.items():
                    mod.training = mode
            stage_objs = [pp.PipelineStage(self.chunks[i], i, n_chunks, self.device, input_args=(shapes[i],))
                          for i in self.mine]
            name = self.schedule_name
            if name == "1f1b" and m < self.stages:  # 1F1B needs a microbatch per stage; GPipe's update is the same
                name = "gpipe"
            kind = {"gpipe": pp.ScheduleGPipe, "1f1b": pp.Schedule1F1B, "zbv": pp.ScheduleZBVZeroBubble}
            schedule = kind[name](stage_objs if name == "zbv" else stage_objs[0], m, loss_fn=self.loss_fn)
            self._schedules[n] = (schedule, m, [s.numel() * s.element_size() for s in shapes[1:]])
        schedule, m, boundary = self._schedules[n]
        losses: list[Tensor] = []
        args = (x.to(self.device),) if self.is_first else ()
        kwargs = {"target": y.to(self.device), "losses": losses} if self.is_last else {}
        out = schedule.step(*args, **kwargs)
        # what this rank sent: each microbatch's activations to the next chunk's rank, input gradients to the
        # previous chunk's rank (counted)
        for i in self.mine:  # messages between chunks on one rank stay in the process
            if i + 1 < len(self.chunks) and self._owner(i + 1) != self.rank:
                self.bytes_sent += boundary[i] * m
            if i > 0 and self._owner(i - 1) != self.rank:
                self.bytes_sent += boundary[i - 1] * m
        if not self.is_last:
            return None, None
        loss = torch.stack([v.detach() for v in losses]).mean()
        return loss, (out.detach().argmax(-1) == y.to(out.device)).sum()


class UnlockedPipeline(Pipeline):
    """The direct rules' unlocked schedule: every stage takes its error signal ``e D`` from the output error
    broadcast by the last stage, so no backward message travels from stage to stage."""

    def _setup(self) -> None:
        import torch.distributed as dist

        rules = {layer.rule.signal for layer in falign.feedback_layers(self.model) if layer.rule.direct}
        self.needs_error = any(s is not falign.rules.Signal.TARGET for s in rules)
        self.error_group = dist.new_group(backend="gloo" if self.device.type == "cpu" else None)
        c = self.rank
        self.next_first = self.chunks[c + 1][0] if c + 1 < len(self.chunks) else None
        first = self.chunks[c][0]
        # a learned D (dkp) changes with every step: its current value goes to the stage before after each step
        self.send_feedback = c > 0 and isinstance(first, FeedbackLayer) and first.rule.feedback_is_parameter
        self.recv_feedback = self.next_first is not None and self.next_first.rule.feedback_is_parameter

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        import torch.distributed as dist

        c = self.rank
        first, last = c == 0, c == len(self.chunks) - 1
        chunk = self.chunks[c]
        n_mb = split_count(y.shape[0], self.m)
        xs = microbatches(x, n_mb) if first else (None,) * n_mb
        ys = microbatches(y.to(self.device), n_mb)
        mb = y.shape[0] // n_mb
        records: list[tuple[Tensor, Any, Any]] = []
        errors: list[tuple[Tensor, Any]] = []
        losses, correct = [], []
        for m in range(n_mb):
            if first:
                inp = xs[m].to(self.device)
            else:
                key = (mb, c)
                inp = self._recv(c - 1, self._shapes.get(key), torch.get_default_dtype())
                self._shapes[key] = inp.shape
            if self.uses_target and self.tap is not None:
                self.tap.target = ys[m]
            if self.tap is not None:
                self.tap.begin()
            try:
                out = chunk(inp)
            except BaseException:
                if self.tap is not None:
                    self.tap.abort()
                raise
            if last:
                if self.tap is not None:
                    out = self.tap.end(out)
                loss = self.loss_fn(out, ys[m])
                if self.needs_error and self.stages > 1:
                    (e,) = torch.autograd.grad(loss, out, retain_graph=True)
                    e = _wire(e)
                    errors.append((e, dist.broadcast(e, src=self._last_rank, group=self.error_group, async_op=True)))
                    self.bytes_sent += e.numel() * e.element_size() * (self.stages - 1)
                records.append((out, loss, None))
                losses.append(loss.detach())
                correct.append((out.detach().argmax(-1) == ys[m]).sum())
            else:
                session = self.tap.close() if self.tap is not None else None
                self._send(out, c + 1, header=(mb, c + 1) not in self._shapes)
                self._shapes[(mb, c + 1)] = out.shape
                records.append((out, None, session))
                if self.needs_error:
                    e = torch.empty((mb, *self.output_tail), device=self.device)
                    errors.append((e, dist.broadcast(e, src=self._last_rank, group=self.error_group, async_op=True)))
        if self.recv_feedback and self._feedback_handle is not None:
            self._feedback_handle.wait()
            self._feedback_handle = None
        for m, (out, loss, session) in enumerate(records):
            if last:
                loss.backward()
                continue
            if self.needs_error:
                e, handle = errors[m]
                handle.wait()
                session.error = e
            out.backward(self.next_first.direct_input_signal(session, out.shape))
        for _, handle in errors if last else ():
            handle.wait()
        _scale_grads(self.parameters(), n_mb)
        self._wait_sends()
        if not last:
            return None, None
        return torch.stack(losses).mean(), torch.stack(correct).sum()

    def after_step(self) -> None:
        """dkp's stages send their first layer's new ``D`` to the stage before."""
        import torch.distributed as dist

        if self.send_feedback:
            d = self.chunks[self.rank][0].feedback_weight.detach()
            self._sends.append(dist.isend(d.contiguous(), self.rank - 1))
            self.bytes_sent += d.numel() * d.element_size()
            self._wait_sends()
        if self.recv_feedback:
            self._feedback_handle = dist.irecv(self.next_first.feedback_weight.data, self.rank + 1)
