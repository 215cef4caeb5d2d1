"""Validation of the Feast sink's config: a typo or an unknown store must fail when the job loads
its config, not halfway through a run."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from transforms.errors import SinkError
from transforms.sinks.feast_online import (
    FeastConfig,
    FeastOnlineSink,
    RedisOnlineStoreConfig,
    SqliteOnlineStoreConfig,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_defaults_match_the_infra_feast_repo() -> None:
    config = FeastConfig()

    assert config.enabled is True
    assert config.project == "sluice"
    assert config.registry == "data/feast/registry.db"
    assert config.online_store == SqliteOnlineStoreConfig(path="data/feast/online.db")
    assert (config.entity, config.feature_view) == ("item", "item_embeddings")


def test_local_puts_registry_and_sqlite_under_the_data_dir(tmp_path: Path) -> None:
    config = FeastConfig.local(tmp_path)

    assert config.registry == str(tmp_path / "feast" / "registry.db")
    assert config.online_store == SqliteOnlineStoreConfig(path=str(tmp_path / "feast" / "online.db"))


def test_local_accepts_overrides(tmp_path: Path) -> None:
    config = FeastConfig.local(tmp_path, project="p2", online_store={"type": "redis"})

    assert config.project == "p2"
    assert config.online_store == RedisOnlineStoreConfig(type="redis", connection_string="localhost:6379")


def test_omitted_online_store_is_sqlite_next_to_the_registry() -> None:
    config = FeastConfig.model_validate({"registry": "/srv/feast/registry.db"})

    assert config.online_store == SqliteOnlineStoreConfig(path="/srv/feast/online.db")


@pytest.mark.parametrize(
    ("online_store", "expected"),
    [
        ({"type": "sqlite", "path": "x.db"}, SqliteOnlineStoreConfig(path="x.db")),
        ({"path": "x.db"}, SqliteOnlineStoreConfig(path="x.db")),
        ({"type": "redis"}, RedisOnlineStoreConfig(type="redis")),
        (
            {"type": "redis", "connection_string": "redis:6380,db=1"},
            RedisOnlineStoreConfig(type="redis", connection_string="redis:6380,db=1"),
        ),
    ],
    ids=["sqlite", "sqlite-by-default", "redis", "redis-with-address"],
)
def test_online_store_is_chosen_by_its_type(online_store: dict[str, str], expected: object) -> None:
    config = FeastConfig.model_validate({"registry": "r.db", "online_store": online_store})

    assert config.online_store == expected
    assert type(config.online_store) is type(expected)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({"registery": "r.db"}, "registery"),
        ({"online_store": {"type": "sqlite", "path": "x.db", "pth": "y.db"}}, "pth"),
        ({"online_store": {"type": "redis", "connection_sting": "h:1"}}, "connection_sting"),
        # Without a type the store is SQLite, so a Redis-only key is an unknown key, not a guess.
        ({"online_store": {"connection_string": "h:1"}}, "connection_string"),
    ],
    ids=["top-level", "sqlite", "redis", "redis-key-without-type"],
)
def test_unknown_keys_are_rejected(data: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as error:
        FeastConfig.model_validate(data)
    assert complaint in str(error.value)


def test_unknown_store_type_is_rejected() -> None:
    with pytest.raises(ValidationError, match="postgres") as error:
        FeastConfig.model_validate({"online_store": {"type": "postgres", "path": "x"}})
    assert "'sqlite', 'redis'" in str(error.value)


def test_sqlite_needs_a_path() -> None:
    with pytest.raises(ValidationError, match="path"):
        FeastConfig.model_validate({"online_store": {"type": "sqlite"}})


@pytest.mark.parametrize("name", ["_hidden", "has-hyphen", "has space", ""])
def test_names_feast_or_sqlite_would_reject_fail_early(name: str) -> None:
    for field in ("project", "entity", "feature_view"):
        with pytest.raises(ValidationError, match=field):
            FeastConfig.model_validate({field: name})


def test_sink_resolves_relative_paths_where_it_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Executors may run in another working directory; the pickled sink must still name the same files.
    monkeypatch.chdir(tmp_path)
    sink = FeastOnlineSink(FeastConfig(), embeddings_table_uri="data/embeddings", dim=4)

    clone = pickle.loads(pickle.dumps(sink))

    assert clone.store_description == f"sqlite at {tmp_path / 'data' / 'feast' / 'online.db'}"


def test_redis_description_never_shows_the_password() -> None:
    config = FeastConfig(
        online_store=RedisOnlineStoreConfig(type="redis", connection_string="cache:6380,password=s3cret,ssl=true")
    )

    sink = FeastOnlineSink(config, embeddings_table_uri="e", dim=4)

    assert sink.store_description == "redis at cache:6380"


def test_sink_rejects_a_non_positive_dimension() -> None:
    with pytest.raises(SinkError, match="positive embedding dimension"):
        FeastOnlineSink(FeastConfig(), embeddings_table_uri="e", dim=0)


def test_config_and_sink_import_without_feast() -> None:
    # The [feast] extra is optional: the job's config loader imports this module everywhere.
    code = (
        "import sys, transforms.sinks.feast_online as m; "
        "m.FeastOnlineSink(m.FeastConfig(), embeddings_table_uri='e', dim=4); "
        "assert not [n for n in sys.modules if n == 'feast' or n.startswith(('feast.', 'redis'))], 'feast imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_for_table_puts_what_the_config_left_out_beside_the_table(tmp_path: Path) -> None:
    table = str(tmp_path / "embeddings")
    assert FeastConfig.for_table(table) == FeastConfig.next_to(table)
    # A config naming only its view (a second target beside the first) keeps the store the
    # lookups of that target look in.
    own_view = FeastConfig.for_table(table, {"feature_view": "item_embeddings_b"})
    assert own_view == FeastConfig.local(tmp_path, feature_view="item_embeddings_b")
    redis = FeastConfig.for_table(table, {"online_store": {"type": "redis", "connection_string": "h:6379"}})
    assert redis.registry == str(tmp_path / "feast" / "registry.db")
    assert redis.online_store == RedisOnlineStoreConfig(type="redis", connection_string="h:6379")


def test_for_table_takes_a_named_registry_as_it_is(tmp_path: Path) -> None:
    cfg = FeastConfig.for_table(str(tmp_path / "embeddings"), {"registry": "/srv/feast/registry.db"})
    assert cfg.registry == "/srv/feast/registry.db"
    assert cfg.online_store == SqliteOnlineStoreConfig(path="/srv/feast/online.db")
