"""Bad input, as a user meets it: one line on stderr, a distinct exit code, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.demo_data import generate_items, write_items_table
from tests.e2e.conftest import run_cli


@pytest.fixture
def items(tmp_path: Path) -> str:
    uri = str(tmp_path / "items")
    write_items_table(uri, generate_items(10, seed=2))
    return uri


def _one_line_error(proc, code: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sluice: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0]


def test_missing_source_table(tmp_path: Path) -> None:
    proc = run_cli("backfill", "--source", str(tmp_path / "nope"), "--target", str(tmp_path / "emb"))
    _one_line_error(proc, 3, "no Delta table at", str(tmp_path / "nope"))
    assert not (tmp_path / "emb").exists()


def test_wrong_source_schema(tmp_path: Path, items: str) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"source:\n  uri: {items}\n  text_column: body\ntarget:\n  uri: {tmp_path / 'emb'}\n")
    proc = run_cli("backfill", "--config", str(cfg))
    _one_line_error(proc, 3, "wrong schema", "missing column 'body'")


def test_unknown_config_key(tmp_path: Path, items: str) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"source: {{uri: {items}}}\ntarget: {{uri: {tmp_path / 'emb'}}}\nmodel: {{precison: int8}}\n")
    proc = run_cli("backfill", "--config", str(cfg))
    _one_line_error(proc, 2, "model.precison: unknown key", str(cfg))


def test_corrupt_model_file(tmp_path: Path, items: str) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"\x00garbage")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"source: {{uri: {items}}}\ntarget: {{uri: {tmp_path / 'emb'}}}\nmodel: {{source: {model}, tokenizer: {tok}}}\n"
    )
    proc = run_cli("backfill", "--config", str(cfg), "--no-feast")
    _one_line_error(proc, 4, str(model))
    assert not (tmp_path / "emb").exists()


def test_unknown_model(tmp_path: Path, items: str) -> None:
    proc = run_cli("backfill", "--source", items, "--target", str(tmp_path / "emb"), "--model", "builtin:nope")
    _one_line_error(proc, 4, "unknown built-in model builtin:nope")


def test_unwritable_target(tmp_path: Path, items: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("backfill", "--source", items, "--target", str(blocker / "emb"))
    _one_line_error(proc, 5, "not writable")


def test_help_explains_the_modes() -> None:
    proc = run_cli("backfill", "--help")
    assert proc.returncode == 0
    for word in ("incremental", "stale", "--config", "--mode"):
        assert word in proc.stdout
