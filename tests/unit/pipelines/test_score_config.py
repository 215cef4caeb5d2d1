from __future__ import annotations

import pydantic
import pytest

from pipelines.score_config import StreamSparkConfig


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
