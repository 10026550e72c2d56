"""Dead-letter ids: one per message however often it is rejected, distinct between messages;
and the ids a starting worker recovers from the topic (tests/test_outages.py has the restart)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusionrec.broker import EmbeddedBroker
from fusionrec.settings import load_settings
from streams.deadletters import SentLetters, dead_letter, letter_id, recover_sent

sources = st.tuples(
    st.sampled_from(["items", "events"]),
    st.none() | st.integers(0, 8),
    st.none() | st.integers(0, 10**12),
    st.binary(max_size=64),
)


def test_a_rejected_message_has_the_same_id_every_time() -> None:
    where = {"topic": "items", "partition": 2, "offset": 41, "key": b"k", "value": b"{not json"}
    first = json.loads(dead_letter("invalid JSON", **where))
    again = json.loads(dead_letter("processing failed: later", **where))
    assert first["id"] == again["id"] == letter_id("items", 2, 41, b"{not json")
    assert len(first["id"]) == 32


@given(sources, sources)
def test_different_messages_get_different_ids(a: tuple, b: tuple) -> None:
    # The embedded broker restarts at offset 0: the same place with other bytes is another one.
    assert (letter_id(*a) == letter_id(*b)) == (a == b)


def test_sent_letters_remember_the_latest_and_forget_on_request() -> None:
    sent = SentLetters(capacity=2)
    for letter in ("a", "b", "a", "c"):  # "a" sent again: now newer than "b"
        sent.add(letter)
    assert "a" in sent and "c" in sent and "b" not in sent
    sent.forget()
    assert "a" not in sent and "c" not in sent


# Recovery of the ids already sent, through a real broker (Tansu: quick to start, no worker).


def produce_letters(bootstrap: str, partitions: dict[int, list[str]]) -> None:
    """Letters keyed by their ids, each partition's in one batch (as a worker's linger makes)."""
    from aiokafka import AIOKafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("dead-letters", len(partitions), 1)])
    admin.close()

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
        await producer.start()
        try:
            for partition, ids in partitions.items():
                for letter in ids:
                    await producer.send(
                        "dead-letters", b"{}", key=letter.encode(), partition=partition
                    )
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def recovered(bootstrap: str, capacity: int = 100_000, timeout_s: float = 10.0) -> SentLetters:
    sent = SentLetters(capacity)
    asyncio.run(recover_sent(sent, load_settings(kafka={"bootstrap": bootstrap}), timeout_s))
    return sent


@pytest.mark.integration
def test_a_starting_worker_recovers_the_ids_on_the_topic() -> None:
    with EmbeddedBroker() as broker:
        assert len(recovered(broker.bootstrap)) == 0  # no topic yet: nothing was sent
        ids = {0: [f"p0-{n}" for n in range(60)], 1: ["p1-0", "p1-1"]}
        produce_letters(broker.bootstrap, ids)
        sent = recovered(broker.bootstrap)
        assert all(letter in sent for letter in ids[0] + ids[1]) and len(sent) == 62
        # Bounded by what SentLetters keeps: the newest (partition 1's two may come last).
        bounded = recovered(broker.bootstrap, capacity=20)
        assert len(bounded) == 20
        assert all(letter in bounded for letter in ids[0][-18:])
        assert not any(letter in bounded for letter in ids[0][:-20])


@pytest.mark.integration
def test_recovery_gives_up_on_a_broker_that_does_not_answer() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        sent = recovered(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
    assert len(sent) == 0 and time.monotonic() - start < 5.0
