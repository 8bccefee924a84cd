"""Progress of long work on stderr, told truthfully in a terminal and in a log.

A *phase* is one named step of a run (measuring options, statistics, encoding, checking the output). In a terminal it
is a transient tqdm bar. Elsewhere (a log file, a CI job, a pipe), where a bar's carriage-return animation would be
written out as hundreds of frames, it prints one line when it starts and one each time its work crosses a tenth of the
total (``encoding: 40% (12 s)``), and never the same line twice in a row. Work is counted in the units that take the
time (a tensor's elements, not the tensor), so a bar over a model whose first tensor is its largest moves as the work
does and its ETA holds.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

#: Without a terminal, a line is printed each time the work done crosses another multiple of this fraction.
LOG_STEP = 0.1


class Phase:
    """One step of a run; ``advance(amount)`` as its work is done, closed on leaving its ``with`` block."""

    def __init__(self, description: str, total: float | None = None, unit: str = "", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.description = description
        self.total = total
        self.done = 0.0
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._started = time.perf_counter()
        self._bar: tqdm | None = None
        self._last_line = ""
        self._logged_steps = 0
        if not enabled:
            return
        if self._stream.isatty():
            self._bar = tqdm(total=total, desc=description, unit=unit, unit_scale=bool(total and total > 10_000),
                             leave=False, file=self._stream,
                             bar_format=None if total else "{desc}... {elapsed}")
        else:
            self._print(f"{description}...")

    def advance(self, amount: float = 1.0, note: str = "") -> None:
        """Counts ``amount`` more work as done; ``note`` describes the latest item (shown beside the bar)."""
        self.done += amount
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(amount)
        elif self._enabled and self.total:
            steps = int(min(self.done / self.total, 1.0) / LOG_STEP + 1e-9)
            if steps > self._logged_steps:
                self._logged_steps = steps
                elapsed = time.perf_counter() - self._started
                self._print(f"{self.description}: {round(steps * LOG_STEP * 100)}% ({elapsed:.0f} s)"
                            + (f", {note}" if note else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._enabled and not self.total:
            self._print(f"{self.description}: done in {time.perf_counter() - self._started:.1f} s")
        self._enabled = False

    def _print(self, line: str) -> None:
        if line != self._last_line:
            print(line, file=self._stream, flush=True)
            self._last_line = line

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
