"""The backfill's driver-side preparation steps that run while the executors embed (pipelines/backfill.py)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from pipelines.backfill import _first_failure, _in_background


def test_a_failing_step_calls_back_with_its_error() -> None:
    seen: list[BaseException] = []
    called = threading.Event()

    def boom() -> None:
        raise ValueError("registry refused")

    def on_error(exc: BaseException) -> None:
        seen.append(exc)
        called.set()

    step = _in_background(boom, on_error=on_error)
    assert called.wait(5)
    assert [str(e) for e in seen] == ["registry refused"]
    with pytest.raises(ValueError):
        step.result()


def test_a_step_that_succeeds_never_calls_back() -> None:
    seen: list[BaseException] = []
    step = _in_background(lambda: None, on_error=seen.append)
    step.result(timeout=5)
    assert seen == [] and _first_failure(step) is None


def test_the_first_failed_step_is_the_story_and_running_or_absent_steps_are_not() -> None:
    running: Future[None] = Future()
    failed: Future[None] = Future()
    failed.set_exception(RuntimeError("cannot create the target"))
    ok: Future[None] = Future()
    ok.set_result(None)
    assert _first_failure(None, running, ok) is None
    cause = _first_failure(None, running, ok, failed)
    assert isinstance(cause, RuntimeError) and str(cause) == "cannot create the target"
