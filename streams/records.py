"""The records on the wire: JSON, versioned, validated at the edge.

`decode_item` and `decode_event` turn raw message bytes into records or raise RecordError
with a message a producer can act on; the agents dead-letter those with the original bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
EventType = Literal["view", "click", "like", "add_to_cart", "purchase", "rating", "dislike", "skip"]

Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Scalar = str | int | float | bool


class RecordError(ValueError):
    """A message that is not a valid record; str(error) is the reason given in dead-letters."""


def _epoch(value: Any) -> float:
    """Unix seconds from a number or an ISO-8601 string (naive means UTC)."""
    if isinstance(value, bool):
        raise ValueError("a timestamp is unix seconds or ISO-8601, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    raise ValueError("a timestamp is unix seconds or ISO-8601")


class _Record(BaseModel):
    # Unknown fields are refused: a typo must not silently drop data. New fields mean a new version.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    schema_version: Literal[1] = SCHEMA_VERSION


class MediaRef(BaseModel):
    """Exactly one of: a path under the media root, an http(s) URL, or inline base64 bytes.

    A bare string is accepted too: `http(s)://...` is a URL, `data:...;base64,...` is inline
    data, anything else a path.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str | None = None
    url: str | None = None
    data: bytes | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.startswith(("http://", "https://")):
            return {"url": value}
        if value.startswith("data:"):
            _, _, payload = value.partition(",")
            return {"data": payload}
        return {"path": value}

    @field_validator("data", mode="before")
    @classmethod
    def _b64(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"data is not valid base64: {exc}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> MediaRef:
        given = [k for k in ("path", "url", "data") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, url, data (got {given or 'none'})")
        return self


class ItemRecord(_Record):
    """`op="delete"` removes the item; an upsert replaces it (popularity is kept)."""

    op: Literal["upsert", "delete"] = "upsert"
    id: Id
    title: str = Field(default="", max_length=1000)
    description: str = Field(default="", max_length=20_000)
    image: MediaRef | None = None
    audio: MediaRef | None = None
    # A video supplies the image (key frames) and audio (sound track) an item does not give.
    video: MediaRef | None = None
    category: Annotated[str, StringConstraints(max_length=256)] | None = None
    tags: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list, max_length=100
    )
    attributes: dict[str, Scalar] = Field(default_factory=dict, max_length=100)
    created_at: float = Field(default_factory=time.time)

    @field_validator("created_at", mode="before")
    @classmethod
    def _created_at(cls, value: Any) -> float:
        return _epoch(value)

    @property
    def text(self) -> str:
        """What the text encoder reads: title and description."""
        return ". ".join(part for part in (self.title.strip(), self.description.strip()) if part)


class EventRecord(_Record):
    event_id: Id
    user_id: Id
    item_id: Id
    type: EventType
    value: float | None = None
    timestamp: float
    context: dict[str, Any] = Field(default_factory=dict, max_length=100)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> float:
        return _epoch(value)

    @model_validator(mode="after")
    def _rating_has_value(self) -> EventRecord:
        if self.type == "rating" and self.value is None:
            raise ValueError("a rating event needs a value")
        return self


def _decode(model: type[_Record], raw: bytes | None) -> Any:
    if raw is None:
        raise RecordError("empty message (no value)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecordError("message is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(doc, dict):
        raise RecordError(f"expected a JSON object, got {type(doc).__name__}")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()
        )
        raise RecordError(f"invalid {model.__name__}: {problems}") from None


def decode_item(raw: bytes | None) -> ItemRecord:
    return _decode(ItemRecord, raw)


def decode_event(raw: bytes | None) -> EventRecord:
    return _decode(EventRecord, raw)
