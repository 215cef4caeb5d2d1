"""The backfill job's configuration: one typed tree, from YAML, environment, then flags.

Precedence is defaults < config file < ``SLUICE__SECTION__KEY`` environment variables < CLI flags,
so an Airflow task can pin one value without editing a file. Every model is ``extra="forbid"``:
an unknown key is an error naming the key and the file, never a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from transforms.batching import BatchLimits
from transforms.errors import ConfigError
from transforms.models.spec import ModelConfig
from transforms.sinks.feast_online import FeastConfig

ENV_PREFIX = "SLUICE__"
_FREE_FORM_MAPS = {"conf", "storage_options", "model_kwargs", "client"}
BackfillMode = Literal["full", "incremental", "stale"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _absolute_uri(uri: str) -> str:
    """Local paths become absolute: Spark's ``delta.`path``` identifiers only accept absolute ones,
    and executors may not share the driver's working directory."""
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


class SourceConfig(_Strict):
    uri: Annotated[str, AfterValidator(_absolute_uri)] = Field(
        ..., description="Delta table of items: a path or an object-store URI"
    )
    id_column: str = "item_id"
    text_column: str = "text"
    storage_options: dict[str, str] = Field(default_factory=dict)


class TargetConfig(_Strict):
    uri: Annotated[str, AfterValidator(_absolute_uri)] = Field(
        ..., description="Delta table the embeddings are upserted into"
    )
    quarantine_uri: Annotated[str, AfterValidator(_absolute_uri)] | None = Field(
        None, description="defaults to <target>_quarantine"
    )
    storage_options: dict[str, str] = Field(default_factory=dict)

    @property
    def quarantine(self) -> str:
        return self.quarantine_uri or self.uri.rstrip("/") + "_quarantine"


class BatchingConfig(_Strict):
    max_rows: int | None = Field(None, ge=1, description="rows per model call; default 128 on CPU, 1024 on GPU")
    max_tokens: int | None = Field(
        None, ge=16, description="rows x padded length per model call; default 2048 on CPU, 65536 on GPU"
    )
    call_overhead_tokens: int | None = Field(
        None,
        ge=0,
        description="padding (in tokens) worth one extra model call when cutting batches; "
        "default 256 on CPU, 4096 on CUDA",
    )

    def limits(self) -> BatchLimits:
        return BatchLimits(
            max_rows=self.max_rows, max_tokens=self.max_tokens, call_overhead_tokens=self.call_overhead_tokens
        )


class ValidationConfig(_Strict):
    norm_tolerance: float = Field(1e-3, gt=0, lt=1)
    max_quarantine_fraction: float = Field(
        0.05, ge=0, le=1, description="the run fails, publishing nothing, above this fraction"
    )


class SparkConfig(_Strict):
    master: str | None = Field(None, description="local[*] when not under spark-submit")
    app_name: str = "sluice-backfill"
    partitions: int | None = Field(None, ge=1, description="inference tasks; default from row count and cores")
    conf: dict[str, str] = Field(default_factory=dict)
    progress: bool = Field(True, description="rich progress bar on the driver")


class BackfillConfig(_Strict):
    source: SourceConfig
    target: TargetConfig
    mode: BackfillMode = "full"
    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    validation: ValidationConfig = ValidationConfig()
    feast: FeastConfig | None = None
    spark: SparkConfig = SparkConfig()

    @model_validator(mode="after")
    def _distinct_tables(self) -> BackfillConfig:
        uris = {self.source.uri.rstrip("/"), self.target.uri.rstrip("/"), self.target.quarantine.rstrip("/")}
        if len(uris) != 3:
            raise ValueError("source, target and quarantine tables must be three different locations")
        return self


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``SLUICE__MODEL__PRECISION=int8`` -> ``{"model": {"precision": "int8"}}``.

    Values stay strings (pydantic converts "64" or "true" where a field wants it), except YAML
    flow collections (``{...}``/``[...]``). Segments name config fields and are lower-cased, but
    not below free-form maps such as ``spark.conf`` whose keys are case-sensitive Spark settings.
    """
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p for p in key.removeprefix(ENV_PREFIX).split("__") if p]
        if not parts:
            continue
        path: list[str] = []
        for part in parts:
            path.append(part if path and path[-1] in _FREE_FORM_MAPS else part.lower())
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw.strip().startswith(("{", "[")) else raw
    return tree


def _describe(exc: ValidationError, origin: str) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{loc}: {msg}")
    return f"invalid configuration ({origin}): " + "; ".join(problems)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(
    path: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    schema: type[ConfigT] = BackfillConfig,  # type: ignore[assignment]
) -> ConfigT:
    """Build a job's config (``schema``, the backfill's by default) from a YAML file, env vars and
    flag overrides (in that order)."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} not found") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    env = _env_overrides(dict(os.environ if environ is None else environ))
    if env:
        data = _deep_merge(data, env)
        origin += " + SLUICE__ environment"
    if overrides:
        data = _deep_merge(data, overrides)
        origin += " + flags"
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc
