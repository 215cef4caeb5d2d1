"""Feast online-store sinks: the store's config, the writer every view shares, and the embeddings view.

:class:`FeastViewSink` is one feature view's keyed upsert into a Feast online store; the embedding
backfill's :class:`FeastOnlineSink` (keyed by ``item_id``) is defined here, the ad-scoring job's
``FeastScoresSink`` (keyed by ``user_id`` and ``ad_id``) in :mod:`transforms.sinks.feast_scores`.

Writes go straight to Feast's provider (``Provider.online_write_batch``) with protos built from
Arrow, not through ``FeatureStore.write_to_online_store``: the pandas path costs about four times
as much per row, and the job's whole Feast write must fit in a tenth of the model's time. The Redis
profile goes further: its store is sluice's :mod:`transforms.sinks.feast_redis_store` (Feast's
Redis store with a vectorised write; same keys and bytes, so serving clients read it with stock
``type: redis``), which takes the Arrow rows themselves, so no proto is built per row at all.
Writes use the feature view built in code by :mod:`transforms.sinks.feast_repo`, so an executor
never reads the registry; only ``apply`` and ``lookup`` do.

Both adapters are *last write wins* per entity key: SQLite always overwrites, and Redis runs with
Feast's ``skip_dedup`` so it does too (Feast's default Redis path silently drops a write whose
event time is not newer than the stored one, which SQLite never does). A replay writes the same
values again, so it is harmless; ordering writes is the job's business, not the store's.

Importing this module needs neither Feast nor redis: the configs are read by the job's config
loader on machines that may not have the ``[feast]`` extra.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from schemas.embeddings import KEY_COLUMN, VECTOR_COLUMN
from transforms.errors import ConfigError, SinkError
from transforms.sinks.feast_repo import (
    EVENT_TIMESTAMP_COLUMN,
    FEATURES,
    MODEL_VERSION_FEATURE,
    SOURCE_VERSION_FEATURE,
    build_definitions,
)

if TYPE_CHECKING:
    from feast import Entity, FeatureStore, FeatureView, RepoConfig
    from feast.infra.provider import Provider
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    from transforms.sinks.feast_redis_store import SluiceRedisOnlineStore

#: Rows per ``online_write_batch`` call. Small enough that a SQLite transaction holds the file lock
#: for tens of milliseconds (other executors' writers wait, they do not fail) and a Redis pipeline
#: stays a few MB; large enough that the per-call overhead is noise.
WRITE_CHUNK_ROWS = 2_000
#: Ids per ``get_online_features`` call; keeps SQLite's ``IN (?, ...)`` far under its variable cap.
LOOKUP_CHUNK_IDS = 1_000

_DEFAULT_REGISTRY = "data/feast/registry.db"
#: What the Redis profile's ``type: redis`` becomes in Feast's config: sluice's Redis store (the same
#: string as ``feast_redis_store.STORE_TYPE``, which cannot be imported here without Feast).
_SLUICE_REDIS_TYPE = "transforms.sinks.feast_redis_store.SluiceRedisOnlineStore"
_ONLINE_DB_NAME = "online.db"


def _is_string(arrow_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


def _is_float32_list(arrow_type: pa.DataType) -> bool:
    is_list = pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type)
    return bool((is_list or pa.types.is_large_list(arrow_type)) and pa.types.is_float32(arrow_type.value_type))


#: The input column types the sinks accept, by the name messages give them.
_ACCEPTED_TYPES: dict[str, Callable[[pa.DataType], bool]] = {
    "string": _is_string,
    "float32": pa.types.is_float32,
    "a list of float32": _is_float32_list,
    "int32": pa.types.is_integer,
    "int64": pa.types.is_integer,
    "timestamp": pa.types.is_timestamp,
}


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
    """Where features go online. The defaults match ``infra/feast`` run from the repo root.

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
    #: The embeddings view (the backfill) and its entity.
    entity: str = Field(default="item", pattern=_NAME_PATTERN)
    feature_view: str = Field(default="item_embeddings", pattern=_NAME_PATTERN)
    #: The scores view (the ad-scoring job); its entities are always ``user`` and ``ad``.
    scores_feature_view: str = Field(default="ad_scores", pattern=_NAME_PATTERN)

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

    @classmethod
    def next_to(cls, table_uri: str, **overrides: Any) -> FeastConfig:
        """:meth:`local` beside a job's target table (``data/`` for a remote one): where the CLI's
        jobs keep Feast unless their config says otherwise."""
        return cls.local(Path("data") if _is_uri(table_uri) else Path(table_uri).parent, **overrides)

    @classmethod
    def for_table(cls, table_uri: str, given: Mapping[str, Any] | None = None) -> FeastConfig:
        """The keys a user set (``given``: a config's ``feast`` section) over :meth:`next_to`.

        A section that names only a view, a project or a Redis store keeps the registry beside the
        table, where the job's lookups look; one that names a registry is taken as it is.
        """
        fields = dict(given or {})
        if "registry" in fields:
            return cls.model_validate(fields)
        return cls.next_to(table_uri, **fields)

    @classmethod
    def from_file(cls, path: Path | None, *, table_uri: str) -> FeastConfig:
        """:meth:`for_table` from the ``feast`` section of a job's YAML config (lookups read the
        job's own config file, so they find the store and view the job wrote); no file: the
        store beside the table."""
        import yaml
        from pydantic import ValidationError

        if path is None:
            return cls.next_to(table_uri)
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        section = document.get("feast") if isinstance(document, dict) else None
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"config {path}: feast must be a mapping")
        try:
            return cls.for_table(table_uri, section)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"config {path}: feast.{where}: {first['msg']}") from exc


#: The registry tag on a view naming the version of its table the online store holds in full.
PUBLISHED_TAG = "sluice.online_table_version"
#: Keys per DELETE statement batch: one transaction each, so a reader never waits long.
_SQLITE_DELETE_CHUNK = 10_000


def _sqlite_delete(feast: _Feast, entity_keys: Sequence[EntityKeyProto], *, n_features: int) -> int:
    """Feast's SQLite store keeps a row per (entity key, feature) in ``<project>_<view>``; the key
    is ``serialize_entity_key`` of the repo's version, exactly as its ``online_write_batch`` writes."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.sqlite import _table_id

    config = feast.repo_config
    table = _table_id(config.project, feast.view, config.registry.enable_online_feature_view_versioning)
    version = config.entity_key_serialization_version
    conn = sqlite3.connect(config.online_store.path, timeout=30)
    removed = 0
    try:
        for start in range(0, len(entity_keys), _SQLITE_DELETE_CHUNK):
            chunk = entity_keys[start : start + _SQLITE_DELETE_CHUNK]
            with conn:
                cursor = conn.executemany(
                    f'DELETE FROM "{table}" WHERE entity_key = ?',
                    [(serialize_entity_key(key, entity_key_serialization_version=version),) for key in chunk],
                )
                removed += cursor.rowcount
    finally:
        conn.close()
    # One row per feature of each entity that had a row.
    return removed // max(1, n_features)


def _same_table(a: str, b: str) -> bool:
    def norm(uri: str) -> str:
        return uri.rstrip("/") if _is_uri(uri) else os.path.normpath(os.path.abspath(uri))

    return norm(a) == norm(b)


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


def protobuf_varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int: how the wire format writes lengths."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _float_list_prefix(dim: int) -> bytes:
    """Wire-format header of ``Value{float_list_val: FloatList{val: [dim floats]}}``.

    Every vector has the same length, so the header is a constant and each row's serialized Value is
    this plus the vector's raw little-endian bytes; parsing that is a memcpy, where building the
    repeated field from Python floats costs most of the write (0.25 s vs 0.03 s for 20k x 384).
    """
    packed = b"\x0a" + protobuf_varint(4 * dim)  # FloatList.val: field 1, length-delimited (packed)
    return b"\x82\x01" + protobuf_varint(len(packed) + 4 * dim) + packed  # Value.float_list_val: field 16


class _Feast:
    """The live Feast objects of one process; never pickled, rebuilt lazily after unpickling."""

    def __init__(self, repo_config: RepoConfig, entities: Sequence[Entity], view: FeatureView) -> None:
        from feast import FeatureStore

        self.repo_config = repo_config
        self.store: FeatureStore = FeatureStore(config=repo_config)
        self.entities = list(entities)
        self.view = view
        #: The store when it takes Arrow rows directly (sluice's Redis store); else rows go as protos.
        self.arrow_store: SluiceRedisOnlineStore | None = None
        if repo_config.online_store.type == _SLUICE_REDIS_TYPE:
            from transforms.sinks.feast_redis_store import SluiceRedisOnlineStore

            store = self.provider.online_store
            self.arrow_store = store if isinstance(store, SluiceRedisOnlineStore) else None

    @property
    def provider(self) -> Provider:
        return self.store.provider


#: One row as ``Provider.online_write_batch`` takes it: key, features, event time, created time.
OnlineRow = tuple["EntityKeyProto", dict[str, "ValueProto"], datetime, datetime | None]


class FeastViewSink(abc.ABC):
    """Keyed upserts of one feature view into a Feast online store: what every sluice sink shares.

    A subclass names its view (join keys, features, the definitions from
    :mod:`transforms.sinks.feast_repo`), checks its input and turns Arrow rows into protos; the
    base owns the store: its config and reachability, registration, chunked writes through the
    provider, lookups as a serving client makes them, and one-line errors.

    Cheap to build and to pickle: Feast itself is imported and connected on first use, once per
    process, so a Spark executor can receive the sink in a closure (or build it per worker) and
    reuse one connection across partitions.
    """

    #: The view's join keys, in the order :meth:`_lookup_rows` takes key tuples.
    join_keys: tuple[str, ...]
    #: The view's features, in the order lookups return them; a row lacking the first is absent.
    features: tuple[str, ...]
    #: What input batches must follow, as error messages name it.
    input_contract: str
    #: The sluice command that registers this view and fills it, as error messages name it.
    publisher: str

    def __init__(
        self, config: FeastConfig, *, table_uri: str, feature_view: str, write_chunk_rows: int = WRITE_CHUNK_ROWS
    ) -> None:
        if write_chunk_rows <= 0:
            raise SinkError(f"Feast sink write_chunk_rows must be positive, got {write_chunk_rows}")
        store = config.online_store
        if isinstance(store, SqliteOnlineStoreConfig):
            store = store.model_copy(update={"path": _absolute(store.path)})
        self._config = config.model_copy(update={"registry": _absolute(config.registry), "online_store": store})
        self._table_uri = table_uri
        self._view_name = feature_view
        self._chunk_rows = write_chunk_rows
        self._feast: _Feast | None = None

    # -- what a view supplies ------------------------------------------------------------------

    @abc.abstractmethod
    def _definitions(self) -> tuple[list[Entity], FeatureView]:
        """The view's entities and feature view, from :mod:`transforms.sinks.feast_repo`."""

    @abc.abstractmethod
    def _prepared(self, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
        """The rows to write, once all of ``batch`` is known to be writable (else a SinkError).

        Their columns are named as the view's join keys, features and timestamp field: sluice's Redis
        store writes them as they are.
        """

    @abc.abstractmethod
    def _to_protos(self, chunk: pa.RecordBatch) -> list[OnlineRow]:
        """The rows of one chunk of :meth:`_prepared`'s output as the provider takes them (every
        store but sluice's Redis one, which takes the chunk itself)."""

    # -- pickling: ship the config, never the connections -------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_feast"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- public API -----------------------------------------------------------------------------

    @property
    def config(self) -> FeastConfig:
        """The configuration this sink writes with (paths made absolute on the driver)."""
        return self._config

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
            # sluice's Redis store: Feast's, with a vectorised write of the same bytes. skip_dedup:
            # last write wins, like SQLite, and one round trip instead of two.
            online = {"type": _SLUICE_REDIS_TYPE, "connection_string": store.connection_string, "skip_dedup": True}
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
        """Register the entities and feature view, create the store's tables, and prove it answers.

        Idempotent; must finish before the first :meth:`write`. Includes :meth:`check_reachable`.
        """
        self.check_reachable()
        feast = self._live()
        self._check_view_serves_this_table(feast)
        # Registering starts a new round of writes: the store no longer holds any one table version.
        feast.view.tags.pop(PUBLISHED_TAG, None)
        with self._translate_errors("registering the feature view"):
            feast.store.apply([*feast.entities, feast.view], partial=True)
        with self._translate_errors("reading back from the store"):
            probe = self._entity_key(["__sluice_connectivity_probe__"] * len(self.join_keys))
            feast.provider.online_read(feast.repo_config, feast.view, [probe], [self.features[0]])

    def published_version(self) -> int | None:
        """The version of the table the online store was last marked as holding in full
        (:meth:`mark_published`), or None: never marked, or writes began since."""
        feast = self._live()
        self._check_view_serves_this_table(feast)
        registered = self._registered_view(feast)
        raw = registered.tags.get(PUBLISHED_TAG) if registered is not None else None
        return int(raw) if raw is not None and raw.isdigit() else None

    def mark_published(self, table_version: int) -> None:
        """Record in the registry, once every write and delete for it is done, that the store holds
        ``table_version`` of the table: a re-run with nothing new then has nothing to rewrite. A
        crash before this leaves the older mark, so the next run rewrites (and re-deletes) instead."""
        feast = self._live()
        feast.view.tags[PUBLISHED_TAG] = str(int(table_version))
        with self._translate_errors("recording the published table version"):
            feast.store.apply([*feast.entities, feast.view], partial=True)

    def _registered_view(self, feast: _Feast) -> FeatureView | None:
        from feast.errors import FeatureViewNotFoundException

        try:
            with self._translate_errors("reading the registry"):
                return feast.store.get_feature_view(self._view_name, allow_registry_cache=False)
        except SinkError as exc:
            if isinstance(exc.__cause__, FeatureViewNotFoundException):
                return None
            raise

    def _check_view_serves_this_table(self, feast: _Feast) -> None:
        """Refuse to re-point a registered view at another table.

        A view serves one table: its online rows are that table's, and its batch source is what
        ``feast materialize`` rebuilds them from. Two targets next to each other share the default
        registry and view name, and applying silently moved the view to the second table while
        its rows overwrote the first's, so lookups for the first served the second's vectors.
        """
        registered = self._registered_view(feast)
        if registered is None:
            return
        theirs = getattr(registered.batch_source, "path", None)
        if theirs is None or _same_table(theirs, self._table_uri):
            return
        raise SinkError(
            f"Feast feature view {self._view_name!r} in registry {self._config.registry} already serves {theirs}, "
            f"not {self._table_uri}: give this table its own view (feast.feature_view or feast.registry), or, "
            f"if the table moved, delete the view first (FeatureStore.delete_feature_view)"
        )

    def write(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Upsert the rows of ``batch``; returns the number of rows written to the store."""
        if batch.num_rows == 0:
            return 0
        rows_to_write = self._prepared(batch)
        feast = self._live()
        written = 0
        for chunk in _chunks(rows_to_write, self._chunk_rows):
            if feast.arrow_store is not None:
                with self._translate_errors("writing"):
                    feast.arrow_store.online_write_arrow(feast.repo_config, feast.view, chunk)
                written += chunk.num_rows
                continue
            rows = self._to_protos(chunk)
            with self._translate_errors("writing"):
                feast.provider.online_write_batch(feast.repo_config, feast.view, rows, progress=None)
            written += len(rows)
        return written

    def _delete_keys(self, keys: Sequence[Sequence[str]]) -> int:
        """Remove this view's rows of these keys (values in :attr:`join_keys` order) from the store;
        returns how many had one. Unknown keys are no error, so a replay is harmless.

        Feast's online-store API has no per-entity delete; the two stores sluice supports get one
        here, removing exactly the rows their writes create and nothing of other views.
        """
        if not keys:
            return 0
        feast = self._live()
        self._check_view_serves_this_table(feast)
        entity_keys = [self._entity_key(list(key)) for key in keys]
        if feast.arrow_store is not None:
            with self._translate_errors("deleting"):
                return feast.arrow_store.online_delete(feast.repo_config, feast.view, entity_keys)
        store = self._config.online_store
        if not isinstance(store, SqliteOnlineStoreConfig):
            raise SinkError(f"Feast online store {self.store_description}: deleting rows is not supported")
        with self._translate_errors("deleting"):
            return _sqlite_delete(feast, entity_keys, n_features=len(self.features))

    # -- for subclasses ---------------------------------------------------------------------------

    def _lookup_rows(
        self, keys: Sequence[Sequence[str]], *, timestamp_column: str | None = None
    ) -> list[dict[str, Any] | None]:
        """The stored row of each key (its values in :attr:`join_keys` order), in order; ``None``
        where the store has nothing for it.

        Goes through ``get_online_features`` and hence the registry, exactly as a serving client
        would, so it checks what users will read rather than what the sink meant to write. Rows hold
        the join keys, then the features; with ``timestamp_column``, also the row's event time, in
        whole seconds (all Feast's SQLite store keeps, and what its ``to_dict`` serves from Redis).
        """
        self._require_local_registry()
        feast = self._live()
        # A view registered for another table would answer with that table's rows.
        self._check_view_serves_this_table(feast)
        refs = [f"{self._view_name}:{name}" for name in self.features]
        out: list[dict[str, Any] | None] = []
        for start in range(0, len(keys), LOOKUP_CHUNK_IDS):
            chunk = keys[start : start + LOOKUP_CHUNK_IDS]
            entity_rows = {name: [str(key[i]) for key in chunk] for i, name in enumerate(self.join_keys)}
            with self._translate_errors("looking up features", reading=True):
                found = feast.store.get_online_features(features=refs, entity_rows=entity_rows)
                columns = found.to_dict()
            present = columns[self.features[0]]
            stamps = None
            if timestamp_column is not None:
                names = list(found.proto.metadata.feature_names.val)
                stamps = found.proto.results[names.index(self.features[0])].event_timestamps
            for pos in range(len(chunk)):
                if present[pos] is None:
                    out.append(None)
                    continue
                row: dict[str, Any] = {name: entity_rows[name][pos] for name in self.join_keys}
                row.update({name: columns[name][pos] for name in self.features})
                if stamps is not None and timestamp_column is not None:
                    # Whole seconds from every store: Feast's SQLite store keeps no more.
                    row[timestamp_column] = datetime.fromtimestamp(stamps[pos].seconds, UTC)
                out.append(row)
        return out

    def _require_local_registry(self) -> None:
        """Refuse a read from a local registry that does not exist, before Feast is imported.

        Feast would write an empty registry file there and then report the view missing, seconds
        later: a lookup pointed at the wrong place would leave a store behind it.
        """
        registry = self._config.registry
        if not _is_uri(registry) and not Path(registry).exists():
            raise SinkError(
                f"Feast online store {self.store_description}: no registry at {registry}, so nothing has been "
                f"published for {self._table_uri} there: {self._publish_first}"
            )

    @property
    def _publish_first(self) -> str:
        return (
            f"run {self.publisher} for it first, or point at the store it published to "
            "(--config with the job's feast section: feast.registry, feast.feature_view)"
        )

    def _check_columns(self, batch: pa.RecordBatch | pa.Table, expected: dict[str, str]) -> None:
        """Fail unless ``batch`` has each expected column (name: type, as ``_ACCEPTED_TYPES`` names
        it), of an accepted type, without nulls.

        Checked up front, not per chunk, so a bad row fails the write before any row of it is sent.
        """
        schema = batch.schema
        missing = [name for name in expected if name not in schema.names]
        if missing:
            raise self._input_error(f"lacks column(s) {', '.join(missing)}")
        for name, wanted in expected.items():
            actual = schema.field(name).type
            if not _ACCEPTED_TYPES[wanted](actual):
                raise self._input_error(f"has {name} of type {actual}, not {wanted}")
        for name in expected:
            if batch.column(name).null_count:
                raise self._input_error(f"has nulls in {name} (such rows belong in the quarantine table)")

    def _input_error(self, what: str) -> SinkError:
        return SinkError(
            f"Feast online store {self.store_description}: input batch {what}; it must follow {self.input_contract}"
        )

    def _entity_key(self, values: Sequence[str]) -> EntityKeyProto:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        return EntityKeyProto(
            join_keys=list(self.join_keys), entity_values=[ValueProto(string_val=value) for value in values]
        )

    @staticmethod
    def _interned(column: pa.Array, field: str) -> list[ValueProto]:
        """One ``Value`` proto per distinct value, shared by every row that has it.

        A batch has one model version (and one source version or scoring time), so a handful of
        protos serve all rows, and the per-row cost is a list lookup done in C.
        """
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        encoded = pc.dictionary_encode(column)
        protos = [ValueProto(**{field: value}) for value in encoded.dictionary.to_pylist()]
        return list(map(protos.__getitem__, encoded.indices.to_pylist()))

    @staticmethod
    def _utc_datetimes(column: pa.Array) -> list[datetime]:
        """Aware UTC datetimes, built once per distinct value (naive ones are UTC by the schemas)."""
        encoded = pc.dictionary_encode(column)
        stamps = [_as_utc(ts) for ts in encoded.dictionary.to_pylist()]
        return list(map(stamps.__getitem__, encoded.indices.to_pylist()))

    # -- internals --------------------------------------------------------------------------------

    def _live(self) -> _Feast:
        if self._feast is None:
            try:
                with self._translate_errors("configuring Feast"):
                    self._feast = _Feast(self.repo_config(), *self._definitions())
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

    @contextlib.contextmanager
    def _translate_errors(self, doing: str, *, reading: bool = False) -> Iterator[None]:
        try:
            yield
        except SinkError:
            raise
        except Exception as exc:
            raise self._sink_error(doing, exc, reading=reading) from exc

    def _sink_error(self, doing: str, exc: Exception, *, reading: bool = False) -> SinkError:
        """One line for the error; ``reading``: a serving-side read (a lookup), whose user fixes a
        missing view by running the job that publishes it, not by calling :meth:`apply`."""
        where = f"Feast online store {self.store_description}"
        detail = f"{type(exc).__name__}: {exc}"
        unapplied = self._publish_first if reading else f"call {type(self).__name__}.apply() first"
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
            return SinkError(f"{where} has no table for feature view {self._view_name} ({exc}): {unapplied}")
        if isinstance(exc, sqlite3.Error):
            return SinkError(f"{where} failed while {doing} ({detail}): check the file is writable and not corrupt")
        if _is_feast_not_found(exc):
            return SinkError(
                f"{where}: feature view {self._view_name} is not in registry "
                f"{self._config.registry} ({detail}): {unapplied}"
            )
        return SinkError(f"{where} failed while {doing} ({detail})")


class FeastOnlineSink(FeastViewSink):
    """Upserts embeddings into a Feast online store, keyed by ``item_id`` (the embedding backfill)."""

    join_keys = (KEY_COLUMN,)
    features = FEATURES
    publisher = "`sluice backfill`"

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
        super().__init__(
            config,
            table_uri=embeddings_table_uri,
            feature_view=config.feature_view,
            write_chunk_rows=write_chunk_rows,
        )
        self._dim = dim
        self._vector_prefix = _float_list_prefix(dim)
        self.input_contract = f"schemas.embeddings.embeddings_schema({dim})"

    def lookup(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The stored row of each id, in order; ``None`` where the store has nothing for the id."""
        if isinstance(ids, str):
            raise TypeError("lookup takes a sequence of ids, not one id string")
        rows = self._lookup_rows([(item_id,) for item_id in ids])
        for row in rows:
            if row is not None:
                row[VECTOR_COLUMN] = [float(x) for x in row[VECTOR_COLUMN]]
        return rows

    def delete(self, ids: Sequence[str]) -> int:
        """Remove these items' rows (items deleted from the embeddings table); returns how many the
        store had. Other views' rows of the same items stay."""
        if isinstance(ids, str):
            raise TypeError("delete takes a sequence of ids, not one id string")
        return self._delete_keys([(item_id,) for item_id in ids])

    def _definitions(self) -> tuple[list[Entity], FeatureView]:
        entity, view = build_definitions(
            embeddings_table_uri=self._table_uri,
            dim=self._dim,
            entity_name=self._config.entity,
            feature_view_name=self._view_name,
        )
        return [entity], view

    def _prepared(self, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
        self._check_columns(
            batch,
            {
                KEY_COLUMN: "string",
                VECTOR_COLUMN: "a list of float32",
                MODEL_VERSION_FEATURE: "string",
                SOURCE_VERSION_FEATURE: "int64",
                EVENT_TIMESTAMP_COLUMN: "timestamp",
            },
        )
        vector_type = batch.schema.field(VECTOR_COLUMN).type
        if pa.types.is_fixed_size_list(vector_type):
            if vector_type.list_size != self._dim:
                raise self._input_error(f"has {vector_type.list_size}-d vectors, not {self._dim}-d")
        else:
            lengths = np.asarray(pc.list_value_length(batch.column(VECTOR_COLUMN)))
            bad = np.flatnonzero(lengths != self._dim)
            if bad.size:
                raise self._input_error(
                    f"row {int(bad[0])} has a {int(lengths[bad[0]])}-d vector, expected {self._dim}-d"
                )
        return batch

    def _to_protos(self, chunk: pa.RecordBatch) -> list[OnlineRow]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        vectors = self._vectors(chunk.column(VECTOR_COLUMN))
        ids = chunk.column(KEY_COLUMN).to_pylist()
        times = self._utc_datetimes(chunk.column(EVENT_TIMESTAMP_COLUMN))
        model_versions = self._interned(chunk.column(MODEL_VERSION_FEATURE), "string_val")
        source_versions = self._interned(chunk.column(SOURCE_VERSION_FEATURE), "int64_val")
        prefix = self._vector_prefix
        rows: list[OnlineRow] = []
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


def _chunks(batch: pa.RecordBatch | pa.Table, rows: int) -> Iterator[pa.RecordBatch]:
    # Tables come from several batches; Feast's own Arrow path keeps only the first of them.
    batches = batch.to_batches(max_chunksize=rows) if isinstance(batch, pa.Table) else [batch]
    for part in batches:
        for start in range(0, part.num_rows, rows):
            yield part.slice(start, rows)


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
