"""Progress of one long stage (fit steps, victim epochs, shards, sweep trials) as one line.

Ray-free, so methods and victims can show it through their context's ``log``. On a terminal
the line is redrawn in place; anywhere else (a log file, a captured run, a Ray worker whose
lines the driver forwards) a line is printed each time another ``1/lines`` of the total is
done, and at the end: a 60-shard protection prints about 10 lines, not 60. The driver's
console (``ue_dist.runtime.console``) recognises forwarded progress lines by ``PROGRESS_RE``
and redraws those in place too when its stderr is a terminal.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Any, Callable

#: A progress line: ``LABEL [####....] DONE/TOTAL ...`` (the bar is 20 characters).
PROGRESS_RE = re.compile(r"\[[#.]{20}\] (\d+)/(\d+)")


def to_stderr(message: str) -> None:
    """How commands print their progress: on stderr, so stdout stays for results (``--json``)."""
    print(message, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """done/total, a bar, the stage's own figures (a loss, a rate) and the ETA.

    ``say`` prints one line; ``lines`` is how many lines at most a non-terminal run prints;
    ``tty`` redraws in place on stderr (default: when ``say`` is ``print`` or ``to_stderr`` and
    stderr is a terminal).
    """

    def __init__(self, label: str, total: int, say: Callable[[str], Any] = print,
                 lines: int = 10, tty: bool | None = None) -> None:
        self.label, self.total, self.say = label, max(1, int(total)), say
        self.lines = max(1, int(lines))
        self.tty = (say in (print, to_stderr) and sys.stderr.isatty()) if tty is None else tty
        self.started = time.perf_counter()
        self._shown = 0  # parts of ``lines`` already printed
        self._first: int | None = None  # ``done`` at the first update (a resumed stage)

    def text(self, done: int, figures: str = "") -> str:
        frac = min(1.0, done / self.total)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        elapsed = time.perf_counter() - self.started
        # the rate counts only what this process did: a resumed stage starts part-way
        fresh = done - (self._first if self._first is not None else 0)
        eta = elapsed / fresh * (self.total - done) if fresh > 0 else None
        tail = f"{clock(elapsed)} elapsed" if done >= self.total or eta is None else f"ETA {clock(eta)}"
        return f"{self.label} [{bar}] {done}/{self.total}" + (f" · {figures}" if figures else "") \
            + f" · {tail}"

    def start(self, done: int) -> None:
        """Where a resumed stage starts (so its ETA counts only new work)."""
        self._first = done
        self._shown = int(self.lines * done / self.total)

    def update(self, done: int, figures: str = "") -> None:
        if self._first is None:
            self._first = 0
        line = self.text(done, figures)
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if done >= self.total else ""))
            sys.stderr.flush()
            return
        part = int(self.lines * done / self.total)
        if part > self._shown or done >= self.total:
            self._shown = part
            self.say(line)

    def note(self, message: str) -> None:
        """A line of its own (a skipped shard, an early stop) without breaking a redrawn bar."""
        self.say(("\n" if self.tty else "") + message)


__all__ = ["PROGRESS_RE", "ProgressLine", "clock", "to_stderr"]
