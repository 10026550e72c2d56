"""Publishing items and events to Kafka as a producer team would: validated, keyed, acks=all."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaProducer
from kafka.errors import KafkaError

from fusionrec.kafka_auth import kafka_python_options
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
            **kafka_python_options(k),
        )

    def topic(self, kind: Kind) -> str:
        k = self.settings.kafka
        return k.items_topic if kind == "items" else k.events_topic

    def publish(
        self, kind: Kind, docs: Iterable[dict[str, Any]]
    ) -> Iterator[tuple[int, str | None]]:
        """Send each valid record. Yields (row number from 1, None) once the broker has it
        (acks=all), or (row, reason) when it was refused: invalid, or the broker said no."""
        topic = self.topic(kind)
        in_flight: list[tuple[int, Any]] = []
        for row, doc in enumerate(docs, 1):
            try:
                key, value = validate(kind, doc)
            except RecordError as exc:
                yield row, str(exc)
                continue
            in_flight.append((row, self.producer.send(topic, key=key, value=value)))
            if len(in_flight) >= 1000:
                yield from _outcomes(in_flight)
        yield from _outcomes(in_flight)

    def publish_all(self, kind: Kind, docs: Iterable[dict[str, Any]]) -> None:
        """Publish every record or raise RecordError naming the rows that were refused."""
        refused = [f"row {row}: {why}" for row, why in self.publish(kind, docs) if why]
        if refused:
            raise RecordError(f"{len(refused)} {kind} refused: " + "; ".join(refused[:5]))

    def send_raw(self, kind: Kind, key: bytes | None, value: bytes) -> None:
        """Bytes as they are, unvalidated (tests and tools that probe the worker's edge)."""
        self.producer.send(self.topic(kind), key=key, value=value).get(timeout=30)

    def close(self) -> None:
        self.producer.close()


def _outcomes(in_flight: list[tuple[int, Any]]) -> Iterator[tuple[int, str | None]]:
    """Wait for sent records; the broker's error, if any, is the record's outcome."""
    for row, future in in_flight:
        try:
            future.get(timeout=60)
            yield row, None
        except KafkaError as exc:
            yield row, f"not published: {exc}"
    in_flight.clear()
