"""Named places where a test can make the process die as if SIGKILLed.

Exactly-once claims are only worth what the crash tests behind them are worth (DESIGN.md). Each
runner calls :func:`crash_point` at the moments that matter (after the read, mid inference,
between the Delta commit and the online-store write...). When ``SLUICE_CRASH_AT`` names the point
the process ends with ``os._exit`` — no finally blocks, no flushing, like a kill -9. Unset, a
crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

ENV = "SLUICE_CRASH_AT"
EXIT_CODE = 137

POINTS = (
    "after_read",
    "mid_inference",
    "after_quarantine_commit",
    "before_delta_commit",
    "after_delta_commit",
    "after_online_write",
    # the consumer runner, in the order of one micro-batch
    "consume:after_read",
    "consume:between_quarantine_and_scores_commits",
    "consume:after_delta_commit",
    "consume:after_online_write",
    "consume:before_kafka_commit",
    "consume:after_kafka_commit",
    # the Spark stream runner: in a task, then on the driver in foreachBatch
    "stream:mid_scoring",
    "stream:after_scoring",
    "stream:after_delta_commit",
    "stream:after_online_write",
    "stream:after_kafka_commit",
)


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        sys.stderr.write(f"sluice: crash point {name} reached, exiting {EXIT_CODE}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
