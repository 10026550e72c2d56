"""At-least-once without duplicates in effect: the worker SIGKILLed at random while items and
events stream in, restarted on the same data directory, and the store checked afterwards.

    python benchmarks/chaos.py [--items 10000] [--events 50000] [--kills 10] [--seed 0]

The embedded broker is memory only, so it is started here and outlives the worker:
`python -m fusionrec up --kafka <it>` runs worker + ranker (no broker of its own), with
FUSIONREC_ENCODERS__ENABLED='["text"]' to keep encoding cheap (items are text only). A thread
publishes items and events, paced over the run; each life of the worker is SIGKILLed (its whole
process group) at a seeded random moment 0.2-2 s after it first reports consumer lag, i.e.
mid-consumption; then it is started again. After the last kill, a marker item and a marker event
(one partition per topic, consumed in order) say when the stream is drained; the worker is
stopped with SIGTERM and the Qdrant local store opened here (its lock is free then).

Checks, from the store alone:
- items: points, distinct payload item_id (duplicates = points - distinct), published ids absent;
- profiles: the fold is linear, so a stored profile is sum_i a_i * w_i * decay(t_ref - t_i) * x_i
  over the user's published events, with the item vectors read back from the store; least
  squares gives each a_i, which must be 1 (0: lost, 2: applied twice). Each user's events are on
  distinct items, so the terms are independent and the attribution is exact. Also the plain
  check: the stored profile against streams.profiles.fold over all its events (allclose);
- popularity: per item, the decayed sum of the positive weights of its events;
- co-engagement: a user's k-th positive is paired with min(k - 1, co_window) earlier ones, each
  pair counted on both items, whatever order the worker folds them in (a user's items are
  distinct), so the counts must add up to exactly that and be symmetric (the cap on partners
  is lifted for the run so nothing is pruned).
Per-user event counts stay far below profiles.dedupe_window (2000), the bound on how far back a
replay is recognised.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(ROOT / "benchmarks"):
    sys.path[0] = str(ROOT)  # run as a script: the repository's packages, not benchmarks/*.py

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from fusionrec import store  # noqa: E402
from fusionrec.broker import EmbeddedBroker, free_port  # noqa: E402
from fusionrec.publisher import Publisher  # noqa: E402
from fusionrec.settings import ProfileSettings, Settings, load_settings  # noqa: E402
from serving.client import RankerClient  # noqa: E402
from streams.profiles import DAY_S, accumulate, decay, event_weight, fold  # noqa: E402

# Every type has a non-zero weight: an event of weight 0 has no effect to count.
TYPES = ["view"] * 5 + ["click"] * 2 + ["like", "purchase", "dislike"]
MARKER_ITEM, MARKER_USER = "chaos-marker-item", "chaos-marker-user"
VECTOR = "text.minilm-l6-v2"
CO_CAP = 1_000_000  # no partner pruned: the counts are checked exactly
# Shed (admission control) or not listening yet (the last life still starting): ask again.
NOT_YET = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass
class Plan:
    items: list[dict[str, Any]]
    events: list[dict[str, Any]]


def make_plan(n_items: int, n_events: int, n_users: int, rng: np.random.Generator) -> Plan:
    now = time.time()
    words = ["red", "blue", "jazz", "rock", "chair", "lamp", "novel", "poem", "tea", "wine"]
    items = [
        {
            "id": f"item-{i}",
            "title": f"item {i} " + " ".join(rng.choice(words, 3)),
            "description": f"number {i}",
            "created_at": now,
        }
        for i in range(n_items)
    ]
    # Events spread over users; each user's events on distinct items (see the docstring).
    users = rng.integers(0, n_users, n_events)
    per_user: dict[int, int] = defaultdict(int)
    for u in users:
        per_user[int(u)] += 1
    picks = {u: iter(rng.choice(n_items, k, replace=False)) for u, k in per_user.items()}
    # Timestamps over the last 5 days (half-life 30): an old duplicate still weighs > 0.89.
    stamps = now - rng.uniform(0, 5 * DAY_S, n_events)
    events = [
        {
            "event_id": f"ev-{n}",
            "user_id": f"user-{u}",
            "item_id": f"item-{next(picks[int(u)])}",
            "type": TYPES[int(rng.integers(0, len(TYPES)))],
            "timestamp": float(stamps[n]),
        }
        for n, u in enumerate(users)
    ]
    return Plan(items, events)


@dataclass
class Worker:
    """`fusionrec up --kafka` (worker + ranker, no broker) on one data directory."""

    root: Path
    bootstrap: str
    env: dict[str, str]
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "fusionrec", "up", "--kafka", self.bootstrap]
        cmd += ["--data-dir", str(self.root / "state"), "--port", str(self.grpc_port)]
        env = {**os.environ, **self.env, "FUSIONREC_METRICS__PORT": str(self.metrics_port)}
        with (self.root / "worker.log").open("ab") as out:
            self.process = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return (self.root / "worker.log").read_text(errors="replace")[-chars:]

    def lag(self) -> float | None:
        """Total consumer lag after the last batch of this life; None before its first batch."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
            ) as r:
                text = r.read().decode()
        except OSError:
            return None
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("fusionrec_consumer_lag{")
        ]
        return sum(values) if values else None

    def wait_until(self, what: str, check: Any, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if not self.alive():
                raise RuntimeError(f"the worker died waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the worker ignored SIGTERM for {timeout:.0f} s") from None


def _publish(settings: Settings, plan: Plan, span_s: float, done: threading.Event) -> None:
    """Items and events interleaved in chunks, spread over span_s seconds."""
    publisher = Publisher(settings)
    try:
        chunks = max(1, int(span_s / 0.25))
        ni, ne = len(plan.items), len(plan.events)
        start = time.monotonic()
        for c in range(chunks):
            publisher.publish_all("items", plan.items[c * ni // chunks : (c + 1) * ni // chunks])
            publisher.publish_all("events", plan.events[c * ne // chunks : (c + 1) * ne // chunks])
            time.sleep(max(0.0, start + (c + 1) * span_s / chunks - time.monotonic()))
    finally:
        publisher.close()
        done.set()


def run_chaos(
    root: Path,
    n_items: int,
    n_events: int,
    kills: int,
    *,
    n_users: int | None = None,
    seed: int = 0,
    span_s: float | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Stream the plan through a worker killed `kills` times; the figures of `verify`."""
    rng = np.random.default_rng(seed)
    n_users = n_users or max(1, n_events // 25)
    plan = make_plan(n_items, n_events, n_users, rng)
    env = {
        # Text only: encoding is not what is under test, and MiniLM is the cheapest encoder.
        "FUSIONREC_ENCODERS__ENABLED": '["text"]',
        "FUSIONREC_ENCODERS__THREADS": "1",
        "FUSIONREC_MEDIA__ROOT": str(root),
        "FUSIONREC_PROFILES__CO_CAP": str(CO_CAP),
        # It is the Tansu broker: the same workarounds `fusionrec up` turns on for its own.
        "FUSIONREC_KAFKA__EMBEDDED": "true",
        "FUSIONREC_LOG_LEVEL": "WARNING",
    }
    kill_log: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with EmbeddedBroker() as broker:
        settings = load_settings(kafka={"bootstrap": broker.bootstrap})
        k = settings.kafka
        # One partition each, so a marker published last is consumed last.
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics(
            [NewTopic(t, 1, 1) for t in (k.items_topic, k.events_topic, k.dead_letters_topic)]
        )
        admin.close()
        worker = Worker(root, broker.bootstrap, env)
        ranker: RankerClient | None = None
        done = threading.Event()
        publisher = threading.Thread(
            target=_publish,
            args=(settings, plan, span_s or 12.0 * max(kills, 1), done),
            daemon=True,
        )
        try:
            for life in range(kills + 1):
                worker.start()
                if life == 0:
                    publisher.start()
                if life == kills:
                    break
                # Mid-consumption: after this life's first batch, at a seeded random moment.
                worker.wait_until("first batch", lambda: worker.lag() is not None)
                time.sleep(float(rng.uniform(0.2, 2.0)))
                lag = worker.lag()
                worker.kill()
                kill_log.append(
                    {
                        "kill": life + 1,
                        "at_s": round(time.monotonic() - t0, 1),
                        "lag": lag,
                        "publishing": not done.is_set(),
                    }
                )
                log(f"kill {life + 1}: at {kill_log[-1]['at_s']} s, consumer lag {lag}")
            publisher.join()
            marker = Publisher(settings)
            marker.publish_all("items", [{"id": MARKER_ITEM, "title": "marker"}])
            marker.publish_all(
                "events",
                [
                    {
                        "event_id": "ev-marker",
                        "user_id": MARKER_USER,
                        "item_id": MARKER_ITEM,
                        "type": "like",
                        "timestamp": time.time(),
                    }
                ],
            )
            marker.close()
            ranker = RankerClient(f"127.0.0.1:{worker.grpc_port}", timeout=10)
            worker.wait_until("marker item", lambda: _known(ranker, MARKER_ITEM), timeout=900)
            worker.wait_until("marker event", lambda: _folded(ranker, MARKER_USER), timeout=900)
            drained_s = time.monotonic() - t0
            # Events held for a late item go in at the next retry tick: give it a few.
            time.sleep(3 * settings.profiles.pending_retry_s + 1)
            worker.stop()
        finally:
            if ranker is not None:
                ranker.close()
            if worker.alive():
                worker.kill()
    figures = verify(Settings(data_dir=root / "state"), plan)
    return {
        "kills": len(kill_log),
        "kill_log": kill_log,
        "drained_s": round(drained_s, 1),
        "users": n_users,
        **figures,
    }


def _known(ranker: RankerClient, item_id: str) -> bool:
    try:
        ranker.similar(item_id, 1, explain=False)
        return True
    except grpc.RpcError as exc:
        if exc.code() in (*NOT_YET, grpc.StatusCode.NOT_FOUND):
            return False
        raise


def _folded(ranker: RankerClient, user_id: str) -> bool:
    try:
        return not ranker.recommend(user_id, 1, explain=False).cold_start
    except grpc.RpcError as exc:
        if exc.code() in NOT_YET:
            return False
        raise


def _scroll(client: Any, collection: str, vectors: bool) -> list[Any]:
    out, offset = [], None
    while True:
        points, offset = client.scroll(
            collection, limit=1024, offset=offset, with_payload=True, with_vectors=vectors
        )
        out.extend(points)
        if offset is None:
            return out


def verify(settings: Settings, plan: Plan) -> dict[str, Any]:
    """What the store holds against what was published (the worker must be stopped)."""
    cfg: ProfileSettings = settings.profiles
    half_life_s = cfg.half_life_days * DAY_S
    client = store.connect(settings)
    try:
        item_points = _scroll(client, settings.qdrant.items_collection, True)
        user_points = _scroll(client, settings.qdrant.users_collection, True)
    finally:
        client.close()
    stored_ids = [p.payload[store.ITEM_ID] for p in item_points]
    published = {i["id"] for i in plan.items}
    vectors: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(384, dtype=np.float32))
    vectors.update({p.payload[store.ITEM_ID]: np.asarray(p.vector[VECTOR]) for p in item_points})
    pop_half_life_s = settings.profiles.popularity_half_life_days * DAY_S
    stored_pop = {
        p.payload[store.ITEM_ID]: (
            float(p.payload.get(store.POPULARITY) or 0.0),
            float(p.payload.get(store.POPULARITY_AT) or 0.0),
        )
        for p in item_points
    }

    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    expected_at: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for e in sorted(plan.events, key=lambda e: e["timestamp"]):
        by_user[e["user_id"]].append(e)
        w = event_weight(e["type"], None, cfg)
        if w > 0:
            expected_at[e["item_id"]] = accumulate(
                *expected_at[e["item_id"]], w, e["timestamp"], pop_half_life_s
            )
    # Compared as of one time: each decayed sum is worth value * decay(t - at) at time t.
    t_common = max([at for _, at in (*stored_pop.values(), *expected_at.values())], default=0.0)
    popularity = {i: v * decay(t_common - at, pop_half_life_s) for i, (v, at) in stored_pop.items()}
    expected_pop = {
        i: v * decay(t_common - at, pop_half_life_s) for i, (v, at) in expected_at.items()
    }
    profiles = {p.payload["user_id"]: p for p in user_points}

    applied = twice = lost = unexplained = mismatched = held = remembered_twice = 0
    for user, events in by_user.items():
        events.sort(key=lambda e: e["timestamp"])
        point = profiles.get(user)
        if point is None:
            lost += len(events)
            mismatched += 1
            continue
        held += len(point.payload.get("pending") or [])
        ids = point.payload.get("recent_event_ids") or []
        remembered_twice += len(ids) - len(set(ids))
        got = np.asarray((point.vector or {}).get(VECTOR, np.zeros(0)), dtype=np.float64)
        # The plain check: the fold of every published event, once, in timestamp order.
        want: dict[str, np.ndarray] = {}
        t_ref = 0.0
        for e in events:
            w = event_weight(e["type"], None, cfg)
            want, t_ref = fold(
                want, t_ref, {VECTOR: vectors[e["item_id"]]}, w, e["timestamp"], half_life_s
            )
        if got.shape != want[VECTOR].shape or not np.allclose(
            got, want[VECTOR], rtol=1e-4, atol=1e-4
        ):
            mismatched += 1
        if got.size == 0:
            lost += len(events)
            continue
        # Attribution: each event's term at the stored t_ref; a term after t_ref was not applied.
        t_stored = float(point.payload["t_ref"])
        terms = np.stack(
            [
                event_weight(e["type"], None, cfg)
                * decay(t_stored - e["timestamp"], half_life_s)
                * vectors[e["item_id"]].astype(np.float64)
                if e["timestamp"] <= t_stored
                else np.zeros(got.size)
                for e in events
            ]
        )
        a, *_ = np.linalg.lstsq(terms.T, got, rcond=None)
        counts = np.rint(a).astype(int)
        residual = float(np.linalg.norm(terms.T @ a - got)) / max(float(np.linalg.norm(got)), 1e-9)
        if residual > 1e-3 or np.abs(a - counts).max() > 0.05:
            unexplained += len(events)
            continue
        applied += int((counts >= 1).sum())
        twice += int((counts >= 2).sum())
        lost += int((counts <= 0).sum())

    co = {p.payload[store.ITEM_ID]: p.payload.get(store.CO_ENGAGED) or {} for p in item_points}
    co_total = sum(sum(counts.values()) for counts in co.values())
    co_expected = 0
    for events in by_user.values():
        k = sum(event_weight(e["type"], None, cfg) > 0 for e in events)
        co_expected += 2 * sum(min(j, cfg.co_window) for j in range(k))
    co_asymmetric = sum(
        n != co.get(b, {}).get(a, 0) for a, counts in co.items() for b, n in counts.items()
    )
    pop_bad = [
        i
        for i in published
        if not np.isclose(popularity.get(i, 0.0), expected_pop.get(i, 0.0), rtol=1e-6, atol=1e-6)
    ]
    pop_extra = sum(max(0.0, popularity.get(i, 0.0) - expected_pop.get(i, 0.0)) for i in pop_bad)
    pop_missing = sum(max(0.0, expected_pop.get(i, 0.0) - popularity.get(i, 0.0)) for i in pop_bad)
    return {
        "items_published": len(plan.items),
        "items_in_store": len(published & set(stored_ids)),
        "items_missing": len(published - set(stored_ids)),
        "points": len(item_points),
        "duplicate_points": len(stored_ids) - len(set(stored_ids)),
        "events_published": len(plan.events),
        "events_applied": applied,
        "events_applied_twice": twice,
        "events_lost": lost,
        "events_unexplained": unexplained,
        "events_still_held": held,
        "event_ids_remembered_twice": remembered_twice,
        "users_profile_mismatch": mismatched,
        "items_popularity_mismatch": len(pop_bad),
        "popularity_extra": round(pop_extra, 3),
        "popularity_missing": round(pop_missing, 3),
        "co_engagement_expected": co_expected,
        "co_engagement_stored": co_total,
        "co_engagement_asymmetric": co_asymmetric,
    }


def main() -> None:
    from benchmarks._common import header, last_line, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--users", type=int, default=None, help="default: events / 25")
    parser.add_argument("--span", type=float, default=None, help="publish over this many s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header("Chaos: worker SIGKILLed while items and events stream in (benchmarks/chaos.py)")
    root = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    print(
        f"{args.items} items (text only), {args.events} events, {args.kills} kills, "
        f"seed {args.seed}; data in {root}\n",
        flush=True,
    )
    start = time.monotonic()
    figures = run_chaos(
        root,
        args.items,
        args.events,
        args.kills,
        n_users=args.users,
        seed=args.seed,
        span_s=args.span,
    )
    elapsed = time.monotonic() - start
    table(
        ["kill", "at (s)", "consumer lag", "publishing"],
        [[k["kill"], k["at_s"], k["lag"], k["publishing"]] for k in figures["kill_log"]],
    )
    table(["check", "value"], [[key, v] for key, v in figures.items() if key not in ("kill_log",)])
    print(f"elapsed {elapsed:.0f} s\n", flush=True)
    last_line({key: v for key, v in figures.items() if key != "kill_log"})
    ok = (
        figures["duplicate_points"] == 0
        and figures["items_missing"] == 0
        and figures["events_applied"] == figures["events_published"]
        and figures["events_applied_twice"] == 0
        and figures["items_popularity_mismatch"] == 0
        and figures["co_engagement_stored"] == figures["co_engagement_expected"]
        and figures["co_engagement_asymmetric"] == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
