"""Exporting and loading the CTR model (transforms/models/ctr_artifact.py): a round trip scores
identically, the version is a content hash, and every kind of damage is one ModelLoadError line
that names the file — without ever unpickling anything."""

from __future__ import annotations

import json
import pickle
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.ad_world import AdWorld
from transforms.errors import ConfigError, ModelLoadError
from transforms.models import ctr_artifact
from transforms.models.ctr import CtrArchitecture, CtrFeatureSpec, CtrModel, CtrScorer, build_feature_spec
from transforms.models.ctr_artifact import FORMAT, MANIFEST, VOCAB, WEIGHTS, export_ctr, load_ctr

ARCH = CtrArchitecture(embedding_dim=8, bottom_mlp=(16,), top_mlp=(32,))


@cache
def _world() -> AdWorld:
    return AdWorld.build(5, users=3_000, ads=400, campaigns=40)


@cache
def _spec() -> CtrFeatureSpec:
    return build_feature_spec(pa.Table.from_batches([_world().requests(1).next_batch(20_000)]), min_count=2)


def _model(seed: int = 0) -> CtrModel:
    torch.manual_seed(seed)
    spec = _spec()
    return CtrModel(spec.cardinalities, len(spec.dense), ARCH).eval()


def _export(out: Path, model: CtrModel | None = None) -> str:
    return export_ctr(out, model or _model(), _spec(), ARCH, base_rate=0.031, seed=5, metrics={"heldout_auc": 0.7})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only by convention; tests that damage an artifact copy it first."""
    out = tmp_path_factory.mktemp("ctr") / "model"
    _export(out)
    return out


@pytest.fixture
def damaged(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def _one_line(excinfo: pytest.ExceptionInfo[ModelLoadError]) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest))


# --- round trip ----------------------------------------------------------------------------------


def test_round_trip_scores_identically(artifact: Path) -> None:
    batch = _world().requests(2).next_batch(2_000)
    before = CtrScorer(_model(), _spec(), name="x", version="y", base_rate=0.031).score(batch)
    scorer = load_ctr(artifact)
    after = scorer.score(batch)
    assert np.array_equal(before.scores, after.scores)
    assert not scorer.module.training
    assert scorer.name == "ctr-dlrm" and scorer.base_rate == pytest.approx(0.031)
    assert scorer.spec == _spec()
    assert scorer.version == _manifest(artifact)["version"] and len(scorer.version) == 16


def test_the_artifact_has_exactly_weights_vocab_and_manifest(artifact: Path) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == sorted([MANIFEST, VOCAB, WEIGHTS])
    m = _manifest(artifact)
    assert m["format"] == FORMAT and m["format_version"] == 1
    assert set(m["files"]) == {WEIGHTS, VOCAB}
    assert m["architecture"] == ARCH.model_dump(mode="json")
    assert m["seed"] == 5 and m["metrics"] == {"heldout_auc": 0.7} and m["created_at"]
    dense = {f["name"]: f for f in m["spec"]["dense"]}
    assert dense["bid_floor_usd"]["accepted_range"] == [0.0, 1000.0] and "mean" in dense["bid_floor_usd"]
    assert all("vocabulary" not in f for f in m["spec"]["categorical"])  # in vocab.json instead
    assert not any(p.name.startswith(".") for p in artifact.parent.iterdir())  # no temp dirs left


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    v1 = _export(tmp_path / "a")
    v2 = export_ctr(tmp_path / "b", _model(), _spec(), ARCH, base_rate=0.05, seed=9, metrics={"other": 1.0})
    assert v1 == v2  # same weights and spec: same version, whatever the metadata
    assert _export(tmp_path / "c", _model(seed=1)) != v1  # other weights
    arch = CtrArchitecture(embedding_dim=8, bottom_mlp=(16,), top_mlp=(32,))
    spec = _spec().model_copy(update={"dense": (_spec().dense[0].model_copy(update={"mean": 0.5}), *_spec().dense[1:])})
    assert export_ctr(tmp_path / "d", _model(), spec, arch, base_rate=0.031) != v1  # other normalisation


def test_expected_version_pins_the_model(artifact: Path) -> None:
    version = _manifest(artifact)["version"]
    assert load_ctr(artifact, expected_version=version).version == version
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(artifact, expected_version="0000000000000000")
    assert "0000000000000000 is pinned" in _one_line(excinfo)


def test_export_replaces_an_artifact_but_not_other_content(tmp_path: Path) -> None:
    out = tmp_path / "model"
    _export(out)
    version = _export(out, _model(seed=3))
    assert load_ctr(out).version == version
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a CTR artifact directory"):
        _export(other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_cuda_falls_back_to_cpu_when_there_is_none(artifact: Path) -> None:
    scorer = load_ctr(artifact, device="cuda")
    assert scorer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        load_ctr(artifact, device="tpu")


# --- damage --------------------------------------------------------------------------------------


def test_flipped_byte_in_the_weights_fails_its_checksum(damaged: Path) -> None:
    weights = damaged / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(damaged)
    msg = _one_line(excinfo)
    assert str(weights) in msg and "sha256" in msg


def test_truncated_weights_fail_even_with_a_matching_manifest(damaged: Path) -> None:
    weights = damaged / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=WEIGHTS):
        load_ctr(damaged)
    # Someone "fixes" the manifest to the truncated file's hash: the content no longer loads.
    m = _manifest(damaged)
    m["files"][WEIGHTS] = ctr_artifact._sha256(weights)
    m["version"] = ctr_artifact._version(m["files"], m["architecture"], m["spec"])
    _write_manifest(damaged, m)
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(damaged)
    assert "corrupt or truncated" in _one_line(excinfo) and str(weights) in str(excinfo.value)


def test_edited_vocabulary_fails_its_checksum(damaged: Path) -> None:
    vocab = json.loads((damaged / VOCAB).read_text())
    vocab["user_id"].reverse()
    (damaged / VOCAB).write_text(json.dumps(vocab))
    with pytest.raises(ModelLoadError, match=VOCAB):
        load_ctr(damaged)


def test_edited_spec_in_the_manifest_fails_the_version(damaged: Path) -> None:
    m = _manifest(damaged)
    m["spec"]["dense"][0]["mean"] += 1.0
    _write_manifest(damaged, m)
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(damaged)
    assert "manifest was edited" in _one_line(excinfo)


@pytest.mark.parametrize("missing", [MANIFEST, WEIGHTS, VOCAB])
def test_missing_file_is_named(damaged: Path, missing: str) -> None:
    (damaged / missing).unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(damaged)
    assert missing in _one_line(excinfo)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_ctr(tmp_path / "nope")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"format": "onnx"}, "unknown format 'onnx'"),
        ({"format_version": 99}, "format_version 99"),
    ],
)
def test_unknown_format_is_refused(damaged: Path, edit: dict, expected: str) -> None:
    _write_manifest(damaged, {**_manifest(damaged), **edit})
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(damaged)
    assert expected in _one_line(excinfo) and MANIFEST in str(excinfo.value)


def test_manifest_that_is_not_json(damaged: Path) -> None:
    (damaged / MANIFEST).write_text("{not json")
    with pytest.raises(ModelLoadError) as excinfo:
        load_ctr(damaged)
    assert MANIFEST in _one_line(excinfo)


def test_manifest_without_a_checksum_for_the_weights(damaged: Path) -> None:
    m = _manifest(damaged)
    del m["files"][WEIGHTS]
    _write_manifest(damaged, m)
    with pytest.raises(ModelLoadError, match=f"no sha256 for {WEIGHTS}"):
        load_ctr(damaged)


# --- no pickle -----------------------------------------------------------------------------------


def test_loading_never_unpickles(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CTR loader unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_ctr(artifact).version
    header_len = int.from_bytes((artifact / WEIGHTS).read_bytes()[:8], "little")
    header = json.loads((artifact / WEIGHTS).read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == f"{FORMAT}/1"  # a safetensors file, not a pickle archive
