"""Publishing items and events to Kafka as a producer team would: validated, keyed, acks=all."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaProducer

from fusionrec.settings import Settings
from streams.records import EventRecord, ItemRecord, RecordError, decode_event, decode_item

Kind = Literal["items", "events"]

# CSV columns that hold lists or numbers, so a CSV row validates like the JSON one.
_LIST_COLUMNS = {"tags"}
_NUMBER_COLUMNS = {"value", "timestamp", "created_at"}


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL or CSV file as dicts (CSV lists are `|`-separated; empty cells omitted)."""
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            for row in csv.DictReader(f):
                doc: dict[str, Any] = {}
                for k, v in row.items():
                    if v in ("", None):
                        continue
                    if k in _LIST_COLUMNS:
                        doc[k] = [t for t in v.split("|") if t]
                    elif k in _NUMBER_COLUMNS:
                        try:
                            doc[k] = float(v)
                        except ValueError:
                            doc[k] = v  # an ISO timestamp; the record validates it
                    else:
                        doc[k] = v
                yield doc
        else:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise RecordError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None


def validate(kind: Kind, doc: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) for one record, validated with the worker's own decoder."""
    value = json.dumps(doc).encode()
    record: ItemRecord | EventRecord = (decode_item if kind == "items" else decode_event)(value)
    key = record.id if isinstance(record, ItemRecord) else record.user_id
    return key.encode(), value


class Publisher:
    def __init__(self, settings: Settings) -> None:
        k = settings.kafka
        self.settings = settings
        self.producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap.split(","),
            acks="all",
            linger_ms=5,
            max_request_size=2 * k.max_message_bytes,
            security_protocol=k.security_protocol,
            sasl_mechanism=k.sasl_mechanism,
            sasl_plain_username=k.sasl_username,
            sasl_plain_password=k.sasl_password.get_secret_value() if k.sasl_password else None,
        )

    def topic(self, kind: Kind) -> str:
        k = self.settings.kafka
        return k.items_topic if kind == "items" else k.events_topic

    def publish(self, kind: Kind, docs: Iterable[dict[str, Any]]) -> Iterator[str | None]:
        """Send each valid record; yields None when sent, or the reason a record was refused."""
        topic = self.topic(kind)
        for doc in docs:
            try:
                key, value = validate(kind, doc)
            except RecordError as exc:
                yield str(exc)
                continue
            self.producer.send(topic, key=key, value=value)
            yield None
        self.producer.flush()

    def send_raw(self, kind: Kind, key: bytes | None, value: bytes) -> None:
        """Bytes as they are, unvalidated (tests and tools that probe the worker's edge)."""
        self.producer.send(self.topic(kind), key=key, value=value).get(timeout=30)

    def close(self) -> None:
        self.producer.close()
