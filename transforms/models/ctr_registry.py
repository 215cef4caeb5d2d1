"""Model promotion without restarts: a directory of CTR artifacts and a ``CURRENT`` pointer.

Layout of a registry (what ``sluice train-ctr --registry DIR`` writes)::

    DIR/
      CURRENT              one line: the version a running stream should serve
      <version>/           an artifact as transforms.models.ctr_artifact exports it
      <version>/ ...

Promotion is one atomic rename of ``CURRENT`` (:func:`promote`). Running consumers and Spark
executors look at the pointer between batches, at most every ``poll_seconds``; when it names
another version they load and verify it, then swap, so a batch is always scored by exactly one
model and every row names it (``model_version``). A pointer to a missing or corrupt artifact is
logged loudly and the old model keeps serving: a bad promotion must not take the stream down.

A plain artifact directory (no ``CURRENT``) is served as a fixed model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from transforms.errors import ModelLoadError
from transforms.models.ctr import CtrScorer
from transforms.models.ctr_artifact import MANIFEST, load_ctr

log = logging.getLogger(__name__)

POINTER = "CURRENT"


def is_registry(path: str | Path) -> bool:
    return (Path(path) / POINTER).is_file()


def read_pointer(root: str | Path) -> str:
    pointer = Path(root) / POINTER
    try:
        version = pointer.read_text().strip()
    except OSError as exc:
        raise ModelLoadError(f"model registry pointer {pointer} cannot be read: {exc}") from exc
    if not version or "/" in version or version.startswith("."):
        raise ModelLoadError(f"model registry pointer {pointer} holds {version!r}, not a version directory name")
    return version


def promote(root: str | Path, version: str) -> Path:
    """Point ``root``'s ``CURRENT`` at ``version`` (which must be a verified artifact there)."""
    root = Path(root)
    artifact = root / version
    load_ctr(artifact, expected_version=version)  # refuse to promote what cannot be served
    tmp = root / f".{POINTER}.{os.getpid()}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / POINTER)  # atomic: readers see the old or the new pointer, never half
    return artifact


def resolve(path: str | Path) -> Path:
    """The artifact directory ``path`` serves now: itself, or what its ``CURRENT`` names."""
    p = Path(path).expanduser()
    if is_registry(p):
        return p / read_pointer(p)
    if not (p / MANIFEST).is_file() and p.is_dir():
        raise ModelLoadError(
            f"{p} is neither a CTR artifact (no {MANIFEST}) nor a model registry (no {POINTER}): "
            "point --model at what `sluice train-ctr` wrote"
        )
    return p


class CtrModelSource:
    """The model a worker scores with now; reloads when the registry's pointer moves."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        poll_seconds: float = 5.0,
        expected_version: str | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.device = device
        self.poll_seconds = poll_seconds
        self.watching = is_registry(self.path)
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._pointer: str | None = read_pointer(self.path) if self.watching else None
        self._scorer = load_ctr(resolve(self.path), device=device, expected_version=expected_version)
        self.swaps = 0

    @property
    def version(self) -> str:
        return self._scorer.version

    def current(self) -> CtrScorer:
        """The scorer to use for the next batch (cheap: a stat at most every ``poll_seconds``)."""
        if not self.watching or time.monotonic() - self._checked_at < self.poll_seconds:
            return self._scorer
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                pointer = read_pointer(self.path)
            except ModelLoadError as exc:
                log.error("model registry unreadable, keeping model %s: %s", self._scorer.version, exc)
                return self._scorer
            if pointer == self._pointer:
                return self._scorer
            try:
                scorer = load_ctr(self.path / pointer, device=self.device)
            except ModelLoadError as exc:
                log.error(
                    "promoted model %s cannot be loaded, keeping model %s: %s", pointer, self._scorer.version, exc
                )
                self._pointer = pointer  # do not retry a broken artifact every poll; a new promotion will
                return self._scorer
            log.warning(
                "model promoted: now scoring with %s (was %s)",
                scorer.version,
                self._scorer.version,
                extra={"model_version": scorer.version, "previous_model_version": self._scorer.version},
            )
            self._pointer, self._scorer = pointer, scorer
            self.swaps += 1
            return scorer


def add(root: str | Path, artifact: str | Path, *, make_current: bool = False) -> str:
    """Move a freshly exported ``artifact`` directory into the registry as ``root/<version>``.

    The registry's first model becomes current on its own; later ones only with ``make_current``
    (promotion is a decision, not a side effect of training).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    scorer = load_ctr(artifact)  # verified before it can be promoted
    dest = root / scorer.version
    if dest.exists():
        load_ctr(dest, expected_version=scorer.version)  # the same model, already registered
    else:
        os.replace(artifact, dest)
    if make_current or not is_registry(root):
        promote(root, scorer.version)
    return scorer.version
