"""``falign`` with faults injected, for the crash and resume tests (falign itself reads no fault setting).

    python tests/workers/faults.py train ...                         # in place of: python -m falign train ...
    python -m torch.distributed.run ... tests/workers/faults.py train ...

The faults come from environment variables that only this file reads:

- ``FALIGN_TEST_KILL_AT_STEP=k``: SIGKILL right after step k (and its checkpoint, if one was due);
- ``FALIGN_TEST_KILL_IN_CHECKPOINT=k``: SIGKILL inside step k's checkpoint write (its temporary file complete, not
  yet in place of ``checkpoint.pt``);
- ``FALIGN_TEST_KILL_RANK=r``: only on rank r (default: every rank).

Under ``torchrun --max-restarts`` only the first attempt is killed. They act through the trainer's extension points
(:meth:`falign.app.train.Trainer.on_step_end`, :meth:`~falign.app.train.Trainer.on_checkpoint_written`).
"""

from __future__ import annotations

import os
import signal
import sys


def _due(variable: str, trainer) -> bool:
    at = os.environ.get(variable)
    rank = os.environ.get("FALIGN_TEST_KILL_RANK")
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
    return (at is not None and int(at) == trainer.state.step and first_attempt
            and (rank is None or int(rank) == trainer.dist.rank))


def install() -> None:
    """Make every Trainer of this process kill it where the environment says."""
    from falign.app.train import Trainer

    def on_step_end(trainer) -> None:
        if _due("FALIGN_TEST_KILL_AT_STEP", trainer):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint_written(trainer) -> None:
        if _due("FALIGN_TEST_KILL_IN_CHECKPOINT", trainer):
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.on_step_end = on_step_end
    Trainer.on_checkpoint_written = on_checkpoint_written


if __name__ == "__main__":
    install()
    from falign_cli import main

    sys.exit(main(sys.argv[1:]))
