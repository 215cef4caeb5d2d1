"""The CTR model on disk: export it as a verifiable directory, load it back as a scorer.

An artifact is a directory of three files:

* ``model.safetensors`` — the weights only. Safetensors because loading it cannot run code
  (invariant 4: the loader never unpickles).
* ``vocab.json`` — every categorical feature's vocabulary (tens of thousands of ids: kept out
  of the manifest so the manifest stays readable).
* ``manifest.json`` — what the weights mean: format name and version, the architecture, the
  feature spec (vocabularies by reference), dense normalisation and accepted ranges, the
  training base rate, metrics and seed, ``created_at``, the sha256 of every other file, and
  ``version``.

``version`` is the content hash of what decides the scores — the weights, the vocabularies, the
spec and the architecture — and of nothing else, so re-exporting the same model at another time
(a new ``created_at``, other metrics) keeps its version, and any change to what it computes
changes it. It is the ``model_version`` on every scored row (invariant 3), as
:func:`transforms.models.artifact.content_version` is for the text encoder.

Loading verifies before it trusts: every file against its sha256, the manifest's version
against the content, and optionally the version a job pins. Each failure is one
:class:`ModelLoadError` line naming the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from transforms.errors import ConfigError, ModelLoadError
from transforms.models.ctr import CtrArchitecture, CtrFeatureSpec, CtrModel, CtrScorer

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "VOCAB", "WEIGHTS", "export_ctr", "load_ctr"]

log = logging.getLogger(__name__)

FORMAT = "sluice-ctr-dlrm"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"
_REQUIRED = (WEIGHTS, VOCAB)
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _version(file_digests: Mapping[str, str], architecture: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """Hash of the weights, vocabularies, spec and architecture: what decides the scores."""
    total = hashlib.sha256()
    for name in sorted(file_digests):
        total.update(name.encode() + b"\0" + bytes.fromhex(file_digests[name]))
    total.update(b"architecture\0" + _canonical(architecture))
    total.update(b"spec\0" + _canonical(spec))
    total.update(f"{FORMAT}/{FORMAT_VERSION}".encode())
    return total.hexdigest()[:16]


def _split_spec(spec: CtrFeatureSpec) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The spec without its vocabularies (for the manifest), and the vocabularies (for vocab.json)."""
    data = spec.model_dump(mode="json")
    vocab: dict[str, list[str]] = {}
    for feature in data["categorical"]:
        vocab[feature["name"]] = feature.pop("vocabulary")
        feature["cardinality"] = len(vocab[feature["name"]]) + 1
    return data, vocab


def _join_spec(data: Mapping[str, Any], vocab: Mapping[str, Any]) -> CtrFeatureSpec:
    full = json.loads(json.dumps(data))
    for feature in full.get("categorical", []):
        name = feature.get("name")
        if name not in vocab:
            raise ModelLoadError(f"{VOCAB} has no vocabulary for the categorical feature {name!r}")
        feature.pop("cardinality", None)
        feature["vocabulary"] = vocab[name]
    return CtrFeatureSpec.model_validate(full)


def _is_artifact_or_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and (not any(path.iterdir()) or (path / MANIFEST).is_file()))


def export_ctr(
    out_dir: str | Path,
    module: CtrModel,
    spec: CtrFeatureSpec,
    architecture: CtrArchitecture,
    *,
    name: str = "ctr-dlrm",
    base_rate: float,
    seed: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> str:
    """Write the artifact to ``out_dir`` and return its version.

    The directory is written beside ``out_dir`` and renamed into place, so a crash never leaves
    a half-written artifact where a loader would look. An existing artifact (or empty directory)
    at ``out_dir`` is replaced; any other existing content is refused.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if not _is_artifact_or_empty(out):
        raise ConfigError(f"{out} exists and is not a CTR artifact directory: choose an empty or new --out")
    if not 0.0 < base_rate < 1.0:
        raise ConfigError(f"base_rate must be in (0, 1), not {base_rate}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        # One metadata key only: safetensors writes its metadata map in hash order, so two keys
        # could land in either order and the same weights would hash to two versions.
        save_file(state, str(tmp / WEIGHTS), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
        spec_data, vocab = _split_spec(spec)
        (tmp / VOCAB).write_text(json.dumps(vocab, separators=(",", ":")))
        files = {f: _sha256(tmp / f) for f in _REQUIRED}
        arch_data = architecture.model_dump(mode="json")
        version = _version(files, arch_data, spec_data)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seed": seed,
            "architecture": arch_data,
            "spec": spec_data,
            "base_rate": base_rate,
            "metrics": dict(metrics or {}),
            "training": dict(training or {}),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{what} {path} cannot be read as JSON: {exc}") from exc


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(setting)
        log.warning("CTR model asked for %s but no CUDA device is visible: scoring on CPU", setting)
        return torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"CTR model device must be auto, cpu or cuda[:N], not {setting!r}")


def load_ctr(path: str | Path, *, device: str = "cpu", expected_version: str | None = None) -> CtrScorer:
    """Verify and load the artifact at ``path`` as a ready :class:`CtrScorer` (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise ModelLoadError(f"CTR artifact {root} not found: expected a directory written by sluice train-ctr")
    if not manifest_path.is_file():
        raise ModelLoadError(f"CTR artifact {root} has no {MANIFEST}: not an exported CTR model (re-export it)")
    manifest = _read_json(manifest_path, "CTR manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelLoadError(f"{manifest_path} is of an unknown format {found!r}: expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this sluice reads "
            f"{FORMAT_VERSION}: re-export the model or upgrade sluice"
        )
    try:
        files = dict(manifest["files"])
        arch_data = manifest["architecture"]
        spec_data = manifest["spec"]
        name = str(manifest["name"])
        claimed = str(manifest["version"])
        base_rate = float(manifest["base_rate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{manifest_path} is missing or has a malformed field: {exc}") from exc

    for required in _REQUIRED:
        if required not in files:
            raise ModelLoadError(f"{manifest_path} lists no sha256 for {required}: re-export the model")
    for rel, want in files.items():
        f = root / rel
        if not f.is_file():
            raise ModelLoadError(f"CTR artifact file {f} is missing (listed in {MANIFEST})")
        if _sha256(f) != want:
            raise ModelLoadError(f"CTR artifact file {f} does not match its sha256 in {MANIFEST}: corrupt or truncated")

    version = _version({f: files[f] for f in _REQUIRED}, arch_data, spec_data)
    if version != claimed:
        raise ModelLoadError(
            f"{manifest_path} says version {claimed} but its content hashes to {version}: the manifest was edited"
        )
    if expected_version is not None and expected_version != version:
        raise ModelLoadError(
            f"CTR artifact {root} has version {version} but {expected_version} is pinned: "
            "the model changed; update the pin if that is intended"
        )

    vocab = _read_json(root / VOCAB, "CTR vocabulary")
    if not isinstance(vocab, dict):
        raise ModelLoadError(f"{root / VOCAB} is not a JSON object of vocabularies")
    try:
        spec = _join_spec(spec_data, vocab)
        arch = CtrArchitecture.model_validate(arch_data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelLoadError(f"{manifest_path} has an invalid model description at {where}: {first['msg']}") from exc

    weights = root / WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"CTR weights {weights} are corrupt or truncated: {exc}") from exc
    module = CtrModel(spec.cardinalities, len(spec.dense), arch)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"CTR weights {weights} do not fit the architecture in {MANIFEST}: {msg}") from exc
    target = _device(device)
    module.eval().requires_grad_(False).to(target)
    return CtrScorer(module, spec, name=name, version=version, base_rate=base_rate, device=target)
