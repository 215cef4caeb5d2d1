"""Shared fixtures: real services started by the tests themselves (DESIGN.md, "Real components")."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.spark",
    "tests.fixtures.redis_server",
    "tests.fixtures.kafka_broker",
    "tests.fixtures.ctr_model",
]
