"""The poison catalogue: every kind of bad ad request the streaming runners must survive.

DESIGN.md ("Poison catalogue") asks for *one* list of bad inputs shared by every runner's tests,
so that the Spark, Beam and plain-consumer runners are held to the same cases and a new kind of
poison is added once. It lives in the package, not under ``tests/``, because the demo producer
(``sluice demo-data ad-requests --poison-fraction``) plants the same poison in real topics.

Each :class:`PoisonKind` says how to turn a valid request into bad bytes for a codec, and the
:class:`Outcome` the runner must reach for it: every kind is dead-lettered, either at stage
``decode`` with a :class:`~schemas.ad_request_codec.DecodeErrorClass`, or at stage ``model`` with
``ModelInputRejected`` (well-formed, finite, but outside ``DENSE_RANGES``). A kind applies only to
the codecs that can carry it: Avro's schema makes a string hour or a missing field unwritable, so
those kinds are JSON-only, and the expected error class of e.g. a truncated message differs by
codec. Poison is deterministic: the same template, codec and seeded generator give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from schemas.ad_request_codec import (
    CODEC_NAMES,
    AvroCodec,
    CodecName,
    DecodeErrorClass,
    JsonCodec,
    confluent_frame,
)
from schemas.ad_requests import AD_REQUEST_SCHEMA_VERSION, DENSE_RANGES
from transforms.errors import ConfigError

__all__ = [
    "MODEL_INPUT_REJECTED",
    "POISON_CATALOGUE",
    "Outcome",
    "PoisonKind",
    "kinds_for",
    "plan_poison",
    "poison_kind",
]

#: Error class of a request the scorer refuses (a dense value outside ``DENSE_RANGES``).
MODEL_INPUT_REJECTED = "ModelInputRejected"

Stage = Literal["decode", "model"]
MakeFn = Callable[[dict[str, Any], CodecName, np.random.Generator], bytes | None]

_JSON = JsonCodec()
_AVRO = AvroCodec()
_UNSUPPORTED_VERSION = AD_REQUEST_SCHEMA_VERSION + 1
_HUGE = "__sluice_poison_huge__"


@dataclass(frozen=True)
class Outcome:
    """Where a poison message must end up: always the dead-letter, with this stage and class."""

    stage: Stage
    error_class: str
    disposition: Literal["dead_letter"] = "dead_letter"


def _decode(error_class: DecodeErrorClass) -> Outcome:
    return Outcome("decode", str(error_class))


_MODEL = Outcome("model", MODEL_INPUT_REJECTED)


@dataclass(frozen=True)
class PoisonKind:
    """One kind of bad message: how to make it from a valid request, and what must happen to it."""

    name: str
    description: str
    #: The codecs this kind exists for, each with the outcome it must reach.
    outcomes: Mapping[CodecName, Outcome]
    _make: MakeFn

    def applies_to(self, codec: CodecName | str) -> bool:
        return codec in self.outcomes

    def expected(self, codec: CodecName | str) -> Outcome:
        try:
            return self.outcomes[codec]  # type: ignore[index]
        except KeyError:
            raise ConfigError(f"poison kind {self.name!r} does not exist for codec {codec!r}") from None

    def make(self, record: Mapping[str, Any], codec: CodecName | str, rng: np.random.Generator) -> bytes | None:
        """The poison bytes (``None``: a tombstone) derived from ``record``, a valid ad request."""
        self.expected(codec)
        return self._make(dict(record), codec, rng)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Makers
# --------------------------------------------------------------------------------------------------


def _valid(record: dict[str, Any], codec: CodecName) -> bytes:
    return _JSON.encode(record) if codec == "json" else _AVRO.encode(record)


def _json_with(**changes: Any) -> MakeFn:
    """JSON of the record with fields replaced (``...`` removes a field); NaN/Infinity as bare tokens."""

    def make(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
        obj = _JSON.wire_object(record)
        for name, value in changes.items():
            if value is ...:
                obj.pop(name, None)
            else:
                obj[name] = value
        if any(isinstance(v, float) and not np.isfinite(v) for v in obj.values()):
            return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()
        return orjson.dumps(obj).replace(f'"{_HUGE}"'.encode(), b"1e999")

    return make


def _both_with(**changes: Any) -> MakeFn:
    """A record with field values replaced, written by either codec (Avro can carry these values)."""
    json_make = _json_with(**changes)

    def make(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes | None:
        if codec == "json":
            return json_make(record, codec, rng)
        return _AVRO.encode({**record, **changes})

    return make


def _truncated(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    whole = _valid(record, codec)
    # Cut inside the body (past an Avro frame), anywhere from a third to all but the last byte.
    return whole[: int(rng.integers(max(6, len(whole) // 3), len(whole)))]


def _not_an_object(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    return orjson.dumps(list(_JSON.wire_object(record).values()))


def _garbage(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    # 0xFF first: never UTF-8 (so never JSON) and never the Confluent magic byte (so never Avro).
    return b"\xff" + rng.integers(0, 256, int(rng.integers(16, 64)), dtype=np.uint8).tobytes()


def _empty(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    return b""


def _tombstone(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> None:
    return None


def _unsupported_version(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    if codec == "json":
        return orjson.dumps({**_JSON.wire_object(record), "schema_version": _UNSUPPORTED_VERSION})
    return confluent_frame(_UNSUPPORTED_VERSION, _AVRO.encode_payload(record))


def _unframed_avro(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    # The body alone: it starts with request_id's length (never 0 for a valid request), not magic 0.
    return _AVRO.encode_payload(record)


def _json_on_avro_topic(record: dict[str, Any], codec: CodecName, rng: np.random.Generator) -> bytes:
    return _JSON.encode(record)


_BID_HI = DENSE_RANGES["bid_floor_usd"][1]
_CTR_HI = DENSE_RANGES["user_ctr_7d"][1]

_J: tuple[CodecName, ...] = ("json",)
_A: tuple[CodecName, ...] = ("avro",)
_BOTH: tuple[CodecName, ...] = CODEC_NAMES


def _kind(
    name: str,
    description: str,
    codecs: tuple[CodecName, ...],
    outcome: Outcome | dict[CodecName, Outcome],
    make: MakeFn,
) -> PoisonKind:
    outcomes = outcome if isinstance(outcome, dict) else dict.fromkeys(codecs, outcome)
    return PoisonKind(name, description, outcomes, make)


_MALFORMED: dict[CodecName, Outcome] = {
    "json": _decode(DecodeErrorClass.MALFORMED_JSON),
    "avro": _decode(DecodeErrorClass.MALFORMED_AVRO),
}
_D = DecodeErrorClass

#: Every kind, in a fixed order (plans and reports list them in this order).
POISON_CATALOGUE: tuple[PoisonKind, ...] = (
    # Not a message at all.
    _kind("truncated", "a valid message cut short", _BOTH, _MALFORMED, _truncated),
    _kind("binary_garbage", "random bytes starting 0xFF", _BOTH, _MALFORMED, _garbage),
    _kind("not_an_object", "a JSON array of the field values", _J, _decode(_D.MALFORMED_JSON), _not_an_object),
    _kind("unframed_avro", "Avro body without the Confluent frame", _A, _decode(_D.MALFORMED_AVRO), _unframed_avro),
    _kind("json_on_avro_topic", "a JSON request on an Avro topic", _A, _decode(_D.MALFORMED_AVRO), _json_on_avro_topic),
    _kind("empty_message", "zero bytes", _BOTH, _decode(_D.EMPTY_MESSAGE), _empty),
    _kind("tombstone", "a null value", _BOTH, _decode(_D.EMPTY_MESSAGE), _tombstone),
    _kind(
        "unsupported_version",
        f"schema_version / schema id {_UNSUPPORTED_VERSION}",
        _BOTH,
        _decode(_D.UNSUPPORTED_SCHEMA_VERSION),
        _unsupported_version,
    ),
    # Wrong shape.
    _kind("missing_field", "no ad_id", _J, _decode(_D.MISSING_FIELD), _json_with(ad_id=...)),
    _kind("null_field", "device is null", _J, _decode(_D.MISSING_FIELD), _json_with(device=None)),
    _kind("hour_as_string", 'hour is "13"', _J, _decode(_D.WRONG_TYPE), _json_with(hour="13")),
    _kind("user_id_as_number", "user_id is 12345", _J, _decode(_D.WRONG_TYPE), _json_with(user_id=12345)),
    _kind("dense_as_string", 'bid_floor_usd is "0.35"', _J, _decode(_D.WRONG_TYPE), _json_with(bid_floor_usd="0.35")),
    _kind(
        "event_time_as_iso_string",
        "event_time is an ISO-8601 string",
        _J,
        _decode(_D.WRONG_TYPE),
        _json_with(event_time="2024-06-01T12:00:00Z"),
    ),
    # Non-finite dense values.
    _kind("nan_dense", "user_ctr_7d is NaN", _BOTH, _decode(_D.NON_FINITE_VALUE), _both_with(user_ctr_7d=float("nan"))),
    _kind(
        "infinite_dense",
        "session_depth is Infinity",
        _BOTH,
        _decode(_D.NON_FINITE_VALUE),
        _both_with(session_depth=float("inf")),
    ),
    _kind(
        "huge_dense",
        "ad_ctr_7d is 1e999 (inf as float64)",
        _J,
        _decode(_D.NON_FINITE_VALUE),
        _json_with(ad_ctr_7d=_HUGE),
    ),
    _kind(
        "float32_overflow",
        "bid_floor_usd is 1e39 (finite, too large for float32)",
        _J,
        _decode(_D.NON_FINITE_VALUE),
        _json_with(bid_floor_usd=1e39),
    ),
    # Out of range for the field's meaning.
    _kind("hour_out_of_range", "hour is 24", _BOTH, _decode(_D.OUT_OF_RANGE), _both_with(hour=24)),
    _kind("negative_dense", "session_depth is -1", _BOTH, _decode(_D.OUT_OF_RANGE), _both_with(session_depth=-1.0)),
    _kind("negative_seq", "seq is -1", _BOTH, _decode(_D.OUT_OF_RANGE), _both_with(seq=-1)),
    # Out of vocabulary / bad format.
    _kind(
        "unknown_slot",
        'slot "banner" (closed vocabulary)',
        _BOTH,
        _decode(_D.UNKNOWN_CATEGORY),
        _both_with(slot="banner"),
    ),
    _kind(
        "unknown_device",
        'device "smart_fridge" (closed vocabulary)',
        _BOTH,
        _decode(_D.UNKNOWN_CATEGORY),
        _both_with(device="smart_fridge"),
    ),
    _kind("bad_country", 'country "usa"', _BOTH, _decode(_D.INVALID_FORMAT), _both_with(country="usa")),
    _kind("empty_user_id", 'user_id ""', _BOTH, _decode(_D.INVALID_FORMAT), _both_with(user_id="")),
    # Well-formed, but the model refuses it.
    _kind(
        "model_rejected_bid_floor",
        f"bid_floor_usd 5000 (> {_BID_HI:g}, DENSE_RANGES)",
        _BOTH,
        _MODEL,
        _both_with(bid_floor_usd=5000.0),
    ),
    _kind(
        "model_rejected_ctr",
        f"user_ctr_7d 1.5 (> {_CTR_HI:g}, DENSE_RANGES)",
        _BOTH,
        _MODEL,
        _both_with(user_ctr_7d=1.5),
    ),
)

_BY_NAME = {k.name: k for k in POISON_CATALOGUE}
assert len(_BY_NAME) == len(POISON_CATALOGUE), "duplicate poison kind names"


def poison_kind(name: str) -> PoisonKind:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown poison kind {name!r}; known: {', '.join(_BY_NAME)}") from None


def kinds_for(codec: CodecName | str) -> tuple[PoisonKind, ...]:
    """The kinds that exist for ``codec``, in catalogue order."""
    if codec not in CODEC_NAMES:
        raise ConfigError(f"unknown codec {codec!r}; choose one of {', '.join(CODEC_NAMES)}")
    return tuple(k for k in POISON_CATALOGUE if k.applies_to(codec))


def plan_poison(
    events: int, fraction: float, *, codec: CodecName | str, seed: int
) -> tuple[np.ndarray, tuple[PoisonKind, ...]]:
    """Which of ``events`` message positions are poison, and of which kind.

    Exactly ``round(events * fraction)`` positions, at seeded random places; kinds are dealt round
    robin over the codec's catalogue (then shuffled), so every kind occurs as soon as there are at
    least as many poison messages as kinds, and the counts per kind differ by at most one.
    Returns the sorted positions (int64) and the kind of each.
    """
    if events < 0:
        raise ConfigError(f"events must be >= 0, got {events}")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"poison fraction must be between 0 and 1, got {fraction}")
    kinds = kinds_for(codec)
    n = round(events * fraction)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x706F6973]))  # "pois"
    positions = np.sort(rng.choice(events, size=n, replace=False)).astype(np.int64) if n else np.zeros(0, np.int64)
    order = rng.permutation(np.arange(n) % len(kinds)) if n else np.zeros(0, np.int64)
    return positions, tuple(kinds[i] for i in order.tolist())
