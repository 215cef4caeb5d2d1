"""The Spark Structured Streaming runner as users run it (``sluice score-stream --engine spark``),
with its driver killed and restarted from the checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.demo_ad_requests import produce_ad_requests
from pipelines.dev_kafka import KafkaBroker
from tests.e2e.conftest import sluice_bin
from tests.e2e.scoring_checks import check_run_outputs, write_config
from tests.fixtures.kafka_broker import unique_topic

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def _config(tmp: Path, bootstrap: str, topic: str, model: Path, **spark: Any) -> Path:
    return write_config(
        tmp / "stream.yaml",
        kafka={"bootstrap": bootstrap, "topic": topic},
        model={"path": str(model), "device": "cpu"},
        target={"uri": str(tmp / "scores")},
        feast={"registry": str(tmp / "feast" / "registry.db")},
        spark={"master": "local[2]", "max_offsets_per_trigger": 2_000, "trigger_interval": "1 second", **spark},
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "SLUICE_LOG_FORMAT": "json", **(extra or {})}


def _run(
    config: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sluice_bin(), "score-stream", "--engine", "spark", "--config", str(config), *extra],
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_available_now_scores_everything_once(kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path) -> None:
    topic = unique_topic("ads")
    report = produce_ad_requests(
        kafka.bootstrap, topic, events=6_000, poison_fraction=0.01, seed=41, partitions=2, progress=False
    )
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact)
    done = _run(config, "--trigger", "availableNow", "--summary-json", str(tmp_path / "s.json"))
    assert done.returncode == 0, done.stderr[-4000:]
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)
    again = _run(config, "--trigger", "availableNow")  # nothing new: a no-op, not a duplicate
    assert again.returncode == 0, again.stderr[-4000:]
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)


def test_driver_crash_points_replay_exactly_once(kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path) -> None:
    """The driver dies after a micro-batch's Delta commit, then (on the replay) after its Kafka
    transaction but before Spark's checkpoint commit: the replays must write nothing twice."""
    topic = unique_topic("ads")
    report = produce_ad_requests(
        kafka.bootstrap, topic, events=4_000, poison_fraction=0.02, seed=42, partitions=2, progress=False
    )
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact)
    for point in ("stream:after_delta_commit", "stream:after_kafka_commit"):
        crashed = _run(config, "--trigger", "availableNow", env={"SLUICE_CRASH_AT": point})
        assert crashed.returncode == 137, f"{point}: {crashed.stderr[-4000:]}"
    done = _run(config, "--trigger", "availableNow")
    assert done.returncode == 0, done.stderr[-4000:]
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)


def test_driver_sigkilled_repeatedly_then_restarted_from_the_checkpoint(
    kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path
) -> None:
    topic = unique_topic("ads")
    report = produce_ad_requests(
        kafka.bootstrap, topic, events=20_000, poison_fraction=0.01, seed=43, partitions=2, progress=False
    )
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, max_offsets_per_trigger=1_000)
    rng = random.Random(9)
    for _ in range(4):
        proc = subprocess.Popen(
            [sluice_bin(), "score-stream", "--engine", "spark", "--config", str(config)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the driver and its JVM, killed together like a lost node
        )
        time.sleep(rng.uniform(15, 35))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _run(config, "--trigger", "availableNow")
    assert done.returncode == 0, done.stderr[-4000:]
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)
