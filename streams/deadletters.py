"""Dead letters: what could not be processed, with the reason, where it came from and its bytes.

Processing is at-least-once, so a bad message can be read, and rejected, more than once: after
a rebalance, a worker restart, or the re-read of every partition that follows a restart of the
embedded broker (fusionrec/stack.py BrokerLossGuard). Each dead letter therefore carries an
`id` that is the same every time one message is rejected: a hash of the topic, partition and
offset it was read from and of its bytes (offsets alone would not do: the embedded broker
restarts empty and numbers its messages from 0 again). The id is also the dead letter's Kafka
key, so a consumer dedupes by key (or a compacted topic does it). On top of that the worker
sends an id at most once per broker it has known: SentLetters remembers the ids it has sent in
this process and forgets them when the broker comes back empty (their letters went with it).
What this does not cover, by design: a restarted worker remembers nothing (the broker is the
record of what was sent, and the embedded one is memory only), and letters sent in the seconds
between a broker's return and the worker noticing it may be sent again. Both repeat an id,
never a different one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import OrderedDict

# Keeps a dead letter under the producer's request size even when the original was huge;
# the size and sha256 still identify the original.
MAX_KEPT_BYTES = 512 * 1024


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
    """The ids of the dead letters this worker has sent to the broker it talks to now (the
    latest `capacity`: replays reach back only as far as the last committed offset)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, letter: str) -> bool:
        return letter in self._ids

    def add(self, letter: str) -> None:
        self._ids[letter] = None
        self._ids.move_to_end(letter)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def forget(self) -> None:
        """The broker came back empty: what was sent is gone, so nothing counts as sent."""
        self._ids.clear()
