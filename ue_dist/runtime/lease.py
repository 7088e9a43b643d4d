"""A lease on an output prefix: one protect run writes a DST at a time.

Two runs into one DST would both redo every shard, the later one's bytes silently winning, and
the second run's start-up would delete the first run's in-flight temporary files. The lease is a
small JSON object ``DST/_lease.json`` naming its owner (host, pid, a random id), when it was
taken, its last heartbeat and when it expires. It is created with a conditional write, so of two
runs exactly one gets it: local files with ``O_EXCL`` (``open(..., "xb")``), S3 with
``If-None-Match: *`` (s3fs's ``mode="create"``). The holder renews it from a background thread
every ``ttl / 4`` seconds; a lease whose expiry has passed, or whose owner is a process of this
host that no longer exists (a run killed with ``kill -9``), is taken over.

A second run waits up to ``wait_s`` for the lease and then refuses with the owner named. The
holder checks before each commit that the lease is still its own (``check``): a run paused past
its expiry whose lease was taken over stops instead of writing beside the new owner.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Mapping

from ue_dist.data import storage
from ue_dist.errors import UserError

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 60.0


class LeaseError(UserError, RuntimeError):
    """The output prefix is held by another run, or this run lost its lease."""


def lease_url(dst_url: str) -> str:
    return storage.join(dst_url, LEASE_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(lease: Mapping[str, Any], now: float) -> str:
    return (f"run {lease.get('owner', '?')[:8]} (host {lease.get('host')}, pid {lease.get('pid')}, "
            f"{lease.get('purpose', 'protect')}), last heartbeat "
            f"{max(0.0, now - float(lease.get('heartbeat', 0))):.0f} s ago, expires in "
            f"{max(0.0, float(lease.get('expires', 0)) - now):.0f} s")


class Lease:
    """``with Lease(dst).acquired(wait_s=0): ...`` holds DST's lease for the block."""

    def __init__(self, dst_url: str, storage_options: Mapping[str, Any] | None = None, *,
                 ttl_s: float = DEFAULT_TTL_S, purpose: str = "protect",
                 clock: Callable[[], float] = time.time) -> None:
        if not ttl_s > 0:
            raise LeaseError(f"lease ttl must be > 0 seconds, got {ttl_s}")
        self.url, self.storage_options = lease_url(dst_url), storage_options
        self.dst_url, self.ttl_s, self.purpose, self.clock = dst_url, float(ttl_s), purpose, clock
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the object ---------------------------------------------------------------------------------
    def _body(self, taken: float) -> bytes:
        now = self.clock()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "purpose": self.purpose, "taken": taken, "heartbeat": now,
                           "expires": now + self.ttl_s}, sort_keys=True).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = storage.read_bytes(self.url, self.storage_options)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(raw)
        except ValueError:
            return {}  # a torn or foreign object: expired by definition
        return lease if isinstance(lease, dict) else {}

    def _create(self) -> bool:
        """Conditional create: True when this call made the object."""
        fs, path = storage.get_fs(self.url, self.storage_options)
        parent = path.rsplit("/", 1)[0]
        if parent and storage.protocol_of(self.url) not in storage.OBJECT_STORES:
            fs.makedirs(parent, exist_ok=True)  # (s3fs's makedirs would create a missing bucket)
        try:
            fs.pipe_file(path, self._body(self.clock()), mode="create")
        except FileExistsError:
            return False
        return True

    def _expired(self, lease: Mapping[str, Any], now: float) -> bool:
        if not lease or float(lease.get("expires", 0)) <= now:
            return True
        same_host = lease.get("host") == socket.gethostname()
        pid = lease.get("pid")
        return same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)

    # acquire / renew / release ----------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0,
                say: Callable[[str], None] | None = None) -> None:
        say = say or (lambda message: None)
        deadline = self.clock() + max(0.0, float(wait_s))
        waiting_said = False
        while True:
            if self._create():
                current = self._read()
                if current and current.get("owner") == self.owner:
                    self._start_heartbeat()
                    return
                continue  # taken over between our create and read: look again
            current = self._read()
            now = self.clock()
            if current is None:
                continue  # released between our create and read
            if self._expired(current, now):
                say(f"[lease] taking over the expired lease of {self.dst_url}: "
                    f"{_describe(current, now)}")
                self._remove_if(current)
                continue
            if now >= deadline:
                raise LeaseError(
                    f"{self.dst_url!r} is being written by another {_describe(current, now)}; "
                    f"wait for it to finish, pass --wait-for-lease SECONDS, or write to another "
                    f"prefix (if that run is dead, its lease expires by itself; {self.url})")
            if not waiting_said:
                say(f"[lease] {self.dst_url} is held by {_describe(current, now)}; waiting up to "
                    f"{max(0.0, deadline - now):.0f} s")
                waiting_said = True
            time.sleep(max(0.05, min(poll_s, deadline - now)))

    def _remove_if(self, seen: Mapping[str, Any]) -> None:
        """Delete the lease object if it is still the one we saw (best effort on object stores)."""
        current = self._read()
        if current is not None and current.get("owner") == seen.get("owner"):
            fs, path = storage.get_fs(self.url, self.storage_options)
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def renew(self) -> None:
        current = self._read()
        if not current or current.get("owner") != self.owner:
            self.lost = (f"the lease on {self.dst_url!r} was taken over by "
                         f"{_describe(current or {}, self.clock())}")
            return
        storage.write_bytes(self.url, self._body(float(current.get("taken", self.clock()))),
                            self.storage_options)

    def check(self) -> None:
        """Raise ``LeaseError`` once the heartbeat found the lease taken over."""
        if self.lost:
            raise LeaseError(f"{self.lost}; this run stops so that only one run writes a prefix")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
        current = self._read()
        if current and current.get("owner") == self.owner:
            self._remove_if(current)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except Exception:  # a missed beat (store briefly unreachable) is survivable
                    continue       # until expiry; the next beat tries again
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name="ue-dist-lease", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["Lease", "LeaseError", "LEASE_FILE", "DEFAULT_TTL_S", "lease_url"]
