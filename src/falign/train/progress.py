"""A progress bar: tqdm when installed (the ``experiments`` extra), else a plain line every 10%."""

from __future__ import annotations

import sys
import time
from typing import Any


class _Plain:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.next = total, desc, 0, 0.1
        self.start = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self.next:
            self.next += 0.1
            elapsed = time.perf_counter() - self.start
            print(f"{self.desc}: {self.n}/{self.total} ({elapsed:.0f}s) {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A bar with ``update``, ``set_postfix`` and ``close``."""
    if not enabled:
        return _Off()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        bar = _Plain(total, desc)
        bar.n = initial
        return bar

    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)
