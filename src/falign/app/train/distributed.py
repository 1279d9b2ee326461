"""Data-parallel training: the process group that ``torchrun`` sets up, or a single process.

``torchrun --nproc_per_node=N -m falign train ...`` sets ``WORLD_SIZE`` > 1: :class:`Distributed` joins
PyTorch's process group (gloo on CPU, nccl on GPU), wraps the model in ``DistributedDataParallel`` and
reduces what the trainer needs reduced. Feedback matrices are identical on every rank (they derive from
the seed; brsf's draws from the seed and the step), so nothing rule-specific is communicated.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn


class Distributed:
    """Rank, world size and collectives of this run (``world == 1``: every method is a no-op)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world = 0, 1
        self._owns_group = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if restart not in (None, "", "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # A worker restarted by torchrun --max-restarts: the agent's store still holds the addresses the
                # previous attempt's ranks published, and a rank that reads one connects to a dead process. Each
                # attempt gets its own key space.
                from datetime import timedelta

                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                      is_master=False, timeout=timedelta(minutes=10))
                dist.init_process_group(backend, store=dist.PrefixStore(f"falign/attempt_{restart}", store),
                                        rank=int(os.environ["RANK"]), world_size=world)
            else:
                dist.init_process_group(backend)
            self._owns_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training loop calls: ``DistributedDataParallel(model)`` across processes."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's slice of a global batch: sizes differ by at most one, and a rank gets none when fewer
        examples than ranks are left (the trainer weights each rank's loss by its examples)."""
        if self.world == 1:
            return x, y
        return x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a scalar over ranks (every rank then takes the same decision)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.world

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def average(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Average a dict of gradients over ranks (the diagnostics' true gradients, outside DDP)."""
        if self.world == 1:
            return grads
        import torch.distributed as dist

        for g in grads.values():
            dist.all_reduce(g)
            g.div_(self.world)
        return grads

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False
