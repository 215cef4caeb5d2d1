"""Pure logic of the Feast scores sink: which row of a pair is the latest, the entity keys it builds
for Feast, the scores view's definition, and its config. The store itself is the contract suite's
(tests/integration/transforms/sinks/test_feast_online_contract.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from schemas.scores import SCORES_SCHEMA
from transforms.sinks.feast_online import FeastConfig, protobuf_varint
from transforms.sinks.feast_repo import SCORES_FEATURES, SCORES_TIMESTAMP_COLUMN, build_score_definitions
from transforms.sinks.feast_scores import FeastScoresSink, _serialized_entity_keys, _varint_column, latest_per_pair

REPO_ROOT = Path(__file__).resolve().parents[3]


def _rows(users: list[str], ads: list[str], partitions: list[int], offsets: list[int]) -> pa.Table:
    return pa.table(
        {
            "user_id": users,
            "ad_id": ads,
            "partition": pa.array(partitions, pa.int32()),
            "offset": pa.array(offsets, pa.int64()),
            "tag": [f"row-{i}" for i in range(len(users))],
        }
    )


def test_latest_per_pair_keeps_the_highest_offset_whatever_the_row_order() -> None:
    rows = _rows(["u1", "u1", "u2", "u1", "u2"], ["a", "a", "a", "b", "a"], [0, 0, 1, 0, 1], [9, 3, 4, 5, 8])

    latest = latest_per_pair(rows)

    # Kept rows stay in input order: u1/a at offset 9, u1/b, u2/a at offset 8.
    assert latest.column("tag").to_pylist() == ["row-0", "row-3", "row-4"]


def test_latest_per_pair_orders_by_partition_then_offset() -> None:
    # Only after a topic is repartitioned can a pair span partitions; then the rule is still total.
    rows = _rows(["u1", "u1"], ["a", "a"], [1, 0], [2, 50])

    assert latest_per_pair(rows).column("tag").to_pylist() == ["row-0"]


def test_latest_per_pair_returns_the_input_itself_when_no_pair_repeats() -> None:
    rows = _rows(["u1", "u1", "u2"], ["a", "b", "a"], [0, 0, 0], [1, 2, 3])

    assert latest_per_pair(rows) is rows


def test_latest_per_pair_takes_record_batches_and_multi_chunk_tables() -> None:
    rows = _rows(["u1", "u2", "u1"], ["a", "a", "a"], [0, 0, 0], [7, 1, 2])
    chunked = pa.concat_tables([rows.slice(0, 1), rows.slice(1)])

    from_batch = latest_per_pair(rows.combine_chunks().to_batches()[0])
    from_table = latest_per_pair(chunked)

    assert isinstance(from_batch, pa.RecordBatch)
    assert from_batch.column("tag").to_pylist() == ["row-0", "row-1"]
    assert from_table.column("tag").to_pylist() == ["row-0", "row-1"]


@pytest.mark.parametrize(
    ("user", "ad"),
    [("u1", "a1"), ("", ""), ("é" * 70, "ad"), ("x" * 127, "y" * 128), ("z" * 20_000, "w" * 16_384)],
    ids=["short", "empty", "multibyte", "length-varint-boundary", "long"],
)
def test_entity_keys_equal_feasts_own_protos(user: str, ad: str) -> None:
    # The sink serialises entity keys itself; they must parse to the very protos Feast would build.
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    expected = EntityKey(join_keys=["ad_id", "user_id"], entity_values=[Value(string_val=ad), Value(string_val=user)])
    batch = pa.record_batch({"user_id": [user, "other"], "ad_id": [ad, "other"]})

    encoded = _serialized_entity_keys(batch.slice(0, 1)).to_pylist()[0]

    assert encoded == expected.SerializeToString()
    assert serialize_entity_key(EntityKey.FromString(encoded), 3) == serialize_entity_key(expected, 3)


def test_lookup_keys_and_written_keys_are_the_same_redis_and_sqlite_key() -> None:
    # Feast builds lookup keys from entity rows in the view's join-key order; the sink writes sorted.
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    as_read = EntityKey(join_keys=["user_id", "ad_id"], entity_values=[Value(string_val="u"), Value(string_val="a")])
    written = EntityKey.FromString(
        _serialized_entity_keys(pa.record_batch({"user_id": ["u"], "ad_id": ["a"]}))[0].as_py()
    )

    assert serialize_entity_key(written, 3) == serialize_entity_key(as_read, 3)


def test_varint_column_matches_the_scalar_encoding() -> None:
    values = np.array([0, 1, 127, 128, 255, 300, 16_383, 16_384, 2**21 - 1, 2**21, 2**28, 2**31 - 1], np.int64)

    assert _varint_column(values).to_pylist() == [protobuf_varint(int(v)) for v in values]
    assert _varint_column(np.array([], np.int64)).to_pylist() == []


def test_scores_view_is_keyed_by_user_and_ad_over_the_delta_scores_table() -> None:
    from feast.types import Float32, String

    user, ad, view = build_score_definitions(scores_table_uri="/data/scores", feature_view_name="ad_scores")

    assert (user.name, user.join_key, ad.name, ad.join_key) == ("user", "user_id", "ad", "ad_id")
    assert sorted(view.join_keys) == ["ad_id", "user_id"]
    assert {f.name: f.dtype for f in view.features} == {"score": Float32, "model_version": String}
    assert tuple(f.name for f in view.features) == SCORES_FEATURES
    assert view.batch_source.path == "/data/scores"
    assert view.batch_source.timestamp_field == SCORES_TIMESTAMP_COLUMN == "scored_at"
    assert view.ttl == timedelta(days=7)
    for column in ("user_id", "ad_id", *SCORES_FEATURES, SCORES_TIMESTAMP_COLUMN):
        assert column in SCORES_SCHEMA.names


def test_scores_feature_view_name_is_configurable_and_checked() -> None:
    assert FeastConfig().scores_feature_view == "ad_scores"
    assert FeastConfig(scores_feature_view="ad_scores_b").scores_feature_view == "ad_scores_b"
    with pytest.raises(ValidationError, match="scores_feature_view"):
        FeastConfig.model_validate({"scores_feature_view": "has-hyphen"})


def test_next_to_puts_feast_beside_the_target_table(tmp_path: Path) -> None:
    assert FeastConfig.next_to(str(tmp_path / "scores")) == FeastConfig.local(tmp_path)
    assert FeastConfig.next_to("s3://bucket/scores") == FeastConfig.local("data")


_WITHOUT_FEAST = """
import sys


class Missing:
    # As if the [feast] extra were not installed: feast and redis cannot be imported at all.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("feast", "redis"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Missing())
from transforms.sinks.feast_scores import FeastConfig, FeastScoresSink

sink = FeastScoresSink(FeastConfig.local(sys.argv[1]), scores_table_uri="scores")
sink.check_reachable()
try:
    sink.apply()
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_scores_sink_loads_and_checks_the_store_without_the_feast_extra(tmp_path: Path) -> None:
    # The scoring job's config loader and pre-flight run where the [feast] extra may be missing;
    # only registering needs it, and then the error names the extra.
    script = tmp_path / "probe.py"
    script.write_text(_WITHOUT_FEAST)

    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert out.stdout.strip().startswith("SinkError Feast online store sqlite at ")
    assert out.stdout.strip().endswith("needs the feast extra (feast is missing): pip install 'sluice[feast]'")


@pytest.mark.parametrize(
    "pairs", [("u1", "a1"), "u1", [("u1", "a1", "x")], ["ua"]], ids=["one-pair", "str", "triple", "2-char-str"]
)
def test_lookup_takes_only_a_sequence_of_pairs(pairs: object) -> None:
    sink = FeastScoresSink(FeastConfig(), scores_table_uri="s")

    with pytest.raises(TypeError, match=r"sequence of \(user_id, ad_id\) pairs"):
        sink.lookup(pairs)  # type: ignore[arg-type]
