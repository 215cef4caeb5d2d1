"""Killed mid-run, re-run: the target ends identical to a clean run (no duplicates, none missing).

Each run is the real ``sluice backfill`` command in its own process (its own JVM). Named crash
points stop it with ``os._exit`` at the moments that matter; a seeded random SIGKILL of the whole
process group covers the moments nobody thought of.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from pipelines.demo_data import generate_items, write_items_table
from tests.e2e.conftest import REPO, run_cli, sluice_bin

pytestmark = pytest.mark.slow

ROWS = 80


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("src") / "items")
    write_items_table(uri, generate_items(ROWS, seed=21, bad_fraction=0.025))
    return uri


def _backfill(source: str, target: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("backfill", "--source", source, "--target", str(target), "--master", "local[2]", env=env)


def _snapshot(target: Path) -> dict[str, np.ndarray]:
    table = DeltaTable(str(target)).to_pyarrow_table()
    ids = table.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate item ids in the target"
    vecs = table.column("embedding").to_pylist()
    return {i: np.asarray(v, dtype=np.float32) for i, v in zip(ids, vecs, strict=True)}


def _quarantined_ids(target: Path) -> list[str]:
    q = Path(str(target) + "_quarantine")
    return sorted(DeltaTable(str(q)).to_pyarrow_table().column("item_id").to_pylist())


@pytest.fixture(scope="module")
def clean(source: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], list[str]]:
    target = tmp_path_factory.mktemp("clean") / "emb"
    proc = _backfill(source, target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _snapshot(target), _quarantined_ids(target)


def _assert_same(target: Path, clean: tuple[dict[str, np.ndarray], list[str]]) -> None:
    got = _snapshot(target)
    want, want_q = clean
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5)
    assert _quarantined_ids(target) == want_q  # quarantine written exactly once too


@pytest.mark.parametrize("point", ["mid_inference", "after_quarantine_commit", "after_delta_commit"])
def test_crash_point_then_rerun_matches_clean_run(point: str, source: str, clean, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "emb"
    crashed = _backfill(source, target, env={"SLUICE_CRASH_AT": point})
    assert crashed.returncode != 0
    assert f"crash point {point}" in crashed.stderr
    rerun = _backfill(source, target)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same(target, clean)


def test_random_sigkill_then_rerun_matches_clean_run(source: str, clean, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "emb"
    delay = random.Random(1234).uniform(8.0, 20.0)
    proc = subprocess.Popen(
        [sluice_bin(), "backfill", "--source", source, "--target", str(target), "--master", "local[2]"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "SLUICE_LOG_FORMAT": "json"},
    )
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, JVM and Python workers at once
    proc.wait(timeout=60)
    rerun = _backfill(source, target)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same(target, clean)
