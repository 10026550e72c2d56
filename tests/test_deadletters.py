"""Dead-letter ids: one per message however often it is rejected, distinct between messages."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from streams.deadletters import SentLetters, dead_letter, letter_id

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
