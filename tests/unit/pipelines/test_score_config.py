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


def test_the_scores_tables_get_short_log_and_tombstone_retentions_unless_told_otherwise() -> None:
    # "interval N minutes" exactly: delta-rs ignores "1 minute" (no "interval") without a word.
    assert ScoreTargetConfig(uri="/t").table_properties == {
        "delta.logRetentionDuration": "interval 5 minutes",
        "delta.deletedFileRetentionDuration": "interval 60 minutes",
    }
    assert ScoreTargetConfig(
        uri="/t", log_retention_minutes=240, deleted_file_retention_minutes=None
    ).table_properties == {"delta.logRetentionDuration": "interval 240 minutes"}
    assert (
        ScoreTargetConfig(uri="/t", log_retention_minutes=None, deleted_file_retention_minutes=None).table_properties
        == {}
    )
    for field in ("log_retention_minutes", "deleted_file_retention_minutes"):
        with pytest.raises(pydantic.ValidationError, match=field):
            ScoreTargetConfig.model_validate({"uri": "/t", field: 0})


def test_checkpoints_are_left_to_the_compactor_only_while_it_runs_by_commit_count() -> None:
    assert ScoreTargetConfig(uri="/t").checkpoints == "by_maintenance"
    assert ScoreTargetConfig(uri="/t").compactor().checkpoints is True
    by_time_only = ScoreTargetConfig(uri="/t", compact_every_commits=0)
    assert by_time_only.checkpoints == "on_commit" and by_time_only.compactor().checkpoints is False


def test_compaction_is_triggered_by_commits_as_well_as_by_time_by_default() -> None:
    cfg = ScoreTargetConfig(uri="/t")
    assert (cfg.compact_every_s, cfg.compact_every_commits, cfg.compact_small_file_mb) == (600.0, 100, 4)
    assert cfg.vacuum_retention_hours is None  # deleting replaced files is opt-in
