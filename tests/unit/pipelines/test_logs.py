from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from pipelines import logs


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_sluice_log_level_sets_the_root_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_LOG_FORMAT", "json")
    monkeypatch.setenv("SLUICE_LOG_LEVEL", "debug")
    logs.configure()
    assert logging.getLogger().level == logging.DEBUG


def test_the_default_level_is_info(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_LOG_FORMAT", "json")
    monkeypatch.delenv("SLUICE_LOG_LEVEL", raising=False)
    logs.configure()
    assert logging.getLogger().level == logging.INFO


def test_an_unknown_level_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit, match="SLUICE_LOG_LEVEL='CHATTY' is not a log level"):
        logs.configure()


def test_json_lines_carry_the_extra_fields(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLUICE_LOG_FORMAT", "json")
    monkeypatch.setenv("SLUICE_LOG_LEVEL", "DEBUG")
    logs.configure()
    logging.getLogger("sluice.test").debug("batch published", extra={"scored": 3, "step_seconds": {"kafka": 0.01}})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "batch published"
    assert line["level"] == "debug"
    assert line["scored"] == 3 and line["step_seconds"] == {"kafka": 0.01}
