from __future__ import annotations

import pytest

from transforms.spark.session import local_master


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})


def test_a_given_master_is_kept(two_cores: None) -> None:
    assert local_master("spark://head:7077", slots_per_core=2) == "spark://head:7077"
    assert local_master("local[3]", slots_per_core=2) == "local[3]"


def test_one_slot_per_core_is_local_star(two_cores: None) -> None:
    assert local_master(None) == "local[*]"


def test_more_slots_per_core_multiply_the_cores(two_cores: None) -> None:
    assert local_master(None, slots_per_core=2) == "local[4]"
    assert local_master(None, slots_per_core=3) == "local[6]"
