"""Dead letters: what could not be processed, with the reason, where it came from and its bytes.

Processing is at-least-once, so a bad message can be read, and rejected, more than once: after
a rebalance, a worker restart, or the re-read of every partition that follows a restart of the
embedded broker (fusionrec/stack.py BrokerLossGuard). Each dead letter therefore carries an
`id` that is the same every time one message is rejected: a hash of the topic, partition and
offset it was read from and of its bytes (offsets alone would not do: the embedded broker
restarts empty and numbers its messages from 0 again). The id is also the dead letter's Kafka
key, so a consumer dedupes by key (or a compacted topic does it). On top of that the worker
sends an id at most once per broker it has known: SentLetters remembers the ids it has sent,
starts from the keys already on the dead-letters topic (recover_sent: the broker is the record
of what was sent, so a restarted worker re-reading uncommitted messages sends nothing twice),
and forgets them when the broker comes back empty (their letters went with it). What this does
not cover: letters sent in the seconds between a broker's return and the worker noticing it,
letters another worker sent for partitions handed to this one after it started, and anything
a recovery that timed out did not reach. All of them repeat an id, never a different one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict

from aiokafka import AIOKafkaConsumer, TopicPartition

from fusionrec.kafka_auth import kafka_python_options
from fusionrec.settings import Settings

log = logging.getLogger(__name__)

# Keeps a dead letter under the producer's request size even when the original was huge;
# the size and sha256 still identify the original.
MAX_KEPT_BYTES = 512 * 1024
# How long a starting worker reads the dead-letters topic for the ids already sent; until then
# (only) its agents' letters wait. Past it the worker goes on with what it read.
RECOVERY_TIMEOUT_S = 15.0


def letter_id(topic: str, partition: int | None, offset: int | None, value: bytes | None) -> str:
    """The same for every rejection of one message: where it was read, and what it held."""
    digest = hashlib.sha256(json.dumps([topic, partition, offset]).encode())
    digest.update(b"\0")
    digest.update(value or b"")
    return digest.hexdigest()[:32]


def dead_letter(
    reason: str,
    *,
    topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
    value: bytes | None,
) -> bytes:
    value = value or b""
    doc = {
        "id": letter_id(topic, partition, offset, value),
        "reason": reason,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "value_base64": base64.b64encode(value[:MAX_KEPT_BYTES]).decode("ascii"),
        "value_size": len(value),
        "value_truncated": len(value) > MAX_KEPT_BYTES,
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "failed_at": time.time(),
    }
    return json.dumps(doc).encode()


class SentLetters:
    """The ids of the dead letters sent to the broker the worker talks to now, by this worker or
    found on the topic at its start (the latest `capacity`: replays reach back only as far as
    the last committed offset)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, letter: str) -> bool:
        return letter in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, letter: str) -> None:
        self._ids[letter] = None
        self._ids.move_to_end(letter)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def forget(self) -> None:
        """The broker came back empty: what was sent is gone, so nothing counts as sent."""
        self._ids.clear()


async def recover_sent(
    sent: SentLetters, settings: Settings, timeout_s: float = RECOVERY_TIMEOUT_S
) -> None:
    """Add to `sent` the keys (ids) of the latest `sent.capacity` letters of each partition of the
    dead-letters topic. Never fails: a broker that is slow, absent or refuses us costs only
    letters sent twice (same id), so after `timeout_s` or any error it logs and returns."""
    before = len(sent)
    consumer = None
    try:
        # No group: nothing is committed. A short fetch wait: Tansu holds a fetch for half of it
        # even when data is there (ENVIRONMENT.md). aiokafka takes kafka-python's security names.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            **kafka_python_options(settings.kafka),
        )
        await asyncio.wait_for(
            _read_keys(consumer, settings.kafka.dead_letters_topic, sent), timeout_s
        )
        log.info("%d dead letters found already sent", len(sent) - before)
    except Exception as exc:
        reason = f"not done in {timeout_s:.0f} s" if isinstance(exc, TimeoutError) else repr(exc)
        log.warning(
            "reading the dead letters already sent: gave up after %d (%s); replays may send "
            "the others again (same ids)",
            len(sent) - before,
            reason,
        )
    finally:
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5.0)


async def _read_keys(consumer: AIOKafkaConsumer, topic: str, sent: SentLetters) -> None:
    await consumer.start()
    await consumer.topics()  # fetches the metadata partitions_for_topic reads
    partitions = [
        TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    if not partitions:
        return  # a new broker: nothing sent yet
    consumer.assign(partitions)
    begin = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    pending = {tp for tp in partitions if end[tp] > begin[tp]}
    for tp in pending:
        consumer.seek(tp, max(begin[tp], end[tp] - sent.capacity))
    # Tansu reports an end offset as low as its last batch's first record + 1, so read on to
    # the high watermark its fetches report (which is right), or until a fetch brings nothing.
    while pending:
        fetched = await consumer.getmany(*pending, timeout_ms=500)
        if not fetched:
            return
        for records in fetched.values():
            for record in records:
                if record.key:
                    sent.add(record.key.decode("ascii", "replace"))
        for tp in list(pending):
            high = consumer.highwater(tp)
            if high is not None and await consumer.position(tp) >= high:
                pending.discard(tp)
