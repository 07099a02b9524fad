"""One writer per object-store prefix: a lease made of candidate objects, since object stores have no flock.

    prefix/_lease/<token>.json   {"token", "host", "boot_id", "pid", "expires"}   one per writer that wants the prefix

A writer PUTs its own candidate, then LISTs `_lease/`: it holds the lease when no other live candidate is
there; otherwise it deletes its own and (after a short random wait, twice) gives up with a one-line refusal.
S3 lists are strongly consistent after a PUT, so of two writers the later one to list sees the earlier one's
candidate: never both hold it (both may see each other and both retreat; the retries settle that). A holder
ignores a contender's candidate, which is withdrawn as soon as its writer lists. pyarrow.fs
cannot send conditional writes (If-None-Match), which would make this one request; this needs none.

A candidate is live until it expires (a heartbeat thread renews it every TTL/4) or, on this very machine (same
host name and boot id), as long as its process exists: a writer killed with SIGKILL on this machine is replaced
at once, one on another machine after TTL seconds. Before each commit the holder checks that its candidate is
still there (`check`: only a writer that judged it dead removes it), so a writer that lost its lease (paused
past TTL) stops instead of committing.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import threading
import time

from moescope.errors import TraceError
from moescope.trace.storage import Location

LEASE_DIR = "_lease"
TTL_S = 60.0
ATTEMPTS = 3


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_live(holder: dict, now: float) -> bool:
    """A candidate still counts: not expired and, when it is this machine's, its process still runs."""
    if not isinstance(holder, dict) or not isinstance(holder.get("expires"), (int, float)) or holder["expires"] < now:
        return False
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id() and isinstance(holder.get("pid"), int):
        return _process_exists(holder["pid"])
    return True


class Lease:
    """The writer's hold on `where`; `acquire()`, then `check()` before every commit, `release()` at the end."""

    def __init__(self, where: Location, *, ttl: float = TTL_S):
        self.where, self.ttl = where, ttl
        self.token = secrets.token_hex(8)
        self.rel = f"{LEASE_DIR}/{self.token}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew_error: str | None = None

    def _put(self) -> None:
        holder = {"token": self.token, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                  "expires": round(time.time() + self.ttl)}  # whole seconds: a renewal keeps the object's size
        self.where.write_bytes(self.rel, json.dumps(holder).encode())

    def others(self) -> list[dict]:
        """Live candidates other than ours; dead ones are deleted on the way."""
        live, now = [], time.time()
        for rel in self.where.list(LEASE_DIR):
            if rel == self.rel:
                continue
            try:
                holder = self.where.read_json(rel)  # read again when torn by a renewal (storage.read_json)
            except FileNotFoundError:  # released meanwhile
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = None  # unreadable on every attempt: not a candidate any moescope writes; treated as dead
            if is_live(holder, now):
                live.append(holder)
            else:  # another writer may remove the same dead candidate first: gone either way
                self.where.delete(rel, missing_ok=True)
        return live

    def acquire(self) -> None:
        for attempt in range(ATTEMPTS):
            self._put()
            others = self.others()
            if not others:
                self._thread = threading.Thread(target=self._renew, name="moescope-lease", daemon=True)
                self._thread.start()
                return
            self.where.delete(self.rel)
            if attempt + 1 < ATTEMPTS:
                time.sleep(random.uniform(0.05, 0.3))
        holder = others[0]
        raise TraceError(f"{self.where} is being written by another moescope process ({holder.get('host')} pid "
                         f"{holder.get('pid')}); wait or use another --out")

    def check(self) -> None:
        """Raise unless this writer still holds the lease: its candidate is still listed. Other candidates may be
        there for a moment (a contender's, which sees ours and withdraws it); ours is only ever removed by a
        writer that found it expired or its process gone, and that writer may now hold the lease."""
        if self._renew_error:
            raise TraceError(f"{self.where}: the writer's lease could not be renewed ({self._renew_error}); rerun to resume")
        if self.rel not in self.where.list(LEASE_DIR):
            raise TraceError(f"{self.where}: this writer lost its lease to another moescope process; its last shard "
                             "was not committed (rerun to resume)")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._put()
            except Exception as err:  # noqa: BLE001 - reported at the next commit by check(), not lost
                self._renew_error = str(err).splitlines()[0] if str(err) else type(err).__name__
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.where.delete(self.rel, missing_ok=True)  # may have been taken away as dead by another writer
