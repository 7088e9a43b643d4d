"""The terminal a person watches: ue_dist's own lines, each once; Ray's chatter in a log file.

Ray forwards every line its workers print (Ray Train's controller reports, checkpoint notices,
the placement-group cleaner's "Failed to query ..." repeated every few seconds, C++ ``E`` lines)
to the driver's terminal, and its driver-side loggers print INFO lines of their own. With
``quiet(log_path)``:

* worker lines that ue_dist wrote (they start with ``WORKER_MARK``) reach stderr once, without
  Ray's ``(pid=...)`` prefix; repeats of the same line from the same process are dropped (Ray
  Train's workers can deliver one print twice);
* every other worker line, and the ``ray`` loggers' records, go to ``log_path`` (created on
  the first such line).

``-v`` on the command line skips all this and leaves Ray's console as Ray sets it up.
The hook used is Ray's worker-output dispatcher (``ray._private.ray_logging``), the one
``ray.init(log_to_driver=True)`` installs its printer on; it is replaced, not wrapped.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from typing import Any

from ue_dist.core.progress import PROGRESS_RE, ProgressLine

#: Start of every line ue_dist prints inside Ray workers (fit, victims): the router shows these.
WORKER_MARK = "[ue-dist"

_state: dict[str, Any] = {"log_path": None, "file": None}
_lock = threading.Lock()


def worker_print(message: str) -> None:
    """How ue_dist code inside Ray workers prints: marked, so the router shows it."""
    print(f"{WORKER_MARK}] {message}", flush=True)


def default_log_path(command: str) -> str:
    """``$UE_DIST_LOG_DIR/COMMAND-YYYYmmdd-HHMMSS-PID.log``; the folder defaults to ``logs``
    under a local ``$UE_DIST_STORAGE``, else ``./runs/logs``."""
    root = os.environ.get("UE_DIST_STORAGE", "runs")
    if "://" in root:  # run storage in a bucket: the log stays on this machine
        root = "runs"
    folder = os.environ.get("UE_DIST_LOG_DIR") or os.path.join(root, "logs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join(folder, f"{command}-{stamp}-{os.getpid()}.log"))


def _write(text: str) -> None:
    """Append to the log file, opened on the first line (commands without Ray write none)."""
    with _lock:
        if _state["file"] is None:
            os.makedirs(os.path.dirname(_state["log_path"]), exist_ok=True)
            _state["file"] = open(_state["log_path"], "a", buffering=1, encoding="utf-8")
        _state["file"].write(text if text.endswith("\n") else text + "\n")


class _FileHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:  # a log line must never break a run
            self.handleError(record)


def quiet(log_path: str) -> None:
    """From now on, Ray's console output goes to ``log_path`` (see the module docstring)."""
    with _lock:
        if _state["file"] is not None:
            _state["file"].close()  # a second command in one process starts afresh
            _state["file"] = None
        _state["log_path"] = log_path
    hush()


def log_path() -> str | None:
    """The log file, if anything was written to it."""
    return _state["log_path"] if _state["file"] is not None else None


def hush() -> None:
    """Apply quiet mode to Ray's loggers and worker output (idempotent; call again after
    ``ray.init`` and after importing ``ray.data``, which install console handlers of their own).
    A no-op unless ``quiet`` was called."""
    if _state["log_path"] is None:
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) or isinstance(old, _FileHandler):
                logger.removeHandler(old)
        handler = _FileHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    _route_worker_output()


def native_stderr_to_log() -> None:
    """Point file descriptor 2 at the log file, keeping ``sys.stderr`` on the terminal.

    Ray's C++ core worker in the driver writes its ERROR lines (``core_worker.cc ... E``)
    straight to descriptor 2, past Python's logging. Only for a real terminal stream: under a
    test runner's capture (``sys.stderr`` replaced) nothing changes. A no-op unless quiet.
    """
    if _state["log_path"] is None or _state.get("native") or sys.stderr is not sys.__stderr__:
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    _write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ue-dist: Ray's native stderr follows")
    terminal = os.dup(fd)
    os.dup2(_state["file"].fileno(), fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="replace")
    _state["native"] = True


def _route_worker_output() -> None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: leave Ray's printer in place
        return
    recent: collections.deque = collections.deque(maxlen=256)
    redrawn = {"open": False}  # a progress line is on the terminal, not yet ended by a newline

    def show(text: str) -> None:
        # on a terminal a worker's progress line replaces the previous one in place
        match = PROGRESS_RE.search(text)
        # a finished stage's last line stays, even when another stage redraws after it
        if sys.stderr.isatty() and match and match.group(1) != match.group(2):
            sys.stderr.write("\r" + text + "\x1b[K")
            redrawn["open"] = True
        else:
            sys.stderr.write(("\n" if redrawn["open"] else "") + text + "\n")
            redrawn["open"] = False
        sys.stderr.flush()

    def handle(batch: dict[str, Any]) -> None:
        pid = batch.get("pid")
        who = batch.get("actor_name") or batch.get("task_name") or ""
        for line in batch.get("lines", ()):
            text = line.rstrip("\n")
            if text.lstrip().startswith(WORKER_MARK):
                if (pid, text) in recent:
                    continue
                recent.append((pid, text))
                show(text.lstrip())
            else:
                _write(f"({who} pid={pid}) {text}")

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("ue_dist_console")
    dispatcher.add_handler("ue_dist_console", handle)


__all__ = ["ProgressLine", "WORKER_MARK", "default_log_path", "hush", "log_path", "native_stderr_to_log", "quiet",
           "worker_print"]
