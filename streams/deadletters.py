"""Dead letters: what could not be processed, with the reason, where it came from and its bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import time

# Keeps a dead letter under the producer's request size even when the original was huge;
# the size and sha256 still identify the original.
MAX_KEPT_BYTES = 512 * 1024


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
