"""Contract of the Feast online sinks, run unchanged against every online store they support.

Each test states one promise a job relies on and must hold for SQLite and Redis alike, as Feast's
own universal online-store tests do. The embedding backfill's sink: exact vectors, idempotent
upserts, ordered lookups with holes for unknown ids. The ad-scoring job's sink: exact scores and
model versions, the latest score per (user, ad) within a batch and across batches, harmless
replays, holes for unknown pairs. Both: a clear one-line error when the store is down or unapplied.
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
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pytest

from schemas.embeddings import embeddings_schema, embeddings_storage_schema
from schemas.scores import SCORES_SCHEMA
from transforms.errors import SinkError
from transforms.sinks.feast_online import (
    WRITE_CHUNK_ROWS,
    FeastConfig,
    FeastOnlineSink,
    FeastViewSink,
    RedisOnlineStoreConfig,
    _float_list_prefix,
)
from transforms.sinks.feast_scores import FeastScoresSink

DIM = 16
T0 = datetime(2026, 1, 1, tzinfo=UTC)
#: Recent (the scores view has a TTL), with microseconds, which lookups drop: Feast's SQLite store
#: keeps event times in whole seconds, and both stores must serve the same.
SCORED_AT = datetime.now(UTC).replace(microsecond=654321)

SinkFactory = Callable[..., FeastOnlineSink]
ScoresSinkFactory = Callable[..., FeastScoresSink]
ViewSink = TypeVar("ViewSink", bound=FeastViewSink)


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


def _stored_item_count(sink: FeastViewSink, config: FeastConfig) -> int:
    """How many distinct entity keys the store holds for this project (one view per test's project):
    duplicates would show up here."""
    store = config.online_store
    if isinstance(store, RedisOnlineStoreConfig):
        import redis

        host, port = store.connection_string.split(":")
        client = redis.Redis(host=host, port=int(port))
        return sum(1 for _ in client.scan_iter(match=b"*" + config.project.encode()))
    view = config.scores_feature_view if isinstance(sink, FeastScoresSink) else config.feature_view
    with sqlite3.connect(store.path) as conn:
        (count,) = conn.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{config.project}_{view}"').fetchone()
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


def _applied(sink: ViewSink) -> ViewSink:
    sink.apply()
    return sink


@pytest.fixture
def sink(make_sink: SinkFactory) -> FeastOnlineSink:
    return _applied(make_sink())


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


def _sink_of_kind(kind: str, config: FeastConfig, tmp_path: Path) -> FeastViewSink:
    if kind == "scores":
        return FeastScoresSink(config, scores_table_uri=str(tmp_path / "scores"))
    return FeastOnlineSink(config, embeddings_table_uri=str(tmp_path / "embeddings"), dim=DIM)


def _one_row_of_kind(kind: str) -> pa.Table:
    if kind == "scores":
        return _score_rows([("user-0", "ad-0")], [7])
    return _batch(_ids(1), _vectors(1, seed=14))


SINK_KINDS = pytest.mark.parametrize("kind", ["embeddings", "scores"])


@pytest.mark.redis
@SINK_KINDS
def test_unreachable_redis_fails_apply_at_once_with_a_one_line_sink_error(tmp_path: Path, kind: str) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    config = FeastConfig.local(tmp_path, online_store={"type": "redis", "connection_string": address})
    down = _sink_of_kind(kind, config, tmp_path)

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
@SINK_KINDS
def test_unreachable_redis_fails_write_with_a_one_line_sink_error(tmp_path: Path, kind: str) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    # retry=null turns off redis-py's back-off (seconds per attempt); the error path is the same.
    config = FeastConfig.local(tmp_path, online_store={"type": "redis", "connection_string": f"{address},retry=null"})
    down = _sink_of_kind(kind, config, tmp_path)

    with pytest.raises(SinkError) as error:
        down.write(_one_row_of_kind(kind))

    _assert_unreachable_message(str(error.value), address)


def _assert_unreachable_message(message: str, address: str) -> None:
    assert "\n" not in message
    assert f"Feast online store redis at {address} is unreachable" in message
    assert message.endswith("start redis-server or fix feast.online_store.connection_string")


@SINK_KINDS
def test_sqlite_write_before_apply_says_to_apply(tmp_path: Path, kind: str) -> None:
    config = FeastConfig.local(tmp_path)
    Path(config.registry).parent.mkdir(parents=True)
    unapplied = _sink_of_kind(kind, config, tmp_path)

    with pytest.raises(SinkError, match=rf"call {type(unapplied).__name__}\.apply\(\) first") as error:
        unapplied.write(_one_row_of_kind(kind))
    assert "\n" not in str(error.value)


def _lookup_one_of_kind(sink: FeastViewSink) -> list[dict[str, object] | None]:
    if isinstance(sink, FeastScoresSink):
        return sink.lookup([("user-0", "ad-0")])
    assert isinstance(sink, FeastOnlineSink)
    return sink.lookup(_ids(1))


_PUBLISHER = {"embeddings": "`sluice backfill`", "scores": "`sluice score-stream`"}


def _assert_names_the_job(message: str, kind: str, what: str) -> None:
    """One line saying what is missing and which sluice command publishes it, in a reader's words."""
    assert "\n" not in message
    assert what in message
    assert f"run {_PUBLISHER[kind]} for it first" in message
    assert "apply()" not in message


@SINK_KINDS
def test_lookup_where_nothing_was_published_says_which_job_to_run_and_creates_nothing(
    store_config: FeastConfig, tmp_path: Path, kind: str
) -> None:
    """``sluice lookup`` pointed at a table no job has published: Feast would write an empty registry
    there and then report the view missing, in a developer's words. The reader gets one line naming
    the job to run, and the directory stays as it was."""
    before = sorted(tmp_path.rglob("*"))
    reader = _sink_of_kind(kind, store_config, tmp_path)

    with pytest.raises(SinkError) as error:
        _lookup_one_of_kind(reader)

    _assert_names_the_job(str(error.value), kind, f"no registry at {store_config.registry}")
    assert sorted(tmp_path.rglob("*")) == before


@SINK_KINDS
def test_lookup_of_a_view_the_registry_lacks_says_which_job_to_run(
    store_config: FeastConfig, tmp_path: Path, kind: str
) -> None:
    """The registry exists (the other job published to it) but holds no view of this kind."""
    other = "scores" if kind == "embeddings" else "embeddings"
    _sink_of_kind(other, store_config, tmp_path).apply()
    reader = _sink_of_kind(kind, store_config, tmp_path)

    with pytest.raises(SinkError) as error:
        _lookup_one_of_kind(reader)

    _assert_names_the_job(str(error.value), kind, f"is not in registry {store_config.registry}")


# -- the ad-scoring job's sink: latest score per (user, ad) ----------------------------------------


def _score_rows(
    pairs: list[tuple[str, str]],
    offsets: list[int],
    *,
    scores: np.ndarray | None = None,
    partition: int = 0,
    model_version: str = "ctr-1",
    scored_at: datetime = SCORED_AT,
) -> pa.Table:
    """Rows of ``SCORES_SCHEMA``, as the scoring core emits them; every row in one Kafka partition."""
    n = len(pairs)
    values = _scores(n, seed=sum(offsets)) if scores is None else scores
    return pa.Table.from_arrays(
        [
            pa.array([f"req-{partition}-{offset}" for offset in offsets]),
            pa.array([user for user, _ in pairs]),
            pa.array([ad for _, ad in pairs]),
            pa.array(offsets, pa.int64()),
            pa.array(values, pa.float32()),
            pa.array(["ctr-dlrm"] * n),
            pa.array([model_version] * n),
            pa.array(["ad-requests"] * n),
            pa.array([partition] * n, pa.int32()),
            pa.array(offsets, pa.int64()),
            pa.array([scored_at - timedelta(seconds=2)] * n, pa.timestamp("us", tz="UTC")),
            pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")),
            pa.array([scored_at.date()] * n, pa.date32()),
        ],
        schema=SCORES_SCHEMA,
    )


def _scores(n: int, seed: int) -> np.ndarray:
    # Probabilities with full float32 mantissas, and ones near 0 and 1: a lossy float path shows up.
    rng = np.random.default_rng(seed)
    return (rng.random(n) ** rng.integers(1, 8, n)).astype(np.float32)


def _pairs(n: int, prefix: str = "user") -> list[tuple[str, str]]:
    return [(f"{prefix}-{i % 7:03d}", f"ad-{i:05d}") for i in range(n)]


def _assert_scores(
    found: list[dict[str, object] | None], pairs: list[tuple[str, str]], scores: np.ndarray, **meta: object
) -> None:
    assert len(found) == len(pairs)
    for row, (user, ad), score in zip(found, pairs, scores, strict=True):
        assert row is not None, (user, ad)
        assert (row["user_id"], row["ad_id"]) == (user, ad)
        # Bitwise: the store must serve the model's float32, not an approximation of it.
        assert np.float32(row["score"]).tobytes() == np.float32(score).tobytes(), (user, ad)
        for key, value in meta.items():
            assert row[key] == value, (user, ad, key)


@pytest.fixture
def make_scores_sink(store_config: FeastConfig, tmp_path: Path) -> ScoresSinkFactory:
    def make(write_chunk_rows: int = WRITE_CHUNK_ROWS) -> FeastScoresSink:
        return FeastScoresSink(
            store_config, scores_table_uri=str(tmp_path / "scores"), write_chunk_rows=write_chunk_rows
        )

    return make


@pytest.fixture
def scores_sink(make_scores_sink: ScoresSinkFactory) -> FeastScoresSink:
    return _applied(make_scores_sink())


def test_scores_round_trip_exact_score_version_and_scoring_time(scores_sink: FeastScoresSink) -> None:
    pairs, scores = _pairs(300), _scores(300, seed=21)

    written = scores_sink.write(_score_rows(pairs, list(range(300)), scores=scores, model_version="ctr-7"))

    assert written == 300
    _assert_scores(
        scores_sink.lookup(pairs), pairs, scores, model_version="ctr-7", scored_at=SCORED_AT.replace(microsecond=0)
    )


def test_scores_keep_the_last_row_per_pair_in_offset_order_within_a_batch(
    scores_sink: FeastScoresSink, store_config: FeastConfig
) -> None:
    # Each of 20 pairs is scored 4 times; the batch arrives shuffled, so row order is not event order.
    pairs = _pairs(20) * 4
    offsets = list(range(100, 180))
    scores = _scores(80, seed=22)
    shuffle = np.random.default_rng(23).permutation(80)
    batch = _score_rows([pairs[i] for i in shuffle], [offsets[i] for i in shuffle], scores=scores[shuffle])

    written = scores_sink.write(batch)

    assert written == 20, "one online row per pair"
    _assert_scores(scores_sink.lookup(pairs[:20]), pairs[:20], scores[60:])
    assert _stored_item_count(scores_sink, store_config) == 20


def test_scores_of_a_later_batch_replace_only_the_pairs_it_has(
    scores_sink: FeastScoresSink, store_config: FeastConfig
) -> None:
    first_pairs, later_pairs = _pairs(30), _pairs(45)[15:]  # 15 pairs only in the first, 15 in both, 15 new
    first, later = _scores(30, seed=24), _scores(30, seed=25)
    scores_sink.write(_score_rows(first_pairs, list(range(30)), scores=first, model_version="ctr-1"))

    scores_sink.write(_score_rows(later_pairs, list(range(30, 60)), scores=later, model_version="ctr-2"))

    _assert_scores(scores_sink.lookup(first_pairs[:15]), first_pairs[:15], first[:15], model_version="ctr-1")
    _assert_scores(scores_sink.lookup(later_pairs), later_pairs, later, model_version="ctr-2")
    assert _stored_item_count(scores_sink, store_config) == 45


def test_scores_replay_of_a_batch_is_harmless(scores_sink: FeastScoresSink, store_config: FeastConfig) -> None:
    pairs, scores = _pairs(40) * 2, _scores(80, seed=26)
    batch = _score_rows(pairs, list(range(80)), scores=scores)

    scores_sink.write(batch)
    scores_sink.write(batch)

    _assert_scores(scores_sink.lookup(pairs[40:]), pairs[40:], scores[40:])
    assert _stored_item_count(scores_sink, store_config) == 40


def test_scores_latest_wins_across_input_and_write_chunks(make_scores_sink: ScoresSinkFactory) -> None:
    # The newest row of each pair sits in the first input chunk; writes go out 3 rows at a time.
    chunked = make_scores_sink(write_chunk_rows=3)
    chunked.apply()
    pairs, new, old = _pairs(10), _scores(10, seed=27), _scores(10, seed=28)
    table = pa.concat_tables(
        [_score_rows(pairs, list(range(50, 60)), scores=new), _score_rows(pairs, list(range(10)), scores=old)]
    )
    assert table.column(0).num_chunks == 2

    assert chunked.write(table) == 10
    _assert_scores(chunked.lookup(pairs), pairs, new)


def test_scores_unknown_pairs_are_none_and_order_follows_the_request(scores_sink: FeastScoresSink) -> None:
    pairs, scores = [("u-1", "a-1"), ("u-2", "a-2")], _scores(2, seed=29)
    scores_sink.write(_score_rows(pairs, [1, 2], scores=scores))

    # A user and an ad that each have scores, but not together, have no score as a pair.
    found = scores_sink.lookup([("u-1", "a-2"), pairs[1], ("a-1", "u-1"), pairs[0], ("nobody", "a-1"), pairs[1]])

    assert [found[0], found[2], found[4]] == [None, None, None]
    _assert_scores([found[1], found[3], found[5]], [pairs[1], pairs[0], pairs[1]], scores[[1, 0, 1]])
    assert scores_sink.lookup([]) == []


def test_scores_rows_may_carry_extra_columns_and_come_as_a_record_batch(scores_sink: FeastScoresSink) -> None:
    pairs, scores = _pairs(5), _scores(5, seed=30)
    batch = _score_rows(pairs, list(range(5)), scores=scores).to_batches()[0]
    batch = batch.append_column("debug", pa.array(["x"] * 5))

    assert scores_sink.write(batch) == 5
    _assert_scores(scores_sink.lookup(pairs), pairs, scores)


def test_scores_with_a_null_are_rejected_before_writing(scores_sink: FeastScoresSink) -> None:
    pairs = _pairs(3)
    good = _score_rows(pairs, [1, 2, 3])
    index = good.schema.get_field_index("score")
    bad = good.set_column(index, pa.field("score", pa.float32()), pa.array([0.5, None, 0.5], pa.float32()))

    with pytest.raises(SinkError, match=r"has nulls in score .* must follow schemas\.scores\.SCORES_SCHEMA"):
        scores_sink.write(bad)
    assert scores_sink.lookup(pairs) == [None, None, None]


def test_pickled_scores_sink_writes_and_reads_like_the_original(scores_sink: FeastScoresSink) -> None:
    scores_sink.lookup([("warm", "up")])
    clone = pickle.loads(pickle.dumps(scores_sink))
    pairs, scores = _pairs(10), _scores(10, seed=31)

    clone.write(_score_rows(pairs, list(range(10)), scores=scores))

    _assert_scores(scores_sink.lookup(pairs), pairs, scores)


def test_embeddings_and_scores_share_one_store_and_registry(
    make_sink: SinkFactory, make_scores_sink: ScoresSinkFactory
) -> None:
    # Each sink registers only its own objects (partial apply), so neither unregisters the other.
    embeddings, scores_sink = make_sink(), make_scores_sink()
    embeddings.apply()
    scores_sink.apply()
    ids, vectors = _ids(5), _vectors(5, seed=32)
    pairs, scores = _pairs(5), _scores(5, seed=33)
    embeddings.write(_batch(ids, vectors))
    scores_sink.write(_score_rows(pairs, list(range(5)), scores=scores))

    embeddings.apply()

    _assert_rows(embeddings.lookup(ids), ids, vectors)
    _assert_scores(make_scores_sink().lookup(pairs), pairs, scores)


def test_a_second_table_cannot_take_over_a_registered_view(store_config: FeastConfig, tmp_path: Path) -> None:
    """Two targets side by side share the default registry and view name: applying for the second
    once re-pointed the view and overwrote the first table's rows, so its lookups served another
    table's vectors. Now the second is refused, and the first's rows stay as they were."""
    first = _applied(FeastOnlineSink(store_config, embeddings_table_uri=str(tmp_path / "a" / "embeddings"), dim=DIM))
    ids, vectors = _ids(5), _vectors(5, seed=41)
    first.write(_batch(ids, vectors))
    other = tmp_path / "b" / "embeddings"

    with pytest.raises(SinkError) as err:
        FeastOnlineSink(store_config, embeddings_table_uri=str(other), dim=DIM).apply()

    message = str(err.value)
    assert "\n" not in message
    assert f"already serves {tmp_path / 'a' / 'embeddings'}, not {other}" in message
    assert "feast.feature_view" in message
    _assert_rows(first.lookup(ids), ids, vectors)
    # Its own view name makes room for it, in the same store and registry.
    own = store_config.model_copy(update={"feature_view": "item_embeddings_b"})
    _applied(FeastOnlineSink(own, embeddings_table_uri=str(other), dim=DIM))
    # The same table, named with a trailing slash or through "..", is the same table.
    _applied(FeastOnlineSink(store_config, embeddings_table_uri=f"{tmp_path}/b/../a/embeddings/", dim=DIM))


def test_a_second_scores_table_cannot_take_over_the_scores_view(
    store_config: FeastConfig, tmp_path: Path, make_scores_sink: ScoresSinkFactory
) -> None:
    make_scores_sink().apply()
    with pytest.raises(SinkError, match=r"'ad_scores' .* already serves .*/scores, not .*/elsewhere"):
        FeastScoresSink(store_config, scores_table_uri=str(tmp_path / "elsewhere")).apply()


def test_lookups_for_a_table_the_view_does_not_serve_are_refused(store_config: FeastConfig, tmp_path: Path) -> None:
    """``sluice lookup item --target B`` must not print table A's vectors as B's."""
    first = _applied(FeastOnlineSink(store_config, embeddings_table_uri=str(tmp_path / "a"), dim=DIM))
    first.write(_batch(_ids(3), _vectors(3, seed=43)))
    with pytest.raises(SinkError, match=r"already serves .*/a, not .*/b"):
        FeastOnlineSink(store_config, embeddings_table_uri=str(tmp_path / "b"), dim=DIM).lookup(_ids(3))


def test_delete_removes_exactly_the_given_items_and_a_replay_is_harmless(sink: FeastOnlineSink) -> None:
    ids, vectors = _ids(12), _vectors(12, seed=51)
    sink.write(_batch(ids, vectors))
    gone = ids[:4]

    assert sink.delete([*gone, "never-written"]) == 4
    assert sink.lookup(gone) == [None] * 4
    _assert_rows(sink.lookup(ids[4:]), ids[4:], vectors[4:])
    assert sink.delete(gone) == 0
    assert sink.delete([]) == 0
    # A deleted item written again is served again.
    sink.write(_batch(gone[:1], vectors[:1]))
    _assert_rows(sink.lookup(gone[:1]), gone[:1], vectors[:1])


def test_delete_leaves_other_views_of_the_same_items(store_config: FeastConfig, tmp_path: Path) -> None:
    """Redis keeps every view of an entity in one hash; a delete takes this view's fields only."""
    ids = _ids(6)
    a = _applied(FeastOnlineSink(store_config, embeddings_table_uri=str(tmp_path / "a"), dim=DIM))
    b_config = store_config.model_copy(update={"feature_view": "item_embeddings_b"})
    b = _applied(FeastOnlineSink(b_config, embeddings_table_uri=str(tmp_path / "b"), dim=DIM))
    a.write(_batch(ids, _vectors(6, seed=52)))
    b_vectors = _vectors(6, seed=53)
    b.write(_batch(ids, b_vectors))

    assert a.delete(ids) == 6

    assert a.lookup(ids) == [None] * 6
    _assert_rows(b.lookup(ids), ids, b_vectors)


def test_delete_of_more_ids_than_one_redis_pipeline_holds(sink: FeastOnlineSink) -> None:
    ids, vectors = _ids(5_000), _vectors(5_000, seed=54)
    sink.write(_batch(ids, vectors))
    assert sink.delete(ids[::2]) == 2_500
    found = sink.lookup(ids)
    assert [row is None for row in found] == [i % 2 == 0 for i in range(5_000)]


def test_the_published_mark_is_kept_until_the_next_round_of_writes(make_sink: SinkFactory) -> None:
    sink = make_sink()
    assert sink.published_version() is None  # nothing registered yet
    sink.apply()
    assert sink.published_version() is None
    sink.write(_batch(_ids(3), _vectors(3, seed=61)))
    sink.mark_published(7)
    assert make_sink().published_version() == 7  # read from the registry, by another process alike
    make_sink().apply()  # a new run starts writing: the store holds no one version any more
    assert sink.published_version() is None
