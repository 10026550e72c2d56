"""Events folded into profiles per second by one worker, end to end through the embedded broker.

    python benchmarks/events.py [--quick] [--events 100000]

Items (2,000) and 10,000 user profiles are written into the store directly (no encoding:
events only need the items' vectors); then `fusionrec up` starts on that data, and events
(views, clicks, likes, dislikes over random users and items) are produced to the events topic
as fast as the producer goes. Eleven marker events, at 0%, 10%, ..., 100% of the stream, are
likes by marker users with no profile yet: the partition is consumed in order, so when
Recommend stops answering cold_start for marker k, every event before it is in a profile the
ranker reads. That gives the rate overall and of each tenth, the first and last included.

Two workers in one consumer group are not measured: they would have to share the profiles'
store, and Qdrant local mode is one process with an exclusive lock (a Qdrant server cannot be
installed here). Two workers each with a store of its own is a different system, so the JSON
has null and the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the repository's packages

import numpy as np  # noqa: E402
from kafka import KafkaProducer  # noqa: E402

from benchmarks._common import (  # noqa: E402
    SEEDED,
    Seeder,
    admitted,
    header,
    last_line,
    peak_rss_mb,
    running_stack,
    table,
)
from serving.client import RankerClient  # noqa: E402

TYPES = ["view"] * 6 + ["click"] * 2 + ["like", "dislike"]
TWO_WORKERS = (
    "not measurable here: two workers in one group must share the profile store, and Qdrant "
    "local mode is one process with an exclusive lock (no Qdrant server installs here); two "
    "workers with a local store each would not be the same system"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to keep it working")
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    n_items, n_users = 2000, 10_000
    if args.quick:
        args.events, n_items, n_users = 2000, 100, 200
    header("Events folded into profiles (benchmarks/events.py)")
    print(
        f"{args.events} events over {n_users} users (profiles seeded) and {n_items} items "
        "(seeded directly, text + image vectors); one worker, one partition\n",
        flush=True,
    )
    rng = np.random.default_rng(0)
    seeder = Seeder(Path(tempfile.mkdtemp(prefix="bench-events-")), rng)
    with seeder.store() as (catalog, users):
        seeder.add_items(catalog, n_items)
        seeder.add_users(users, n_users)
    marks = [round(args.events * k / 10) for k in range(11)]
    with running_stack(seeder.settings.data_dir.parent, SEEDED) as (child, settings):
        ranker = RankerClient(child.target, timeout=30)
        producer = KafkaProducer(
            bootstrap_servers=child.bootstrap, linger_ms=20, batch_size=512 * 1024, acks=1
        )
        topic, now = settings.kafka.events_topic, time.time()

        def send(user: str, item: int, kind: str, n: int) -> None:
            event = {
                "event_id": f"e-{n}",
                "user_id": user,
                "item_id": f"item-{item}",
                "type": kind,
                "timestamp": now + n * 1e-3,
            }
            producer.send(topic, key=user.encode(), value=json.dumps(event).encode())

        users_of = rng.integers(0, n_users, args.events)
        items_of = rng.integers(0, n_items, args.events + 11)
        kinds = rng.integers(0, len(TYPES), args.events)
        start = time.monotonic()
        for n in range(args.events + 1):
            if n in marks:
                send(f"marker-{marks.index(n)}", int(items_of[-1 - marks.index(n)]), "like", -n - 1)
            if n < args.events:
                send(f"user-{users_of[n]}", int(items_of[n]), TYPES[kinds[n]], n)
        producer.flush()
        produced_s = time.monotonic() - start
        seen_at = []
        for k in range(11):
            while admitted(ranker.recommend, f"marker-{k}", 1, explain=False).cold_start:
                time.sleep(0.02)
            seen_at.append(time.monotonic() - start)
        rss = peak_rss_mb(child.process.pid)
        ranker.close()
        producer.close()
    tenth = args.events / 10
    rates = [tenth / (b - a) for a, b in pairwise(seen_at)]
    overall = args.events / seen_at[-1]
    rows = [[f"{k * 10}-{k * 10 + 10}%", round(seen_at[k + 1], 2), rates[k]] for k in range(10)]
    table(["events", "folded by (s)", "events/s"], rows)
    print(
        f"produced in {produced_s:.1f} s ({args.events / produced_s:.0f}/s); folded end to end "
        f"{overall:.0f} events/s (first 10% {rates[0]:.0f}/s, last 10% {rates[-1]:.0f}/s); "
        f"two workers: {TWO_WORKERS}; peak RSS {rss} MB\n",
        flush=True,
    )
    last_line(
        {
            "events": args.events,
            "users": n_users,
            "items": n_items,
            "events_per_s_1_worker": round(overall, 1),
            "events_per_s_first_10pct": round(rates[0], 1),
            "events_per_s_last_10pct": round(rates[-1], 1),
            "events_per_s_by_tenth": [round(r, 1) for r in rates],
            "produce_events_per_s": round(args.events / produced_s, 1),
            "events_per_s_2_workers": None,
            "events_per_s_2_workers_reason": TWO_WORKERS,
            "peak_rss_mb": rss,
        }
    )


if __name__ == "__main__":
    main()
