"""The backfill job's config (pipelines/config.py): YAML, then SLUICE__ env vars, then flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.config import BackfillConfig, load_config
from transforms.batching import BatchLimits
from transforms.errors import ConfigError

YAML = """\
source:
  uri: /data/items
  text_column: description
target:
  uri: /data/embeddings/
mode: incremental
model:
  precision: fp32
  max_seq_length: 128
batching:
  max_rows: 32
  max_tokens: 4096
validation:
  max_quarantine_fraction: 0.01
spark:
  conf:
    spark.sql.shuffle.partitions: "16"
"""


def write(tmp_path: Path, text: str, name: str = "backfill.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


def test_yaml_loading(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, YAML), environ={})
    assert isinstance(cfg, BackfillConfig)
    assert cfg.source.uri == "/data/items"
    assert (cfg.source.id_column, cfg.source.text_column) == ("item_id", "description")
    assert cfg.target.uri == "/data/embeddings"  # normalised: absolute, no trailing slash
    assert cfg.mode == "incremental"
    assert (cfg.model.precision, cfg.model.max_seq_length) == ("fp32", 128)
    assert cfg.model.source == "builtin:all-MiniLM-L6-v2"  # untouched default
    assert cfg.batching.limits() == BatchLimits(max_rows=32, max_tokens=4096)
    assert cfg.validation.max_quarantine_fraction == 0.01
    assert cfg.validation.norm_tolerance == 1e-3
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "16"}
    assert cfg.feast is None


def test_quarantine_default_naming(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, YAML), environ={})
    assert cfg.target.quarantine == "/data/embeddings_quarantine"  # trailing slash dropped
    cfg = load_config(
        overrides={"source": {"uri": "s3://b/items"}, "target": {"uri": "s3://b/emb", "quarantine_uri": "s3://b/q"}},
        environ={},
    )
    assert cfg.target.quarantine == "s3://b/q"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (YAML.replace("  precision: fp32", "  precison: fp32"), "model.precison"),
        (YAML + "colour: blue\n", "colour"),
        (YAML.replace("  max_rows: 32", "  max_row: 32"), "batching.max_row"),
    ],
)
def test_unknown_key_names_key_path_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ={})
    msg = one_line(excinfo.value)
    assert f"{key}: unknown key" in msg
    assert str(path) in msg
    assert excinfo.value.exit_code == 2


def test_wrong_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, YAML.replace("max_rows: 32", "max_rows: 0")), environ={})
    assert "batching.max_rows" in one_line(excinfo.value)
    with pytest.raises(ConfigError, match="mode"):
        load_config(write(tmp_path, YAML.replace("mode: incremental", "mode: sometimes")), environ={})


def test_env_override(tmp_path: Path) -> None:
    env = {"SLUICE__MODEL__PRECISION": "int8", "SLUICE__BATCHING__MAX_ROWS": "64", "PATH": "/usr/bin"}
    cfg = load_config(write(tmp_path, YAML), environ=env)
    assert cfg.model.precision == "int8"
    assert cfg.batching.max_rows == 64
    assert cfg.batching.max_tokens == 4096  # siblings from the file survive the merge
    assert cfg.model.max_seq_length == 128


def test_env_is_read_from_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE__MODE", "stale")
    assert load_config(write(tmp_path, YAML)).mode == "stale"
    assert load_config(write(tmp_path, YAML), environ={}).mode == "incremental"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, YAML)
    env = {"SLUICE__MODEL__PRECISION": "int8", "SLUICE__MODE": "stale", "SLUICE__BATCHING__MAX_ROWS": "64"}
    flags = {"model": {"precision": "fp16"}, "batching": {"max_rows": 16}}
    cfg = load_config(path, environ=env, overrides=flags)
    assert cfg.model.precision == "fp16"  # flag beats env beats file
    assert cfg.batching.max_rows == 16  # flag beats env
    assert cfg.mode == "stale"  # env beats file
    assert cfg.batching.max_tokens == 4096  # file beats default
    assert cfg.model.device == "auto"  # default


def test_error_origin_names_every_layer(tmp_path: Path) -> None:
    path = write(tmp_path, YAML)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ={"SLUICE__MODEL__PRECISION": "fp8"}, overrides={"mode": "full"})
    msg = one_line(excinfo.value)
    assert f"({path} + SLUICE__ environment + flags)" in msg and "model.precision" in msg


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(missing, environ={})
    assert one_line(excinfo.value) == f"config file {missing} not found"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  uri: [unclosed\ntarget: {uri: x}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ={})
    msg = one_line(excinfo.value)
    assert msg.startswith(f"config file {path} is not valid YAML")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})


def test_empty_file_means_defaults_and_required_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, ""), environ={})
    msg = one_line(excinfo.value)
    assert "source: Field required" in msg and "target: Field required" in msg


@pytest.mark.parametrize(
    ("source", "target", "quarantine"),
    [
        ("/d/items", "/d/items", None),
        ("/d/items", "/d/items/", None),
        ("/d/items", "/d/emb", "/d/items"),
        ("/d/items", "/d/emb", "/d/emb"),
        ("/d/items_quarantine", "/d/items", None),
    ],
)
def test_source_target_quarantine_must_differ(source: str, target: str, quarantine: str | None) -> None:
    over = {"source": {"uri": source}, "target": {"uri": target, "quarantine_uri": quarantine}}
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=over, environ={})
    assert "three different locations" in one_line(excinfo.value)


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path, environ={})


def test_env_override_of_string_maps() -> None:
    env = {
        "SLUICE__SOURCE__URI": "/d/items",
        "SLUICE__TARGET__URI": "/d/emb",
        "SLUICE__SPARK__CONF__spark.executor.cores": "4",
        "SLUICE__SPARK__CONF__spark.sql.adaptive.coalescePartitions.enabled": "false",
    }
    cfg = load_config(environ=env)
    assert cfg.spark.conf == {
        "spark.executor.cores": "4",
        "spark.sql.adaptive.coalescePartitions.enabled": "false",
    }
