"""Keeps CPython's full garbage collections off a streaming runner's latency path, and out of the
backfill workers' time.

A scoring process holds ~0.5 million long-lived objects once torch, pyarrow, deltalake, Feast and
Great Expectations are imported and the model is loaded. CPython's oldest generation is collected
whenever the objects that survived into it grew by a quarter since the last full collection, and
each such collection walks *all* of them with the GIL held: 220-230 ms on the 2-core benchmark
machine. At 10k events/s a consumer allocates enough survivors to trigger one every ~30 s, and each
stalled the consumer and its publisher thread together (measured: batch gaps of 300-440 ms with
every step of the batch itself normal, one every 20-30 s of a 5-minute run). A backfill's Spark
Python worker holds ~460k of them: each task of ~3.3k rows triggered one full collection of ~0.3 s,
~1% of the worker's time, a loss (b) had and (a)'s tight loop did not.

``gc.freeze()`` moves every object alive now into a permanent generation that collections skip.
The consumer calls it once its start-up objects exist and again after its first batch (Great
Expectations and torch build some state lazily); a backfill worker once, after its first batch.
Objects allocated later are collected as usual.
The cost: a reference cycle among frozen objects that becomes garbage is never freed, which for
start-up state that lives as long as the process is nothing.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("sluice.heap")


def freeze(*, collect: bool) -> None:
    """Move every live object out of the collector's reach; with ``collect``, free cyclic garbage
    first (one full collection, so start-up leftovers are not frozen with the rest)."""
    started = time.perf_counter()
    if collect:
        gc.collect()
    gc.freeze()
    log.debug(
        "heap frozen",
        extra={"frozen_objects": gc.get_freeze_count(), "seconds": round(time.perf_counter() - started, 3)},
    )


def unfreeze() -> None:
    """Give frozen objects back to the collector, for a runner that stops inside a process that
    lives on (an Airflow task, a test session)."""
    gc.unfreeze()
