"""The Faust app: topics, the item-onboarding agent, the profile agent, the held-events timer.

The arithmetic lives elsewhere (catalog, users, profiles); agents only move batches along.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
from faust.types import Message
from qdrant_client import QdrantClient

from encoders.base import EncodeError, Encoder
from fusionrec import metrics, store
from fusionrec.kafka_auth import faust_credentials
from fusionrec.loop import Backlog
from fusionrec.settings import Settings
from streams.catalog import Catalog
from streams.deadletters import SentLetters, dead_letter, letter_id, recover_sent
from streams.records import RecordError, decode_event, decode_item
from streams.users import Users

log = logging.getLogger(__name__)
R = TypeVar("R")


def create_app(
    settings: Settings,
    client: QdrantClient,
    encoders: Mapping[str, Encoder],
    backlog: Backlog | None = None,
    sent_letters: SentLetters | None = None,
) -> faust.App:
    """The worker's app; it marks `backlog` whenever a batch comes full (for an in-process
    ranker's admission: fusionrec.loop).

    `sent_letters` holds the ids of the dead letters sent, so that replays, which reject a bad
    message again, send its letter once. Filled at start from the dead-letters topic; emptied by
    fusionrec/stack.py BrokerLossGuard when the broker comes back empty, its letters gone.
    """
    k = settings.kafka
    w = settings.worker
    app = faust.App(
        "fusionrec",
        broker=[f"kafka://{b}" for b in settings.bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        autodiscover=False,
        web_enabled=False,
        topic_partitions=k.partitions,
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=2 * k.max_message_bytes,
        broker_session_timeout=8.0,
        broker_heartbeat_interval=1.0,
        broker_credentials=faust_credentials(k),
    )
    raw = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    items_topic = app.topic(k.items_topic, **raw)
    events_topic = app.topic(k.events_topic, **raw)
    dead_letters = app.topic(k.dead_letters_topic, **raw)
    # Set once the sent letters are read back from the topic: no letter is sent before.
    recovered = asyncio.Event()

    catalog = Catalog(client, settings, encoders)
    users = Users(client, settings, catalog)
    backlog = backlog or Backlog()
    sent_letters = sent_letters if sent_letters is not None else SentLetters()
    # Encoding holds the GIL only between torch/onnx calls: off the loop, events keep flowing.
    encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")

    async def reject(
        reason: str,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        offset: int | None = None,
        *,
        kind: str,
    ) -> None:
        letter = letter_id(topic, partition, offset, value)
        await recovered.wait()
        if letter in sent_letters:
            log.info("already dead-lettered (%s) from %s[%s]@%s", letter, topic, partition, offset)
            return
        log.warning("dead-letter from %s[%s]@%s: %s", topic, partition, offset, reason)
        metrics.DEAD_LETTERS.labels(kind).inc()
        # Keyed by its id, the same for every replay: consumers dedupe by key.
        await dead_letters.send(
            key=letter.encode(),
            value=dead_letter(
                reason, topic=topic, partition=partition, offset=offset, key=key, value=value
            ),
        )
        sent_letters.add(letter)

    async def decoded(
        batch: Sequence[faust.EventT], decode: Callable[[bytes], R]
    ) -> list[tuple[Message, R]]:
        """The records that decode, each with its message; the rest go to dead-letters."""
        good = []
        for event in batch:
            m = event.message
            kind = metrics.INVALID
            try:
                if m.value is not None and len(m.value) > k.max_message_bytes:
                    kind = metrics.TOO_LARGE
                    raise RecordError(
                        f"message of {len(m.value)} bytes exceeds max_message_bytes "
                        f"{k.max_message_bytes}"
                    )
                good.append((m, decode(m.value)))
            except RecordError as exc:
                await reject(str(exc), m.topic, m.key, m.value, m.partition, m.offset, kind=kind)
        return good

    async def guarded(batch: Sequence[faust.EventT], handle: Callable[..., Awaitable]) -> None:
        """Handle a batch. While the store is unreachable, retry with backoff; a batch that fails
        for any other reason no message check foresaw goes to dead-letters whole, with that
        reason, and the agent goes on: it never dies of one bad batch."""
        log.debug(
            "batch of %d: %s",
            len(batch),
            [(e.message.topic, e.message.partition, e.message.offset) for e in batch],
        )
        if len(batch) >= w.batch_size:
            backlog.mark()  # more was waiting than one batch holds
        pause = 0.5
        while True:
            try:
                await handle(batch)
            except Exception as exc:
                if store.unavailable(exc):
                    # The store is away, not the batch at fault: hold it (and its partition)
                    # and try again; writes are idempotent, so a retry applies nothing twice.
                    log.warning("store unavailable (%s); retrying in %.1f s", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 30.0)
                    continue
                log.exception("batch of %d failed", len(batch))
                reason = f"processing failed: {type(exc).__name__}: {exc}"
                for m in (e.message for e in batch):
                    await reject(
                        reason,
                        m.topic,
                        m.key,
                        m.value,
                        m.partition,
                        m.offset,
                        kind=metrics.PROCESSING_FAILED,
                    )
                return
            record_lag(batch)
            return

    def record_lag(batch: Sequence[faust.EventT]) -> None:
        last: dict[Any, int] = {}
        for m in (e.message for e in batch):
            last[m.tp] = max(last.get(m.tp, -1), m.offset)
        for tp, offset in last.items():
            high = app.consumer.highwater(tp)
            if high is not None:
                # Clamped: Tansu reports end offsets too low (ENVIRONMENT.md).
                lag = max(0, high - offset - 1)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)

    async def onboard_batch(batch: Sequence[faust.EventT]) -> None:
        latest = {r.id: (m, r) for m, r in await decoded(batch, decode_item)}
        catalog.delete(i for i, (_, r) in latest.items() if r.op == "delete")
        upserts = [(m, r) for m, r in latest.values() if r.op == "upsert"]
        loop = asyncio.get_running_loop()
        with metrics.ENCODE_SECONDS.time():
            results = await loop.run_in_executor(
                encode_pool, catalog.encode, [r for _, r in upserts]
            )
        ok = [(r, v) for (_, r), v in zip(upserts, results, strict=True) if isinstance(v, dict)]
        catalog.upsert([r for r, _ in ok], [v for _, v in ok])
        metrics.ITEMS_ENCODED.inc(len(ok))
        now = time.time()
        for r, _ in ok:
            metrics.FRESHNESS_SECONDS.observe(max(0.0, now - r.created_at))
        for (m, _), v in zip(upserts, results, strict=True):
            if isinstance(v, EncodeError):
                await reject(
                    f"encode failed: {v}",
                    m.topic,
                    m.key,
                    m.value,
                    m.partition,
                    m.offset,
                    kind=metrics.ENCODE_FAILED,
                )
        if users.holding:
            await hand_over_held()

    async def fold_batch(batch: Sequence[faust.EventT]) -> None:
        metrics.EVENTS_ACCEPTED.inc(users.apply([e for _, e in await decoded(batch, decode_event)]))

    @app.agent(items_topic)
    async def onboard(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(w.batch_size, within=w.batch_within_s):
            await guarded(batch, onboard_batch)

    @app.agent(events_topic)
    async def fold_events(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(w.batch_size, within=w.batch_within_s):
            await guarded(batch, fold_batch)

    async def hand_over_held() -> None:
        """Apply events that arrived before their item; dead-letter those held too long."""
        for e in users.retry_pending():
            await reject(
                f"item {e.item_id!r} did not arrive within "
                f"{settings.profiles.pending_ttl_s:.0f} s of the event",
                k.events_topic,
                e.user_id.encode(),
                e.model_dump_json().encode(),
                kind=metrics.HELD_TOO_LONG,
            )

    # Registered, not decorated: the decorated timer is an endless loop, and the onboarding agent
    # calls the plain function once per batch so held events follow their item at once.
    app.timer(settings.profiles.pending_retry_s)(hand_over_held)

    @app.task
    async def recover_sent_letters() -> None:
        try:
            await recover_sent(sent_letters, settings)
        finally:
            recovered.set()

    @app.task
    async def on_start() -> None:
        # Created up front: a first send that has to auto-create the topic stalled on Tansu.
        await dead_letters.maybe_declare()
        users.recover_holding()
        users.recover_outboxes()
        if k.embedded:
            await _shorten_fetch_wait(app, k.embedded_fetch_wait_ms)

    return app


async def _shorten_fetch_wait(app: faust.App, wait_ms: int) -> None:
    """Tansu holds a fetch for ~half of Faust's fixed 1.5 s max wait even when data is there;
    a few ms brings receive latency from ~400 ms to ~3 ms (measured, ENVIRONMENT.md). 20 ms by
    default: at 5 ms the idle consumer's fetches took ~10% of a core here and as much of the
    broker's, and inline Recommend calls, which share the process, ran ~20% slower."""
    for _ in range(600):
        consumer = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is not None:
            fetcher._fetch_max_wait_ms = wait_ms
            return
        await asyncio.sleep(0.05)
    log.warning("consumer not started after 30 s: fetch wait left at Faust's default")
