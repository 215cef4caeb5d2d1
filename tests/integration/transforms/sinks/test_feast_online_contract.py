"""Contract of the Feast online sink, run unchanged against every online store it supports.

Each test states one promise the embedding backfill relies on (exact vectors, idempotent upserts,
ordered lookups with holes for unknown ids, a clear error when the store is down) and must hold for
SQLite and Redis alike, as Feast's own universal online-store tests do.
"""

from __future__ import annotations

import pickle
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from schemas.embeddings import embeddings_schema, embeddings_storage_schema
from transforms.errors import SinkError
from transforms.sinks.feast_online import (
    WRITE_CHUNK_ROWS,
    FeastConfig,
    FeastOnlineSink,
    RedisOnlineStoreConfig,
    _float_list_prefix,
)

DIM = 16
T0 = datetime(2026, 1, 1, tzinfo=UTC)

SinkFactory = Callable[..., FeastOnlineSink]


def _batch(
    ids: list[str],
    vectors: np.ndarray,
    *,
    model_version: str = "m1",
    source_version: int = 1,
    processed_at: datetime = T0,
    fixed: bool = True,
) -> pa.Table:
    """Rows in the embeddings schema: the core's fixed-size vectors, or Delta/Spark's plain lists."""
    n = len(ids)
    schema = embeddings_schema(DIM) if fixed else embeddings_storage_schema(DIM)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32())
    vector_col: pa.Array = pa.FixedSizeListArray.from_arrays(flat, DIM)
    if not fixed:
        vector_col = vector_col.cast(pa.list_(pa.float32()))
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            vector_col,
            pa.array(["all-MiniLM-L6-v2"] * n),
            pa.array([model_version] * n),
            pa.array([source_version] * n, pa.int64()),
            pa.array([processed_at] * n, pa.timestamp("us", tz="UTC")),
        ],
        schema=schema,
    )


def _vectors(n: int, seed: int) -> np.ndarray:
    # Values with full float32 mantissas, negative ones and tiny ones: a lossy float path shows up.
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM)) * 10.0 ** rng.integers(-6, 3, (n, DIM))).astype(np.float32)


def _ids(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def _assert_rows(found: list[dict[str, object] | None], ids: list[str], vectors: np.ndarray, **meta: object) -> None:
    assert len(found) == len(ids)
    for row, item_id, vector in zip(found, ids, vectors, strict=True):
        assert row is not None, item_id
        assert row["item_id"] == item_id
        got = np.asarray(row["embedding"], dtype=np.float32)
        # Bitwise: the online store must hand back the model's float32s, not an approximation.
        assert got.tobytes() == vector.tobytes(), item_id
        for key, value in meta.items():
            assert row[key] == value, (item_id, key)


def _stored_item_count(sink: FeastOnlineSink, config: FeastConfig) -> int:
    """How many distinct items the store holds for this project: duplicates would show up here."""
    store = config.online_store
    if isinstance(store, RedisOnlineStoreConfig):
        import redis

        host, port = store.connection_string.split(":")
        client = redis.Redis(host=host, port=int(port))
        return sum(1 for _ in client.scan_iter(match=b"*" + config.project.encode()))
    with sqlite3.connect(store.path) as conn:
        table = f"{config.project}_{config.feature_view}"
        (count,) = conn.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{table}"').fetchone()
    return int(count)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> FeastConfig:
    """A fresh store per test: its own registry, and its own project so Redis keys never collide."""
    project = f"t{uuid.uuid4().hex[:12]}"
    if request.param == "redis":
        address = request.getfixturevalue("redis_server")
        return FeastConfig.local(
            tmp_path, project=project, online_store={"type": "redis", "connection_string": address}
        )
    return FeastConfig.local(tmp_path, project=project)


@pytest.fixture
def make_sink(store_config: FeastConfig, tmp_path: Path) -> Iterator[SinkFactory]:
    def make(write_chunk_rows: int = WRITE_CHUNK_ROWS) -> FeastOnlineSink:
        return FeastOnlineSink(
            store_config,
            embeddings_table_uri=str(tmp_path / "embeddings"),
            dim=DIM,
            write_chunk_rows=write_chunk_rows,
        )

    yield make


@pytest.fixture
def sink(make_sink: SinkFactory) -> FeastOnlineSink:
    applied = make_sink()
    applied.apply()
    return applied


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size_list", "list"])
def test_round_trip_returns_the_exact_float32_vectors(sink: FeastOnlineSink, fixed: bool) -> None:
    ids, vectors = _ids(50), _vectors(50, seed=1)

    written = sink.write(_batch(ids, vectors, model_version="m1", source_version=7, fixed=fixed))

    assert written == 50
    _assert_rows(sink.lookup(ids), ids, vectors, model_version="m1", source_version=7)


def test_record_batch_input_is_accepted(sink: FeastOnlineSink) -> None:
    ids, vectors = _ids(5), _vectors(5, seed=2)

    assert sink.write(_batch(ids, vectors).to_batches()[0]) == 5
    _assert_rows(sink.lookup(ids), ids, vectors)


def test_second_write_of_same_ids_wins_without_duplicates(sink: FeastOnlineSink, store_config: FeastConfig) -> None:
    ids = _ids(40)
    old, new = _vectors(40, seed=3), _vectors(40, seed=4)
    sink.write(_batch(ids, old, model_version="m1", source_version=1, processed_at=T0))

    sink.write(_batch(ids, new, model_version="m2", source_version=2, processed_at=T0 + timedelta(hours=1)))

    _assert_rows(sink.lookup(ids), ids, new, model_version="m2", source_version=2)
    assert _stored_item_count(sink, store_config) == 40


def test_replay_of_the_same_batch_is_harmless(sink: FeastOnlineSink, store_config: FeastConfig) -> None:
    ids, vectors = _ids(30), _vectors(30, seed=5)
    batch = _batch(ids, vectors)

    sink.write(batch)
    sink.write(batch)

    _assert_rows(sink.lookup(ids), ids, vectors)
    assert _stored_item_count(sink, store_config) == 30


def test_last_write_wins_even_with_an_older_event_time(sink: FeastOnlineSink) -> None:
    # Both stores behave alike: the sink is a plain keyed upsert, not an event-time merge.
    ids = _ids(10)
    first, second = _vectors(10, seed=6), _vectors(10, seed=7)
    sink.write(_batch(ids, first, processed_at=T0 + timedelta(days=1)))

    sink.write(_batch(ids, second, processed_at=T0))

    _assert_rows(sink.lookup(ids), ids, second)


def test_unknown_ids_are_none_and_order_follows_the_request(sink: FeastOnlineSink) -> None:
    ids, vectors = _ids(3), _vectors(3, seed=8)
    sink.write(_batch(ids, vectors))

    found = sink.lookup(["nope-1", ids[2], ids[0], "nope-2", ids[1], ids[2]])

    assert found[0] is None
    assert found[3] is None
    _assert_rows([found[1], found[2], found[4], found[5]], [ids[2], ids[0], ids[1], ids[2]], vectors[[2, 0, 1, 2]])


def test_lookup_of_nothing_is_empty(sink: FeastOnlineSink) -> None:
    assert sink.lookup([]) == []
    assert sink.lookup(["never-written"]) == [None]


def test_lookup_of_a_thousand_ids_across_a_chunk_boundary(sink: FeastOnlineSink) -> None:
    ids, vectors = _ids(1000), _vectors(1000, seed=9)
    sink.write(_batch(ids, vectors))
    order = np.random.default_rng(10).permutation(1000)
    wanted = [ids[i] for i in order] + ["missing-a", "missing-b"]

    found = sink.lookup(wanted)

    assert found[-2:] == [None, None]
    _assert_rows(found[:-2], wanted[:-2], vectors[order])


def test_multi_batch_table_in_small_chunks_writes_every_row(make_sink: SinkFactory) -> None:
    chunked = make_sink(write_chunk_rows=7)
    chunked.apply()
    ids, vectors = _ids(50), _vectors(50, seed=11)
    table = pa.concat_tables([_batch(ids[:20], vectors[:20]), _batch(ids[20:], vectors[20:])])
    assert table.column(0).num_chunks == 2

    assert chunked.write(table) == 50
    _assert_rows(chunked.lookup(ids), ids, vectors)


def test_empty_batch_writes_nothing(sink: FeastOnlineSink) -> None:
    assert sink.write(_batch([], np.zeros((0, DIM), np.float32))) == 0


def test_apply_twice_is_harmless(make_sink: SinkFactory) -> None:
    first = make_sink()
    first.apply()
    ids, vectors = _ids(10), _vectors(10, seed=12)
    first.write(_batch(ids, vectors))

    first.apply()
    again = make_sink()
    again.apply()

    _assert_rows(first.lookup(ids), ids, vectors)
    _assert_rows(again.lookup(ids), ids, vectors)


def test_pickled_sink_writes_and_reads_like_the_original(sink: FeastOnlineSink) -> None:
    # What a Spark executor receives: the sink after the driver has applied (and used) it.
    sink.lookup(["warm-up"])
    clone = pickle.loads(pickle.dumps(sink))
    ids, vectors = _ids(10), _vectors(10, seed=13)

    clone.write(_batch(ids, vectors))

    _assert_rows(sink.lookup(ids), ids, vectors)


def test_vectors_of_the_wrong_dimension_are_rejected_before_writing(sink: FeastOnlineSink) -> None:
    ids = _ids(2)
    wrong = pa.Table.from_arrays(
        [
            pa.array(ids),
            pa.array([[0.0] * DIM, [0.0] * (DIM - 1)], pa.list_(pa.float32())),
            pa.array(["m"] * 2),
            pa.array(["m1"] * 2),
            pa.array([1, 1], pa.int64()),
            pa.array([T0] * 2, pa.timestamp("us", tz="UTC")),
        ],
        schema=embeddings_storage_schema(DIM),
    )

    with pytest.raises(SinkError, match=r"row 1 has a 15-d vector, expected 16-d"):
        sink.write(wrong)
    assert sink.lookup(ids) == [None, None]


@pytest.mark.parametrize("dim", [1, 31, 32, 384, 4096])
def test_prebuilt_vector_bytes_equal_protobufs_own_encoding(dim: int) -> None:
    # The sink serialises vectors itself for speed; protobuf must parse them to the same message.
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    vector = _vectors(1, seed=dim)[0, :1].repeat(dim) * np.arange(dim, dtype=np.float32)
    expected = Value(float_list_val=FloatList(val=vector.tolist()))

    encoded = _float_list_prefix(dim) + vector.astype("<f4").tobytes()

    assert encoded == expected.SerializeToString()
    assert Value.FromString(encoded) == expected


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.redis
def test_unreachable_redis_fails_apply_at_once_with_a_one_line_sink_error(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    config = FeastConfig.local(tmp_path, online_store={"type": "redis", "connection_string": address})
    down = FeastOnlineSink(config, embeddings_table_uri=str(tmp_path / "embeddings"), dim=DIM)

    started = time.monotonic()
    with pytest.raises(SinkError) as error:
        down.apply()

    assert time.monotonic() - started < 5, "apply must not sit in the client's retry back-off"
    _assert_unreachable_message(str(error.value), address)


@pytest.mark.redis
def test_check_reachable_fails_fast_without_importing_feast(tmp_path: Path) -> None:
    """The backfill's pre-flight: the store's address is checked before any work, in well under a
    second, while Feast's own import and registration are left to run alongside the inference."""
    import subprocess
    import sys

    address = f"127.0.0.1:{_closed_port()}"
    probe = (
        "import sys\n"
        "from transforms.errors import SinkError\n"
        "from transforms.sinks.feast_online import FeastConfig, FeastOnlineSink\n"
        f"store = {{'type': 'redis', 'connection_string': {address!r}}}\n"
        f"cfg = FeastConfig.local({str(tmp_path)!r}, online_store=store)\n"
        f"sink = FeastOnlineSink(cfg, embeddings_table_uri={str(tmp_path / 'emb')!r}, dim=4)\n"
        "try:\n"
        "    sink.check_reachable()\n"
        "except SinkError as exc:\n"
        "    print(exc)\n"
        "print('feast imported' if 'feast' in sys.modules else 'feast not imported')\n"
    )
    script = tmp_path / "probe.py"
    script.write_text(probe)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=60)
    first, second = out.stdout.strip().splitlines()
    _assert_unreachable_message(first, address)
    assert second == "feast not imported"

    healthy = FeastOnlineSink(FeastConfig.local(tmp_path / "ok"), embeddings_table_uri=str(tmp_path / "e"), dim=DIM)
    healthy.check_reachable()
    assert Path(FeastConfig.local(tmp_path / "ok").registry).parent.is_dir()


@pytest.mark.redis
def test_unreachable_redis_fails_write_with_a_one_line_sink_error(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    # retry=null turns off redis-py's back-off (seconds per attempt); the error path is the same.
    config = FeastConfig.local(tmp_path, online_store={"type": "redis", "connection_string": f"{address},retry=null"})
    down = FeastOnlineSink(config, embeddings_table_uri=str(tmp_path / "embeddings"), dim=DIM)

    with pytest.raises(SinkError) as error:
        down.write(_batch(_ids(1), _vectors(1, seed=14)))

    _assert_unreachable_message(str(error.value), address)


def _assert_unreachable_message(message: str, address: str) -> None:
    assert "\n" not in message
    assert f"Feast online store redis at {address} is unreachable" in message
    assert message.endswith("start redis-server or fix feast.online_store.connection_string")


def test_sqlite_write_before_apply_says_to_apply(tmp_path: Path) -> None:
    config = FeastConfig.local(tmp_path)
    Path(config.registry).parent.mkdir(parents=True)
    unapplied = FeastOnlineSink(config, embeddings_table_uri=str(tmp_path / "embeddings"), dim=DIM)

    with pytest.raises(SinkError, match=r"call FeastOnlineSink\.apply\(\) first") as error:
        unapplied.write(_batch(_ids(1), _vectors(1, seed=15)))
    assert "\n" not in str(error.value)
