"""Events folded into profiles per second by one worker, end to end through the embedded broker.

    python benchmarks/events.py [--quick] [--events 100000]

Items (2,000) and 10,000 user profiles are written into the store directly (no encoding:
events only need the items' vectors); then `fusionrec up` starts on that data, and events
(views, clicks, likes, dislikes over random users and items) are produced to the events topic
as fast as the producer goes. Eleven marker events, at 0%, 10%, ..., 100% of the stream, are
likes by marker users with no profile yet: the partition is consumed in order, so when
Recommend stops answering cold_start for marker k, every event before it is in a profile the
ranker reads. That gives the rate overall and of each tenth, the first and last included.
Beside each marker check a seeded user's Recommend is timed: the ranker's latency while the
worker it shares the loop with has a backlog.

In the same run, before the stack starts, the same events are folded in-process by
`Users.apply` in batches of the worker's size, on a second store seeded alike: the fold alone,
without broker, Faust or gRPC, the floor the end-to-end rate builds on.

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
from typing import Any

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
    percentiles_ms,
    running_stack,
    table,
)
from serving.client import RankerClient  # noqa: E402
from streams.records import EventRecord  # noqa: E402

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
    seeders = [
        Seeder(Path(tempfile.mkdtemp(prefix="bench-events-")), np.random.default_rng(0))
        for _ in range(2)
    ]
    for seeder in seeders:  # alike: same seed, same draws
        with seeder.store() as (catalog, users):
            seeder.add_items(catalog, n_items)
            seeder.add_users(users, n_users)
    seeder, twin = seeders
    rng = seeder.rng
    users_of = rng.integers(0, n_users, args.events)
    items_of = rng.integers(0, n_items, args.events + 11)
    kinds = rng.integers(0, len(TYPES), args.events)
    now = time.time()

    def event(user: str, item: int, kind: str, n: int) -> dict:
        return {
            "event_id": f"e-{n}",
            "user_id": user,
            "item_id": f"item-{item}",
            "type": kind,
            "timestamp": now + n * 1e-3,
        }

    stream = [
        event(f"user-{users_of[n]}", int(items_of[n]), TYPES[kinds[n]], n)
        for n in range(args.events)
    ]
    marks = [round(args.events * k / 10) for k in range(11)]
    alone = fold_alone(twin, stream, marks)
    with running_stack(seeder.settings.data_dir.parent, SEEDED) as (child, settings):
        ranker = RankerClient(child.target, timeout=30)
        producer = KafkaProducer(
            bootstrap_servers=child.bootstrap, linger_ms=20, batch_size=512 * 1024, acks=1
        )
        topic = settings.kafka.events_topic

        def send(e: dict) -> None:
            producer.send(topic, key=e["user_id"].encode(), value=json.dumps(e).encode())

        start = time.monotonic()
        for n in range(args.events + 1):
            if n in marks:
                k = marks.index(n)
                send(event(f"marker-{k}", int(items_of[-1 - k]), "like", -n - 1))
            if n < args.events:
                send(stream[n])
        producer.flush()
        produced_s = time.monotonic() - start
        seen_at = []
        busy = []  # a seeded user's Recommend while the worker drains its backlog
        for k in range(11):
            while True:
                asked = time.perf_counter()
                admitted(ranker.recommend, "user-0", 10, explain=False)
                busy.append(time.perf_counter() - asked)
                if not admitted(ranker.recommend, f"marker-{k}", 1, explain=False).cold_start:
                    break
                time.sleep(0.02)
            seen_at.append(time.monotonic() - start)
        rss = peak_rss_mb(child.process.pid)
        ranker.close()
        producer.close()
    tenth = args.events / 10
    rates = [tenth / (b - a) for a, b in pairwise(seen_at)]
    overall = args.events / seen_at[-1]
    during = percentiles_ms(busy)
    rows = [
        [f"{k * 10}-{k * 10 + 10}%", round(seen_at[k + 1], 2), rates[k], alone["by_tenth"][k]]
        for k in range(10)
    ]
    table(["events", "folded by (s)", "events/s", "fold alone, events/s"], rows)
    print(
        f"produced in {produced_s:.1f} s ({args.events / produced_s:.0f}/s); folded end to end "
        f"{overall:.0f} events/s (first 10% {rates[0]:.0f}/s, last 10% {rates[-1]:.0f}/s); "
        f"the fold alone in-process {alone['overall']:.0f} events/s (end to end / alone "
        f"{overall / alone['overall']:.2f}); "
        f"Recommend for a seeded user meanwhile (refusals retried): p50 {during['p50']} ms, "
        f"p99 {during['p99']} ms, max {during['max']} ms; "
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
            "fold_alone_events_per_s": round(alone["overall"], 1),
            "fold_alone_events_per_s_by_tenth": [round(r, 1) for r in alone["by_tenth"]],
            "end_to_end_over_fold_alone": round(overall / alone["overall"], 2),
            "recommend_p50_ms_during_backlog": during["p50"],
            "recommend_p99_ms_during_backlog": during["p99"],
            "recommend_max_ms_during_backlog": during["max"],
            "events_per_s_2_workers": None,
            "events_per_s_2_workers_reason": TWO_WORKERS,
            "peak_rss_mb": rss,
        }
    )


def fold_alone(seeder: Seeder, stream: list[dict], marks: list[int]) -> dict[str, Any]:
    """`Users.apply` over `stream` in the worker's batches, in this process: events/s overall
    and between consecutive `marks` (the tenths the end-to-end run times)."""
    batch = seeder.settings.worker.batch_size
    records = [EventRecord.model_validate(e) for e in stream]
    by_tenth: list[float] = []
    with seeder.store() as (_, users):
        start = mark = time.perf_counter()
        for a, b in pairwise(marks):
            for first in range(a, b, batch):
                users.apply(records[first : min(first + batch, b)])
            now = time.perf_counter()
            by_tenth.append((b - a) / (now - mark))
            mark = now
        overall = len(records) / (now - start)
    return {"overall": overall, "by_tenth": by_tenth}


if __name__ == "__main__":
    main()
