"""Progress lines of the one-shot commands (`submit`, `generate`, `demo`) on stderr.

On a terminal the line is rewritten in place; anywhere else (a log file, CI) it is printed as a plain line at
most every `every_s` seconds, so a log shows the command advancing without a line per record.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, prefix: str = "", stream: TextIO | None = None, every_s: float = 10.0):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.terminal = self.stream.isatty()
        self._last_printed = time.monotonic()  # the first periodic line comes every_s after the start

    def update(self, text: str) -> None:
        """A transient state: rewritten on a terminal, printed now and then elsewhere."""
        if self.terminal:
            print(f"\r{self.prefix}{text}\033[K", end="", file=self.stream, flush=True)
        elif time.monotonic() - self._last_printed >= self.every_s:
            self.say(text)

    def say(self, text: str) -> None:
        """A line that stays (on a terminal it replaces the rewritten one)."""
        start = "\r" if self.terminal else ""
        end = "\033[K" if self.terminal else ""
        print(f"{start}{self.prefix}{text}{end}", file=self.stream, flush=True)
        self._last_printed = time.monotonic()

    def clear(self) -> None:
        """Wipe a rewritten line before other output goes to the same terminal."""
        if self.terminal:
            print("\r\033[K", end="", file=self.stream, flush=True)
