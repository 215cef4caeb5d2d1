"""Helpers for running sluice as users run it: the installed ``sluice`` command, in subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def sluice_bin() -> str:
    found = Path(sys.executable).with_name("sluice")
    if found.exists():
        return str(found)
    path = shutil.which("sluice")
    assert path, "the sluice command is not installed: run `make install`"
    return path


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "SLUICE_LOG_FORMAT": "json", **(env or {})}
    return subprocess.run(
        [sluice_bin(), *args], capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout
    )


@pytest.fixture
def cli():  # type: ignore[no-untyped-def]
    return run_cli
