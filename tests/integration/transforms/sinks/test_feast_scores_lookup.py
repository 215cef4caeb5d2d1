"""``lookup_ad_score``, behind ``sluice lookup ad-score``: it finds the store the scoring job wrote
(by default beside the target table, or a config file's ``feast`` section) and reads it as a serving
client would; bad config files fail with one line."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from schemas.scores import SCORES_SCHEMA
from transforms.errors import ConfigError
from transforms.sinks.feast_online import FeastConfig
from transforms.sinks.feast_scores import FeastScoresSink, lookup_ad_score

SCORED_AT = datetime.now(UTC).replace(microsecond=250000)


def _publish(config: FeastConfig, target: str, user: str, ad: str, score: float) -> None:
    sink = FeastScoresSink(config, scores_table_uri=target)
    sink.apply()
    row = {
        "request_id": "r-1",
        "user_id": user,
        "ad_id": ad,
        "seq": 1,
        "score": score,
        "model_name": "ctr-dlrm",
        "model_version": "sha-123",
        "topic": "ad-requests",
        "partition": 0,
        "offset": 41,
        "event_time": SCORED_AT - timedelta(seconds=1),
        "scored_at": SCORED_AT,
        "event_date": SCORED_AT.date(),
    }
    sink.write(pa.Table.from_pylist([row], schema=SCORES_SCHEMA))


def test_finds_the_score_the_job_wrote_beside_its_target(tmp_path: Path) -> None:
    target = str(tmp_path / "scores")
    score = float(np.float32(0.0123456789))
    _publish(FeastConfig.next_to(target), target, "user-1", "ad-9", score)

    found = lookup_ad_score("user-1", "ad-9", target=target)
    missing = lookup_ad_score("user-1", "ad-8", target=target)

    assert found == {
        "user_id": "user-1",
        "ad_id": "ad-9",
        "found": True,
        "score": score,
        "model_version": "sha-123",
        "scored_at": SCORED_AT.replace(microsecond=0).isoformat(),
    }
    assert missing == {"user_id": "user-1", "ad_id": "ad-8", "found": False}
    json.dumps(found)  # what the CLI prints


def test_reads_the_store_named_by_the_config_files_feast_section(tmp_path: Path) -> None:
    store_dir = tmp_path / "elsewhere"
    config = FeastConfig.local(store_dir, project="prod")
    _publish(config, str(tmp_path / "scores"), "user-2", "ad-3", 0.5)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(json.dumps({"kafka": {"topic": "x"}, "feast": config.model_dump()}))

    found = lookup_ad_score("user-2", "ad-3", target=str(tmp_path / "scores"), config=config_file)
    beside_target = FeastConfig.next_to(str(tmp_path / "scores"))

    assert found["found"] is True
    assert found["score"] == 0.5
    assert not Path(beside_target.registry).exists(), "the config's store was read, not the default one"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("feast: [unclosed", "is not valid YAML"),
        ("feast: {registery: r.db}", "feast.registery: Extra inputs are not permitted"),
        ("feast: {online_store: {type: postgres}}", "feast.online_store"),
    ],
    ids=["yaml", "unknown-key", "unknown-store"],
)
def test_a_bad_config_file_is_a_one_line_config_error(tmp_path: Path, text: str, complaint: str) -> None:
    config_file = tmp_path / "job.yaml"
    config_file.write_text(text)

    with pytest.raises(ConfigError) as error:
        lookup_ad_score("u", "a", target=str(tmp_path / "scores"), config=config_file)

    assert complaint in str(error.value)
    assert str(config_file) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.yaml"):
        lookup_ad_score("u", "a", target=str(tmp_path / "scores"), config=tmp_path / "nope.yaml")
