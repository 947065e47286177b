"""Errors the state stores raise (connection errors of redis-py pass through unchanged)."""

from __future__ import annotations

from streamlme.store.keys import KeyNameError


class StoreError(RuntimeError):
    """The store cannot do what was asked: a width mismatch, a corrupt value, a missing model."""


class StaleFenceError(StoreError):
    """A model write carried a fencing token older than one already used (a deposed leader)."""


__all__ = ["KeyNameError", "StaleFenceError", "StoreError"]
