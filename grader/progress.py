"""Progress of long work, for a person at a terminal and for a log.

On a terminal, a tqdm bar with its total, rate and ETA. Anywhere else (CI, nohup, a pipe,
Gradescope's log) one timestamped plain line per finished step, with the count, the time
so far and an estimate of the time left, flushed at once, so a log never stays silent for
the length of a grading. Nothing here knows what is being counted.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TextIO


def clock() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """``total`` steps of ``unit`` (an upper bound is fine: ``close`` ends the bar where it is).

    ``step(text)`` marks one step finished; ``note(text)`` prints a line without counting.
    """

    def __init__(self, desc: str, total: int, unit: str, stream: TextIO | None = None,
                 announce: str = ""):
        self.desc, self.total, self.unit = desc, max(0, total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self.bar = None
        if _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=True)
        if announce:
            self.note(announce)

    def step(self, text: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=False)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.started
        total = max(self.total, self.done)
        left = (f", about {duration(elapsed / self.done * (total - self.done))} left"
                if total > self.done else "")
        self._line(f"[{self.done}/{total} {self.unit}s] {text}"
                   f"{' ' if text else ''}({duration(elapsed)} so far{left})")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self._line(text)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.total != self.bar.n:  # fewer steps than the upper bound: end at 100 %
                self.bar.total = self.bar.n
                self.bar.refresh()
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _line(self, text: str) -> None:
        print(f"{clock()} {self.desc}: {text}", file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False
