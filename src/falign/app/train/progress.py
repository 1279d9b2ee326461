"""A progress bar: tqdm on a terminal when installed (the ``experiments`` extra), else a plain line every 10%
(also whenever standard error is not a terminal: a log file gets ten lines, not thousands of redrawn frames)."""

from __future__ import annotations

import sys
import time
from typing import Any


class _Plain:
    def __init__(self, total: float, desc: str, percent: bool = False) -> None:
        self.total, self.desc, self.n, self.next, self.percent = total, desc, 0.0, 0.1, percent
        self.start = time.perf_counter()
        self.postfix = ""

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self.next - 1e-9:
            while self.n / self.total >= self.next - 1e-9:
                self.next += 0.1
            elapsed = time.perf_counter() - self.start
            done = f"{100 * self.n / self.total:.0f}%" if self.percent else f"{self.n:g}/{self.total:g}"
            print(f"{self.desc}: {done} ({elapsed:.0f}s) {self.postfix}", file=sys.stderr, flush=True)

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


def progress_bar(total: float, desc: str, enabled: bool = True, initial: int = 0, percent: bool = False):
    """A bar with ``update``, ``set_postfix`` and ``close``. ``percent``: show the share done (not ``n/total``),
    for a total in estimated seconds of work."""
    if not enabled:
        return _Off()
    try:
        if not sys.stderr.isatty():
            raise ImportError("not a terminal")
        from tqdm.auto import tqdm
    except ImportError:
        bar = _Plain(total, desc, percent)
        bar.n = initial
        bar.next = (int(10 * initial / total) + 1) / 10 if total else 0.1
        return bar

    fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]" if percent else None
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False, bar_format=fmt)
