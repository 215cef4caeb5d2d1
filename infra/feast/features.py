"""Feature definitions for ``feast apply``; the same objects the jobs' sinks apply.

Both views are defined here, because ``feast apply`` removes from the registry whatever this repo no
longer defines: the backfill's ``item_embeddings`` and the ad-scoring job's ``ad_scores``.
``SLUICE_EMBEDDINGS_TABLE`` and ``SLUICE_SCORES_TABLE`` point their batch sources at the Delta tables
(a URI, or a path relative to this directory); the vector width is the text encoder's.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import yaml

from transforms.sinks.feast_repo import build_definitions, build_score_definitions

EMBEDDING_DIM = 384
_HERE = Path(__file__).resolve().parent


def _is_uri(location: str) -> bool:
    return len(urlparse(location).scheme) > 1  # s3://, gs://, redis://...; not C:\


def _table(variable: str, default: str) -> str:
    location = os.environ.get(variable, default)
    if _is_uri(location):
        return location
    # Absolute, so the registry names the table the job writes whatever directory reads it later.
    return str((_HERE / location).resolve())


def _make_local_store_dirs() -> None:
    """Create the directories of the local registry and SQLite file named in feature_store.yaml.

    Feast creates only the last level of those paths, and ``data/`` is not in git, so a fresh
    checkout's ``feast apply`` would otherwise fail. The CLI imports this file before it opens the
    registry, which is what makes doing it here work.
    """
    config = yaml.safe_load((_HERE / "feature_store.yaml").read_text())
    registry = config.get("registry")
    paths = [registry.get("path") if isinstance(registry, dict) else registry]
    online = config.get("online_store") or {}
    if isinstance(online, dict) and online.get("type", "sqlite") == "sqlite":
        paths.append(online.get("path"))
    for location in paths:
        if isinstance(location, str) and not _is_uri(location):
            (_HERE / location).parent.mkdir(parents=True, exist_ok=True)


_make_local_store_dirs()
item, item_embeddings = build_definitions(
    embeddings_table_uri=_table("SLUICE_EMBEDDINGS_TABLE", "../../data/embeddings"), dim=EMBEDDING_DIM
)
user, ad, ad_scores = build_score_definitions(scores_table_uri=_table("SLUICE_SCORES_TABLE", "../../data/scores"))
