"""The refresh leader's lease: one writer of model versions at a time, fenced by a token.

A `Lease` wraps a store's lease primitives (`RedisStore` keeps the lease in Redis, one Lua
script per operation; `MemoryStore` keeps it in the process). Acquiring hands out a **fencing
token** that grows with every acquisition; the writer passes it to ``store.put_model(record,
fence=token)``, and the store refuses the write unless the lease is held with that very token at
that moment. So a refresher that stalled past its lease (a long GC pause, a frozen VM) cannot
write a model, whether or not another refresher has taken over meanwhile.

A second refresher calls `Lease.acquire` and polls, with growing back-off, until the lease is
free; `Lease.keep_alive` renews it from a background thread while the holder works.

>>> from streamlme.store import MemoryStore
>>> store = MemoryStore()
>>> first, second = Lease(store, ttl=5.0), Lease(store, ttl=5.0)
>>> first.try_acquire(), second.try_acquire()
(True, False)
>>> first.token, second.acquire(timeout=0.1)
(1, None)
>>> first.release(); second.acquire(timeout=0.1)
2
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Protocol

log = logging.getLogger(__name__)

#: Default lease time: long enough to ride out a slow Redis reply, short enough to fail over.
DEFAULT_TTL = 30.0


class LeaseStore(Protocol):
    """What a store offers for the lease (`RedisStore` and `MemoryStore` both do)."""

    def acquire_lease(self, owner: str, ttl: float) -> int | None: ...

    def renew_lease(self, owner: str, token: int, ttl: float) -> bool: ...

    def release_lease(self, owner: str, token: int) -> bool: ...

    def lease_holder(self) -> tuple[str, int, float] | None: ...


def default_owner() -> str:
    """A name unique to this lease holder, readable in ``redis-cli``: host, pid, random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """A leader lease on one store.

    Parameters
    ----------
    store
        A store with the lease primitives (see `LeaseStore`).
    ttl
        Seconds the lease lasts without renewal.
    owner
        This holder's name (default: host, pid and a random tag); no ``|`` in it.
    """

    def __init__(self, store: LeaseStore, ttl: float = DEFAULT_TTL, owner: str | None = None
                 ) -> None:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.owner = default_owner() if owner is None else owner
        if "|" in self.owner or not self.owner:
            raise ValueError(f"lease owner {self.owner!r} must be non-empty and without '|'")
        self.store = store
        self.ttl = float(ttl)
        self.token: int | None = None
        self.lost = threading.Event()
        self._keeper: threading.Thread | None = None
        self._stop_keeper = threading.Event()

    def __repr__(self) -> str:
        return f"Lease(owner={self.owner!r}, token={self.token}, ttl={self.ttl:g})"

    @property
    def held(self) -> bool:
        """True while this process believes it holds the lease (the store has the last word)."""
        return self.token is not None and not self.lost.is_set()

    def try_acquire(self) -> bool:
        """Take the lease if it is free, once, without waiting."""
        token = self.store.acquire_lease(self.owner, self.ttl)
        if token is None:
            return False
        self.token = token
        self.lost.clear()
        return True

    def acquire(self, timeout: float | None = None, stop: threading.Event | None = None,
                first_wait: float = 0.05, max_wait: float | None = None) -> int | None:
        """Wait for the lease (polling with growing, jittered back-off); its token.

        None when ``timeout`` seconds passed or ``stop`` was set first. The back-off doubles from
        ``first_wait`` up to ``max_wait`` (default: a tenth of the ttl, at most 2 s), so a
        waiting refresher notices a released or expired lease quickly without hammering Redis.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        stop = threading.Event() if stop is None else stop
        wait = first_wait
        cap = min(self.ttl / 10, 2.0) if max_wait is None else max_wait
        logged = False
        while not self.try_acquire():
            if not logged:
                holder = self.store.lease_holder()
                if holder is not None:
                    log.info("waiting for the refresh lease, held by %s (token %d, %.1fs left)",
                             *holder)
                logged = True
            pause = wait * random.uniform(0.5, 1.0)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                pause = min(pause, left)
            if stop.wait(pause):
                return None
            wait = min(wait * 2, max(cap, first_wait))
        return self.token

    def renew(self) -> bool:
        """Extend the lease by ``ttl`` from now; False (and `lost` set) if it is no longer ours."""
        if self.token is None:
            return False
        if self.store.renew_lease(self.owner, self.token, self.ttl):
            return True
        self.lost.set()
        return False

    def keep_alive(self, every: float | None = None) -> None:
        """Renew from a daemon thread every ``every`` seconds (default ttl / 3) until released.

        If a renewal finds the lease gone, `lost` is set and the thread stops: the holder's next
        fenced write would be refused anyway, the flag just says so early.
        """
        if self.token is None:
            raise RuntimeError("keep_alive needs the lease; acquire it first")
        if self._keeper is not None and self._keeper.is_alive():
            return
        period = self.ttl / 3 if every is None else every
        self._stop_keeper.clear()

        def run() -> None:
            while not self._stop_keeper.wait(period):
                try:
                    if not self.renew():
                        log.warning("refresh lease (token %s) lost: it expired or was taken",
                                    self.token)
                        return
                except Exception:  # a lost connection: keep trying while the ttl lasts
                    log.warning("could not renew the refresh lease; retrying", exc_info=True)

        self._keeper = threading.Thread(target=run, name="streamlme-lease", daemon=True)
        self._keeper.start()

    def release(self) -> None:
        """Stop renewing and give the lease up (a no-op if it is not ours any more)."""
        self._stop_keeper.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        if self.token is not None:
            try:
                self.store.release_lease(self.owner, self.token)
            except Exception:  # best effort: the ttl frees it anyway
                log.warning("could not release the refresh lease; it expires within %gs",
                            self.ttl, exc_info=True)
            finally:
                self.token = None

    def __enter__(self) -> Lease:
        self.acquire()
        self.keep_alive()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
