from __future__ import annotations

import pydantic
import pytest

from pipelines.score_config import ScoreTargetConfig, StreamSparkConfig


def test_the_stream_defaults_to_two_task_slots_per_core_and_no_master() -> None:
    cfg = StreamSparkConfig()
    assert cfg.master is None
    assert cfg.local_task_slots_per_core == 2


def test_task_slots_per_core_must_be_positive() -> None:
    with pytest.raises(pydantic.ValidationError, match="local_task_slots_per_core"):
        StreamSparkConfig(local_task_slots_per_core=0)


def test_a_typo_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="local_task_slot_per_core"):
        StreamSparkConfig.model_validate({"local_task_slot_per_core": 2})


def test_the_scores_tables_get_a_short_log_retention_unless_told_otherwise() -> None:
    assert ScoreTargetConfig(uri="/t").table_properties == {"delta.logRetentionDuration": "interval 5 minutes"}
    assert ScoreTargetConfig(uri="/t", log_retention_minutes=240).table_properties == {
        "delta.logRetentionDuration": "interval 240 minutes"
    }
    assert ScoreTargetConfig(uri="/t", log_retention_minutes=None).table_properties == {}
    with pytest.raises(pydantic.ValidationError, match="log_retention_minutes"):
        ScoreTargetConfig(uri="/t", log_retention_minutes=0)


def test_compaction_is_triggered_by_commits_as_well_as_by_time_by_default() -> None:
    cfg = ScoreTargetConfig(uri="/t")
    assert (cfg.compact_every_s, cfg.compact_every_commits, cfg.compact_small_file_mb) == (600.0, 100, 4)
    assert cfg.vacuum_retention_hours is None  # deleting replaced files is opt-in
