"""One model per worker process (invariant 4).

Spark reuses Python workers across tasks and Beam reuses DoFns across bundles; a module-level
cache keyed by everything that changes the loaded weights means the first batch pays for the load
and every later one on that process reuses it. A lock keeps two threads of one process (Spark's
prefetch, Beam's thread pool) from loading twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_models: dict[Hashable, object] = {}
_loads = 0


def shared(key: Hashable, load: Callable[[], T]) -> T:
    """Return the object cached under ``key``, loading it once per process."""
    global _loads
    with _lock:
        if key not in _models:
            _models[key] = load()
            _loads += 1
        return _models[key]  # type: ignore[return-value]


def load_count() -> int:
    """How many loads this process has done (tests assert it stays at one)."""
    return _loads


def clear() -> None:
    with _lock:
        _models.clear()
