"""Reading a commit's own record to skip its change feed (transforms/delta_lineage.py)."""

from __future__ import annotations

from typing import Any

import pytest

from transforms.delta_lineage import deleted_nothing


def _commit(operation: str, *, mode: str | None = None, **metrics: str) -> dict[str, Any]:
    return {
        "operation": operation,
        "operation_parameters": {"mode": mode} if mode else {},
        "operation_metrics": metrics,
    }


@pytest.mark.parametrize(
    ("commit", "nothing"),
    [
        (_commit("WRITE", mode="Append", numOutputRows="19900"), True),
        (_commit("WRITE", mode="Overwrite", numOutputRows="19900"), False),
        (_commit("MERGE", numTargetRowsDeleted="0", numTargetRowsUpdated="12"), True),
        (_commit("MERGE", numTargetRowsDeleted="3"), False),
        (_commit("MERGE"), False),  # no metrics: not known, so the feed is read
        (_commit("DELETE", numDeletedRows="0"), False),
        ({}, False),
    ],
    ids=["append", "overwrite", "merge-no-deletes", "merge-deletes", "merge-no-metrics", "other-op", "empty"],
)
def test_only_a_commit_known_to_delete_nothing_skips_the_change_feed(commit: dict[str, Any], nothing: bool) -> None:
    assert deleted_nothing(commit) is nothing
