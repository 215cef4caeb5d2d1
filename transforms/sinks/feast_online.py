"""Feast online-store sink of the embedding backfill: a keyed upsert of each item's vector.

Writes go straight to Feast's provider (``Provider.online_write_batch``) with protos built from
Arrow, not through ``FeatureStore.write_to_online_store``: the pandas path costs about four times
as much per row, and the job's whole Feast write must fit in a tenth of the model's time. Writes
use the feature view built in code by :mod:`transforms.sinks.feast_repo`, so an executor never
reads the registry; only :meth:`FeastOnlineSink.apply` and :meth:`FeastOnlineSink.lookup` do.

Both adapters are *last write wins* per ``item_id``: SQLite always overwrites, and Redis runs with
Feast's ``skip_dedup`` so it does too (Feast's default Redis path silently drops a write whose
event time is not newer than the stored one, which SQLite never does). A replay writes the same
vectors again, so it is harmless; ordering runs is the scheduler's job, not the store's.

Importing this module needs neither Feast nor redis: the configs are read by the job's config
loader on machines that may not have the ``[feast]`` extra.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from schemas.embeddings import KEY_COLUMN, VECTOR_COLUMN
from transforms.errors import SinkError
from transforms.sinks.feast_repo import (
    EVENT_TIMESTAMP_COLUMN,
    FEATURES,
    MODEL_VERSION_FEATURE,
    SOURCE_VERSION_FEATURE,
    build_definitions,
)

if TYPE_CHECKING:
    from feast import FeatureStore, RepoConfig
    from feast.infra.provider import Provider
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

_COLUMNS = (KEY_COLUMN, *FEATURES, EVENT_TIMESTAMP_COLUMN)

#: Rows per ``online_write_batch`` call. Small enough that a SQLite transaction holds the file lock
#: for tens of milliseconds (other executors' writers wait, they do not fail) and a Redis pipeline
#: stays a few MB; large enough that the per-call overhead is noise.
WRITE_CHUNK_ROWS = 2_000
#: Ids per ``get_online_features`` call; keeps SQLite's ``IN (?, ...)`` far under its variable cap.
LOOKUP_CHUNK_IDS = 1_000

_DEFAULT_REGISTRY = "data/feast/registry.db"
_ONLINE_DB_NAME = "online.db"


class SqliteOnlineStoreConfig(BaseModel):
    """A local SQLite file; only meaningful when every writer runs on one machine (local mode)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["sqlite"] = "sqlite"
    path: str


class RedisOnlineStoreConfig(BaseModel):
    """A Redis server; ``connection_string`` is Feast's ``host:port[,key=value...]`` format."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["redis"]
    connection_string: str = "localhost:6379"


def _online_store_tag(value: Any) -> str:
    # A missing ``type`` means SQLite, the default store, so ``online_store: {path: ...}`` is enough.
    if isinstance(value, dict):
        return str(value.get("type", "sqlite"))
    return str(getattr(value, "type", "sqlite"))


OnlineStoreConfig = Annotated[
    Annotated[SqliteOnlineStoreConfig, Tag("sqlite")] | Annotated[RedisOnlineStoreConfig, Tag("redis")],
    Discriminator(_online_store_tag),
]


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_]*$"


def _default_online_store(registry: str) -> SqliteOnlineStoreConfig:
    return SqliteOnlineStoreConfig(path=_sibling_path(registry, _ONLINE_DB_NAME))


class FeastConfig(BaseModel):
    """Where the embeddings go online. The defaults match ``infra/feast`` run from the repo root.

    When ``online_store`` is left out it is a SQLite file next to the registry, so pointing the
    registry at a directory is all a local setup needs.
    """

    model_config = ConfigDict(extra="forbid")

    #: Read by the job's wiring (no sink is built when off); the sink itself ignores it.
    enabled: bool = True
    # Feast's own rule, minus hyphens: SQLite table names are ``<project>_<feature view>``.
    project: str = Field(default="sluice", pattern=_NAME_PATTERN)
    registry: str = _DEFAULT_REGISTRY
    online_store: OnlineStoreConfig = Field(
        default_factory=lambda data: _default_online_store(data.get("registry", _DEFAULT_REGISTRY))
    )
    entity: str = Field(default="item", pattern=_NAME_PATTERN)
    feature_view: str = Field(default="item_embeddings", pattern=_NAME_PATTERN)

    @classmethod
    def local(cls, data_dir: str | Path, **overrides: Any) -> FeastConfig:
        """Registry and SQLite store under ``<data_dir>/feast``, as ``infra/feast`` lays them out."""
        feast_dir = Path(data_dir) / "feast"
        fields: dict[str, Any] = {
            "registry": str(feast_dir / "registry.db"),
            "online_store": {"type": "sqlite", "path": str(feast_dir / _ONLINE_DB_NAME)},
        }
        fields.update(overrides)
        return cls.model_validate(fields)


def _is_uri(location: str) -> bool:
    # Windows drive letters parse as one-letter schemes; real URIs (s3://, gs://) have longer ones.
    return len(urlparse(location).scheme) > 1


def _sibling_path(location: str, name: str) -> str:
    # A remote registry has no local directory to sit beside; fall back to the repo's default one.
    base = Path(_DEFAULT_REGISTRY) if _is_uri(location) else Path(location)
    return str(base.parent / name)


def _absolute(location: str) -> str:
    # Resolved where the sink is built (the driver), so a pickled copy on an executor whose working
    # directory differs still writes the same file.
    return location if _is_uri(location) else str(Path(location).expanduser().resolve())


def _redis_address(connection_string: str) -> str:
    # Only host:port parts: the rest of the string may carry a password.
    nodes = [part.strip() for part in connection_string.split(",") if "=" not in part]
    return ",".join(node for node in nodes if node) or "(no host:port in connection_string)"


def _float_list_prefix(dim: int) -> bytes:
    """Wire-format header of ``Value{float_list_val: FloatList{val: [dim floats]}}``.

    Every vector has the same length, so the header is a constant and each row's serialized Value is
    this plus the vector's raw little-endian bytes; parsing that is a memcpy, where building the
    repeated field from Python floats costs most of the write (0.25 s vs 0.03 s for 20k x 384).
    """

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            low, n = n & 0x7F, n >> 7
            if n:
                out.append(low | 0x80)
            else:
                out.append(low)
                return bytes(out)

    packed = b"\x0a" + varint(4 * dim)  # FloatList.val: field 1, length-delimited (packed)
    return b"\x82\x01" + varint(len(packed) + 4 * dim) + packed  # Value.float_list_val: field 16


class _Feast:
    """The live Feast objects of one process; never pickled, rebuilt lazily after unpickling."""

    def __init__(self, repo_config: RepoConfig, embeddings_table_uri: str, dim: int, cfg: FeastConfig) -> None:
        from feast import FeatureStore

        self.repo_config = repo_config
        self.store: FeatureStore = FeatureStore(config=repo_config)
        self.entity, self.view = build_definitions(
            embeddings_table_uri=embeddings_table_uri,
            dim=dim,
            entity_name=cfg.entity,
            feature_view_name=cfg.feature_view,
        )

    @property
    def provider(self) -> Provider:
        return self.store.provider


class FeastOnlineSink:
    """Upserts embeddings into a Feast online store, keyed by ``item_id``.

    Cheap to build and to pickle: Feast itself is imported and connected on first use, once per
    process, so a Spark executor can receive the sink in a closure (or build it per worker) and
    reuse one connection across partitions.
    """

    def __init__(
        self,
        config: FeastConfig,
        *,
        embeddings_table_uri: str,
        dim: int,
        write_chunk_rows: int = WRITE_CHUNK_ROWS,
    ) -> None:
        if dim <= 0:
            raise SinkError(f"Feast sink needs a positive embedding dimension, got {dim}")
        if write_chunk_rows <= 0:
            raise SinkError(f"Feast sink write_chunk_rows must be positive, got {write_chunk_rows}")
        store = config.online_store
        if isinstance(store, SqliteOnlineStoreConfig):
            store = store.model_copy(update={"path": _absolute(store.path)})
        self._config = config.model_copy(update={"registry": _absolute(config.registry), "online_store": store})
        self._table_uri = embeddings_table_uri
        self._dim = dim
        self._chunk_rows = write_chunk_rows
        self._vector_prefix = _float_list_prefix(dim)
        self._feast: _Feast | None = None

    # -- pickling: ship the config, never the connections -------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_feast"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- public API -----------------------------------------------------------------------------

    @property
    def store_description(self) -> str:
        """How messages name the store: its kind and address, never its credentials."""
        store = self._config.online_store
        if isinstance(store, RedisOnlineStoreConfig):
            return f"redis at {_redis_address(store.connection_string)}"
        return f"sqlite at {store.path}"

    def repo_config(self) -> RepoConfig:
        """The Feast ``RepoConfig`` equivalent of ``infra/feast/feature_store.yaml``, built in code."""
        from feast import RepoConfig

        store = self._config.online_store
        online: dict[str, Any]
        if isinstance(store, RedisOnlineStoreConfig):
            # skip_dedup: last write wins, like SQLite, and one round trip instead of two.
            online = {"type": "redis", "connection_string": store.connection_string, "skip_dedup": True}
        else:
            online = {"type": "sqlite", "path": store.path}
        return RepoConfig(
            project=self._config.project,
            provider="local",
            registry=self._config.registry,
            online_store=online,
            entity_key_serialization_version=3,
        )

    def check_reachable(self) -> None:
        """Fail now, in well under a second, if the store cannot be reached or created.

        Creates the local registry/SQLite directories and PINGs Redis; Feast itself is not
        imported (that alone takes seconds), so a job can call this before any work and leave
        :meth:`apply` to run alongside it.
        """
        self._prepare_local_dirs()
        store = self._config.online_store
        if isinstance(store, RedisOnlineStoreConfig):
            with self._translate_errors("connecting"):
                _ping_redis(store.connection_string)

    def apply(self) -> None:
        """Register the entity and feature view, create the store's tables, and prove it answers.

        Idempotent; must finish before the first :meth:`write`. Includes :meth:`check_reachable`.
        """
        self.check_reachable()
        feast = self._live()
        with self._translate_errors("registering the feature view"):
            feast.store.apply([feast.entity, feast.view], partial=True)
        with self._translate_errors("reading back from the store"):
            probe = self._entity_key("__sluice_connectivity_probe__")
            feast.provider.online_read(feast.repo_config, feast.view, [probe], [MODEL_VERSION_FEATURE])

    def write(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Upsert every row of ``batch`` (embeddings schema); returns the number of rows written."""
        if batch.num_rows == 0:
            return 0
        columns = self._check_input(batch)
        feast = self._live()
        written = 0
        for chunk in _chunks(batch, self._chunk_rows):
            rows = self._to_protos(chunk, columns)
            with self._translate_errors("writing"):
                feast.provider.online_write_batch(feast.repo_config, feast.view, rows, progress=None)
            written += len(rows)
        return written

    def lookup(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The stored row of each id, in order; ``None`` where the store has nothing for the id.

        Goes through ``get_online_features`` and hence the registry, exactly as a serving client
        would, so it checks what users will read rather than what the sink meant to write.
        """
        if isinstance(ids, str):
            raise TypeError("lookup takes a sequence of ids, not one id string")
        feast = self._live()
        refs = [f"{self._config.feature_view}:{name}" for name in FEATURES]
        out: list[dict[str, Any] | None] = []
        for start in range(0, len(ids), LOOKUP_CHUNK_IDS):
            chunk = [str(i) for i in ids[start : start + LOOKUP_CHUNK_IDS]]
            with self._translate_errors("looking up features"):
                found = feast.store.get_online_features(features=refs, entity_rows={KEY_COLUMN: chunk})
                columns = found.to_dict()
            for pos, item_id in enumerate(chunk):
                vector = columns[VECTOR_COLUMN][pos]
                if vector is None:
                    out.append(None)
                    continue
                out.append(
                    {
                        KEY_COLUMN: item_id,
                        VECTOR_COLUMN: [float(x) for x in vector],
                        MODEL_VERSION_FEATURE: columns[MODEL_VERSION_FEATURE][pos],
                        SOURCE_VERSION_FEATURE: columns[SOURCE_VERSION_FEATURE][pos],
                    }
                )
        return out

    # -- internals --------------------------------------------------------------------------------

    def _live(self) -> _Feast:
        if self._feast is None:
            try:
                with self._translate_errors("configuring Feast"):
                    self._feast = _Feast(self.repo_config(), self._table_uri, self._dim, self._config)
            except SinkError as exc:
                if isinstance(exc.__cause__, ImportError):
                    raise SinkError(
                        f"Feast online store {self.store_description} needs the feast extra "
                        f"({exc.__cause__.name} is missing): pip install 'sluice[feast]'"
                    ) from exc.__cause__
                raise
        return self._feast

    def _prepare_local_dirs(self) -> None:
        # Feast creates only the last directory level of the registry and SQLite paths.
        paths = [self._config.registry]
        store = self._config.online_store
        if isinstance(store, SqliteOnlineStoreConfig):
            paths.append(store.path)
        for location in paths:
            if _is_uri(location):
                continue
            try:
                Path(location).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SinkError(
                    f"Feast online store {self.store_description}: cannot create the directory of "
                    f"{location} ({exc.strerror}): fix feast.registry / feast.online_store.path"
                ) from exc

    def _entity_key(self, item_id: str) -> EntityKeyProto:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        return EntityKeyProto(join_keys=[KEY_COLUMN], entity_values=[ValueProto(string_val=item_id)])

    def _check_input(self, batch: pa.RecordBatch | pa.Table) -> dict[str, int]:
        """Column indexes by name, once the whole batch is known to be writable.

        Checked up front, not per chunk, so a bad row fails the write before any row of it is sent.
        """

        def fail(what: str) -> SinkError:
            return SinkError(
                f"Feast online store {self.store_description}: input batch {what}; "
                f"it must follow schemas.embeddings.embeddings_schema({self._dim})"
            )

        schema = batch.schema
        missing = [name for name in _COLUMNS if name not in schema.names]
        if missing:
            raise fail(f"lacks column(s) {', '.join(missing)}")
        types = {name: schema.field(name).type for name in _COLUMNS}
        for name in (KEY_COLUMN, MODEL_VERSION_FEATURE):
            if not (pa.types.is_string(types[name]) or pa.types.is_large_string(types[name])):
                raise fail(f"has {name} of type {types[name]}, not string")
        vector_type = types[VECTOR_COLUMN]
        if not (
            pa.types.is_fixed_size_list(vector_type)
            or pa.types.is_list(vector_type)
            or pa.types.is_large_list(vector_type)
        ) or not pa.types.is_float32(vector_type.value_type):
            raise fail(f"has {VECTOR_COLUMN} of type {vector_type}, not a list of float32")
        if pa.types.is_fixed_size_list(vector_type) and vector_type.list_size != self._dim:
            raise fail(f"has {vector_type.list_size}-d vectors, not {self._dim}-d")
        if not pa.types.is_integer(types[SOURCE_VERSION_FEATURE]):
            raise fail(f"has {SOURCE_VERSION_FEATURE} of type {types[SOURCE_VERSION_FEATURE]}, not int64")
        if not pa.types.is_timestamp(types[EVENT_TIMESTAMP_COLUMN]):
            raise fail(f"has {EVENT_TIMESTAMP_COLUMN} of type {types[EVENT_TIMESTAMP_COLUMN]}, not timestamp")
        for name in _COLUMNS:
            if batch.column(name).null_count:
                raise fail(f"has nulls in {name} (such rows belong in the quarantine table)")
        if not pa.types.is_fixed_size_list(vector_type):
            lengths = np.asarray(pc.list_value_length(batch.column(VECTOR_COLUMN)))
            bad = np.flatnonzero(lengths != self._dim)
            if bad.size:
                raise fail(f"row {int(bad[0])} has a {int(lengths[bad[0]])}-d vector, expected {self._dim}-d")
        return {name: schema.get_field_index(name) for name in _COLUMNS}

    def _to_protos(
        self, chunk: pa.RecordBatch, columns: dict[str, int]
    ) -> list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        vectors = self._vectors(chunk.column(columns[VECTOR_COLUMN]))
        ids = chunk.column(columns[KEY_COLUMN]).to_pylist()
        times = [_as_utc(ts) for ts in chunk.column(columns[EVENT_TIMESTAMP_COLUMN]).to_pylist()]
        # One run has one model version and one source version, so a handful of protos serve all rows.
        model_versions = _interned(chunk.column(columns[MODEL_VERSION_FEATURE]).to_pylist(), "string_val")
        source_versions = _interned(chunk.column(columns[SOURCE_VERSION_FEATURE]).to_pylist(), "int64_val")
        prefix = self._vector_prefix
        rows: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]] = []
        for i, item_id in enumerate(ids):
            key = EntityKeyProto(join_keys=[KEY_COLUMN], entity_values=[ValueProto(string_val=item_id)])
            values = {
                VECTOR_COLUMN: ValueProto.FromString(prefix + vectors[i].tobytes()),
                MODEL_VERSION_FEATURE: model_versions[i],
                SOURCE_VERSION_FEATURE: source_versions[i],
            }
            rows.append((key, values, times[i], None))
        return rows

    def _vectors(self, column: pa.Array) -> np.ndarray:
        """The vectors as one little-endian float32 ``(rows, dim)`` matrix, without Python floats."""
        # flatten() honours the slice offset of a chunk, unlike .values.
        flat = np.asarray(column.flatten(), dtype="<f4")
        return flat.reshape(len(column), self._dim)

    @contextlib.contextmanager
    def _translate_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except SinkError:
            raise
        except Exception as exc:
            raise self._sink_error(doing, exc) from exc

    def _sink_error(self, doing: str, exc: Exception) -> SinkError:
        where = f"Feast online store {self.store_description}"
        detail = f"{type(exc).__name__}: {exc}"
        store = self._config.online_store
        if isinstance(store, RedisOnlineStoreConfig):
            redis_exceptions = _redis_exceptions()
            # AuthenticationError is a ConnectionError in redis-py, so it is tested first.
            if redis_exceptions is not None and isinstance(exc, redis_exceptions.AuthenticationError):
                return SinkError(
                    f"{where} rejected the credentials ({type(exc).__name__}): "
                    "fix the password/username in feast.online_store.connection_string"
                )
            if redis_exceptions is not None and isinstance(
                exc, redis_exceptions.ConnectionError | redis_exceptions.TimeoutError
            ):
                return SinkError(
                    f"{where} is unreachable ({detail}): start redis-server or fix feast.online_store.connection_string"
                )
        if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc):
            return SinkError(
                f"{where} has no table for feature view {self._config.feature_view} ({exc}): call "
                "FeastOnlineSink.apply() first (or run feast apply in infra/feast)"
            )
        if isinstance(exc, sqlite3.Error):
            return SinkError(f"{where} failed while {doing} ({detail}): check the file is writable and not corrupt")
        if _is_feast_not_found(exc):
            return SinkError(
                f"{where}: feature view {self._config.feature_view} is not in registry "
                f"{self._config.registry} ({detail}): call FeastOnlineSink.apply() first"
            )
        return SinkError(f"{where} failed while {doing} ({detail})")


def _chunks(batch: pa.RecordBatch | pa.Table, rows: int) -> Iterator[pa.RecordBatch]:
    # Tables come from several batches; Feast's own Arrow path keeps only the first of them.
    batches = batch.to_batches(max_chunksize=rows) if isinstance(batch, pa.Table) else [batch]
    for part in batches:
        for start in range(0, part.num_rows, rows):
            yield part.slice(start, rows)


def _interned(values: list[Any], field: str) -> list[ValueProto]:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    protos: dict[Any, ValueProto] = {}
    out: list[ValueProto] = []
    for value in values:
        proto = protos.get(value)
        if proto is None:
            proto = protos[value] = ValueProto(**{field: value})
        out.append(proto)
    return out


def _as_utc(ts: datetime) -> datetime:
    # Naive timestamps are UTC by the embeddings schema; Feast would otherwise guess per store.
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _ping_redis(connection_string: str) -> None:
    """One PING without retries, so a wrong address fails ``apply`` at once.

    Feast's client retries with backoff (redis-py's default: up to ~20 s for a refused port), which
    is right for a blip mid-write and wrong for a typo at start-up. Parses the connection string as
    Feast does: ``host:port`` parts, then ``key=value`` parts with JSON values as client kwargs.
    """
    import json

    import redis

    nodes = [part for part in connection_string.split(",") if part and "=" not in part]
    kwargs: dict[str, Any] = {}
    for part in connection_string.split(","):
        if "=" in part:
            key, raw = part.split("=", 1)
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
    host, _, port = (nodes[0] if nodes else "localhost:6379").rpartition(":")
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs["retry"] = None
    client = redis.Redis(host=host or "localhost", port=int(port), **kwargs)
    try:
        client.ping()
    finally:
        client.close()


def _redis_exceptions() -> Any:
    try:
        import redis.exceptions
    except ImportError:
        return None
    return redis.exceptions


def _is_feast_not_found(exc: Exception) -> bool:
    try:
        from feast.errors import FeatureViewNotFoundException
    except ImportError:
        return False
    return isinstance(exc, FeatureViewNotFoundException)
