"""The consumer runner as users run it (``sluice consume``), killed over and over.

Kafka's and Flink's own system tests prove exactly-once this way (DESIGN.md): crash the process at
named points and at random moments while data flows, restart it, and check that the sinks hold
every valid event once and every poison message once in the dead-letter — by count, by id and by
per-user sequence number.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.demo_ad_requests import ProduceReport, produce_ad_requests
from pipelines.dev_kafka import KafkaBroker
from tests.e2e.conftest import sluice_bin
from tests.e2e.scoring_checks import check_run_outputs, write_config
from tests.fixtures.kafka_broker import unique_topic
from transforms.kafka_admin import ensure_topics

pytestmark = pytest.mark.slow

PARTITIONS = 4


def _config(
    tmp: Path,
    bootstrap: str,
    topic: str,
    model: Path,
    redis: str | None,
    *,
    compact_every_s: float = 600,
    kafka: dict[str, Any] | None = None,
    **batching: Any,
) -> Path:
    feast: dict[str, Any] = {"registry": str(tmp / "feast" / "registry.db")}
    if redis:
        feast["online_store"] = {"type": "redis", "connection_string": redis}
    return write_config(
        tmp / "consume.yaml",
        kafka={"bootstrap": bootstrap, "topic": topic, "group": f"g-{topic}", **(kafka or {})},
        model={"path": str(model), "device": "cpu"},
        target={"uri": str(tmp / "scores"), "compact_every_s": compact_every_s},
        feast=feast,
        batching={"max_records": 2_000, "max_wait_ms": 100, **batching},
    )


def _start(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sluice_bin(), "consume", "--config", str(config), *extra],
        env={**os.environ, "SLUICE_LOG_FORMAT": "json", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_log(proc: subprocess.Popen[str], text: str, timeout: float = 120) -> None:
    """Read the process's log lines until one contains ``text`` (its stderr keeps draining after)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"consumer ended before logging {text!r}: {''.join(seen[-20:])}")
        seen.append(line)
        if text in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # never block it on a full pipe
            return
    pytest.fail(f"consumer did not log {text!r} within {timeout} s")


def _finish(config: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sluice_bin(), "consume", "--config", str(config), "--idle-exit", "6", *extra],
        env={**os.environ, "SLUICE_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkill_at_random_moments_while_events_flow(
    kafka: KafkaBroker, ctr_artifact: Path, redis_server: str, tmp_path: Path
) -> None:
    topic = unique_topic("ads")
    ensure_topics(kafka.bootstrap, {topic: PARTITIONS})
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, redis_server)
    report: dict[str, ProduceReport] = {}

    def produce() -> None:
        report["r"] = produce_ad_requests(
            kafka.bootstrap, topic, events=50_000, rate=2_500, poison_fraction=0.01, seed=11, progress=False
        )

    producer = threading.Thread(target=produce)
    producer.start()
    rng = random.Random(5)
    for _ in range(10):
        proc = _start(config)
        _wait_for_log(proc, "partitions assigned")  # joined the group: from here on it is working
        time.sleep(rng.uniform(0.1, 2.5))
        if proc.poll() is not None:
            pytest.fail(f"consumer exited on its own ({proc.returncode})")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    producer.join()
    _finish(config)
    counts = check_run_outputs(report["r"], bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)
    assert counts["delta"] + counts["quarantined"] == report["r"].valid


CRASH_POINTS = (
    "consume:after_read",
    "consume:between_quarantine_and_scores_commits",
    "consume:after_delta_commit",
    "consume:after_online_write",
    "consume:before_kafka_commit",
    "consume:after_kafka_commit",
)


def test_every_crash_point_replays_exactly_once(kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path) -> None:
    """Crash at each named point in turn, each restart replaying what the last crash left: the
    first batch is read, then written to Delta, then to Feast, then produced, then committed."""
    topic = unique_topic("ads")
    report = produce_ad_requests(
        kafka.bootstrap, topic, events=3_000, poison_fraction=0.02, seed=3, partitions=2, progress=False
    )
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, None, max_records=1_000)
    for point in CRASH_POINTS:
        crashed = subprocess.run(
            [sluice_bin(), "consume", "--config", str(config), "--idle-exit", "5"],
            env={**os.environ, "SLUICE_LOG_FORMAT": "json", "SLUICE_CRASH_AT": point},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert crashed.returncode == 137, f"{point}: {crashed.stderr[-3000:]}"
    _finish(config)
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)


def test_sigterm_drains_and_exits_zero_with_compaction_running(
    kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path
) -> None:
    topic = unique_topic("ads")
    ensure_topics(kafka.bootstrap, {topic: 2})
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, None, compact_every_s=1.5, max_records=500)
    proc = _start(config, "--summary-json", str(tmp_path / "summary.json"))
    _wait_for_log(proc, "partitions assigned")
    # Trickle events in, so the stream writes many small files and the compactor rewrites them
    # under the appends.
    report = produce_ad_requests(kafka.bootstrap, topic, events=6_000, rate=1_000, seed=4, progress=False)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 0
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "stop requested" in summary["stopped_because"]
    assert summary["compactions"] >= 2, summary
    _finish(config)
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)


def test_broker_restart_mid_stream_loses_nothing(kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path) -> None:
    """Producer and consumer both ride out a broker outage on their own (no process restarted)."""
    topic = unique_topic("ads")
    ensure_topics(kafka.bootstrap, {topic: 2})
    # A short transaction timeout: a producer stuck after the restart (librdkafka#5456) is given
    # up on after 15 + 10 s instead of 70 s.
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, None, kafka={"transaction_timeout_s": 15})
    log_file = tmp_path / "consumer.log"
    with log_file.open("w") as log_out:
        proc = subprocess.Popen(
            [sluice_bin(), "consume", "--config", str(config), "--idle-exit", "20"],
            env={**os.environ, "SLUICE_LOG_FORMAT": "json"},
            stdout=subprocess.DEVNULL,
            stderr=log_out,
            text=True,
        )
    report: dict[str, ProduceReport] = {}

    def produce() -> None:
        report["r"] = produce_ad_requests(
            kafka.bootstrap, topic, events=12_000, rate=800, poison_fraction=0.01, seed=21, progress=False
        )

    try:
        # The outage must hit a consumer that is consuming, not one still starting (on a loaded CI
        # machine start-up alone can outlast the first seconds of the stream).
        deadline = time.monotonic() + 120
        while "partitions assigned" not in log_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.2)
        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(5)
        kafka.stop()
        time.sleep(4)
        kafka.start()
        producer.join()
        proc.wait(timeout=300)
        assert proc.returncode == 0, log_file.read_text()[-3000:]
    finally:
        if proc.poll() is None:  # a hung consumer must not outlive the test
            proc.kill()
    try:
        check_run_outputs(report["r"], bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)
    except AssertionError as exc:  # the outage's path through the runner is timing-dependent: show it
        raise AssertionError(f"{exc}\nthe consumer's log, but for reconnect noise:\n{_outage_log(log_file)}") from exc


def _outage_log(log_file: Path) -> str:
    noise = ("Connection refused", "Connect to ", "Disconnected")
    return "\n".join(line[:400] for line in log_file.read_text().splitlines() if not any(n in line for n in noise))


def test_a_consumer_joining_mid_stream_splits_the_partitions_and_each_event_is_scored_once(
    kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path
) -> None:
    """The second consumer joins while the first is publishing: the first one's rebalance callback
    runs with a batch in flight (pipelined), and no event is lost or scored twice."""
    topic = unique_topic("ads")
    ensure_topics(kafka.bootstrap, {topic: PARTITIONS})
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, None, max_records=1_000, pipeline=True)
    summaries = [tmp_path / f"summary-{i}.json" for i in range(2)]

    def start(i: int) -> subprocess.Popen[str]:
        return _start(config, "--instance", str(i), "--idle-exit", "15", "--summary-json", str(summaries[i]))

    report: dict[str, ProduceReport] = {}

    def produce() -> None:  # ~30-40 s, so the second consumer joins while requests still flow
        report["r"] = produce_ad_requests(
            kafka.bootstrap, topic, events=60_000, rate=2_000, poison_fraction=0.01, seed=31, progress=False
        )

    first = start(0)
    _wait_for_log(first, "partitions assigned")
    producer = threading.Thread(target=produce)
    producer.start()
    second = start(1)  # its start-up (imports, model, Feast, producer init) takes ~20 s here
    _wait_for_log(second, "partitions assigned")
    assert producer.is_alive(), "the second consumer joined after production ended: nothing was split"
    producer.join()
    for p in (first, second):
        p.wait(timeout=300)
        assert p.returncode == 0, f"consumer exited {p.returncode}"
    import json

    done = [json.loads(s.read_text()) for s in summaries]
    assert all(d["stats"]["records"] > 0 for d in done), "one consumer got no partitions"
    assert done[0]["rebalances"] >= 2, done[0]
    check_run_outputs(report["r"], bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)


def test_a_group_that_lost_its_offsets_resumes_after_what_delta_records_as_published(
    kafka: KafkaBroker, ctr_artifact: Path, tmp_path: Path
) -> None:
    """Broker-side group offsets expire (offsets.retention.minutes) or get deleted: the consumer
    must resume after the offsets its Delta table records as published, not from the beginning
    (which would put every score on the scores topic twice) and not after the rows in Delta."""
    from confluent_kafka.admin import AdminClient

    topic = unique_topic("ads")
    report = produce_ad_requests(
        kafka.bootstrap, topic, events=6_000, poison_fraction=0.01, seed=51, partitions=2, progress=False
    )
    config = _config(tmp_path, kafka.bootstrap, topic, ctr_artifact, None, max_records=1_000)
    _finish(config, "--max-records", "3000")
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    # A static member (group.instance.id) stays in the group until its session times out (10 s):
    # only then is the group empty and deletable.
    deadline = time.monotonic() + 60
    while True:
        try:
            admin.delete_consumer_groups([f"g-{topic}"], request_timeout=30)[f"g-{topic}"].result(timeout=30)
            break
        except Exception as exc:
            if "NON_EMPTY_GROUP" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    _finish(config)
    check_run_outputs(report, bootstrap=kafka.bootstrap, tmp=tmp_path, topic=topic)
