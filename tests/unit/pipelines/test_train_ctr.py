"""Training the CTR model (pipelines/train_ctr.py): the metrics it is judged by, and a tiny run
that must learn something real and export an artifact that scores as the report says.

The full default run is not repeated here (~20 s of a core, 2 GB); its measured figures are in
the module's docstring. What is pinned: a 20k-row run beats the base-rate floor and ranks clicks
clearly better than chance, the same seed reproduces the same model version, and the report is
printable as a table and as JSON.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from pipelines.ad_world import AdWorld
from pipelines.train_ctr import TrainReport, generate_click_log, log_loss, roc_auc, train_ctr
from transforms.errors import ConfigError
from transforms.models.ctr_artifact import load_ctr

# --- metrics -------------------------------------------------------------------------------------


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 8, size=60).astype(float)  # many ties
        labels = (rng.random(60) < 0.3).astype(int)
        assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc([0.1, 0.2, 0.3, 0.4], y) == 1.0
    assert roc_auc([0.4, 0.3, 0.2, 0.1], y) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], y) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_log_loss() -> None:
    assert log_loss([0.5, 0.5], [0, 1]) == pytest.approx(math.log(2))
    assert log_loss([1.0, 0.0], [1, 0]) == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(log_loss([0.0], [1]))  # clipped, not inf


def test_click_log_is_the_worlds_stream_with_bernoulli_clicks() -> None:
    world = AdWorld.build(3, users=2_000, ads=200, campaigns=20)
    log = generate_click_log(world, seed=4, rows=30_000)
    assert log.requests.num_rows == 30_000 and log.clicked.shape == (30_000,)
    assert np.array_equal(log.truth, world.click_probability(log.requests))
    assert abs(log.clicked.mean() - log.truth.mean()) < 0.005
    again = generate_click_log(world, seed=4, rows=30_000)
    assert np.array_equal(log.clicked, again.clicked)


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TrainReport:
    out = tmp_path_factory.mktemp("train") / "ctr"
    return train_ctr(out, seed=7, rows=20_000, epochs=1, batch_size=512, progress=False)


def test_a_tiny_run_learns_something_real(tiny: TrainReport) -> None:
    assert tiny.train_rows == 18_000 and tiny.heldout_rows == 2_000
    assert tiny.log_loss < tiny.base_rate_log_loss  # beats the floor
    assert tiny.auc > 0.65  # clearly better than chance
    assert tiny.truth_auc > tiny.auc and tiny.truth_log_loss < tiny.log_loss  # and below the ceiling
    assert 0.02 < tiny.train_base_rate < 0.05


def test_held_out_rows_include_ids_the_model_never_saw(tiny: TrainReport) -> None:
    assert tiny.heldout_unknown["user_id"] > 0.02  # new users and the tail below min_count
    assert tiny.heldout_unknown["slot"] == 0.0 and tiny.heldout_unknown["hour"] == 0.0


def test_the_exported_artifact_is_the_model_the_report_describes(tiny: TrainReport) -> None:
    scorer = load_ctr(tiny.out_dir, expected_version=tiny.model_version)
    manifest = json.loads((tiny.out_dir / "manifest.json").read_text())
    assert manifest["metrics"]["heldout_auc"] == pytest.approx(tiny.auc)
    assert manifest["training"]["train_rows"] == tiny.train_rows
    assert scorer.base_rate == pytest.approx(tiny.train_base_rate)
    # Re-scoring the held-out rows with the loaded artifact reproduces the reported AUC.
    log = generate_click_log(AdWorld.build(7), seed=7, rows=20_000)
    result = scorer.score(log.requests.slice(18_000))
    assert roc_auc(result.scores, log.clicked[18_000:]) == pytest.approx(tiny.auc, abs=1e-6)


def test_the_same_seed_reproduces_the_same_model(tiny: TrainReport, tmp_path: Path) -> None:
    again = train_ctr(tmp_path / "again", seed=7, rows=20_000, epochs=1, batch_size=512, progress=False)
    assert again.model_version == tiny.model_version


def test_report_prints_as_a_table_and_as_json(tiny: TrainReport) -> None:
    buf = io.StringIO()
    tiny.render(Console(file=buf, width=120))
    text = buf.getvalue()
    assert "ground truth (ceiling)" in text and "base rate (floor)" in text and tiny.model_version in text
    data = json.loads(json.dumps(tiny.as_dict()))
    assert data["auc"] == pytest.approx(tiny.auc) and data["out_dir"] == str(tiny.out_dir)
    assert 0.0 < data["log_loss_captured"] < 1.0


def test_progress_bars_do_not_break_training(tmp_path: Path) -> None:
    report = train_ctr(tmp_path / "p", rows=2_000, batch_size=256, progress=True)
    assert report.epochs == 1 and len(report.epoch_losses) == 1


@pytest.mark.parametrize(
    "kwargs", [{"rows": 10}, {"epochs": 0}, {"heldout_fraction": 1.0}, {"learning_rate": 0.0}], ids=str
)
def test_bad_arguments_are_config_errors(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        train_ctr(tmp_path / "x", progress=False, **kwargs)  # type: ignore[arg-type]
