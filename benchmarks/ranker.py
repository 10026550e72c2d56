"""Recommend latency and throughput over gRPC against the floor of the same query in the store.

    python benchmarks/ranker.py [--quick] [--requests 300] [--seconds 10]

For each catalog size (10k, then 20k items; 10k user profiles, the first 1,000 queried):
  - floor: the bare Qdrant query in this process on the same data (one nearest-neighbour
    request per modality of the user's profile, `candidates_per_modality` each, no payload,
    vectors or filter), and exact numpy top-k over the same vectors;
  - then `fusionrec up` on that data directory (the store is locked while it runs) and
    Recommend(limit 10, no filter, seen excluded): one pass over the queried users at
    concurrency 1 from a cold start (reported apart), then at concurrency 1, 8 and 32
    (grpc.aio), the steady state; and one caller pausing a call's time between calls, so the
    ranker is busy about half the time (back to back, it is paced to its share of the loop).
Items and profiles are written directly with fusionrec.store + Catalog.upsert + Users.save,
with vectors drawn around topic centres instead of encoded (text 384-d, image 1280-d); each
profile has seen 20 items and liked the last 5 of them, folded as the worker folds them (tag
affinity, recent positives, the items' popularity and co-engagement). The
last line is one JSON object with the 10k-item figures (and the 20k ones under "at_20k").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the repository's packages

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from qdrant_client import models  # noqa: E402

from benchmarks._common import (  # noqa: E402
    SEEDED,
    Seeder,
    header,
    last_line,
    peak_rss_mb,
    percentiles_ms,
    running_stack,
    table,
)
from fusionrec.settings import Settings  # noqa: E402
from fusionrec.store import user_point_id  # noqa: E402
from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc  # noqa: E402

CONCURRENCY = (1, 8, 32)


def floors(seeder: Seeder, user_ids: list[str], settings: Settings) -> dict[str, Any]:
    """Bare Qdrant query and numpy exact top-k for the same user vectors, in this process."""
    k = settings.ranker.candidates_per_modality
    matrices = seeder.matrices()
    qdrant, exact = [], []
    with seeder.store() as (catalog, _):
        client = catalog.client
        users = settings.qdrant.users_collection
        for u in user_ids:
            vectors = client.retrieve(users, [user_point_id(u)], with_vectors=True)[0].vector
            assert isinstance(vectors, dict)
            requests = [
                models.QueryRequest(query=list(v), using=name, limit=k)
                for name, v in vectors.items()
            ]
            t = time.perf_counter()
            client.query_batch_points(settings.qdrant.items_collection, requests=requests)
            qdrant.append(time.perf_counter() - t)
            t = time.perf_counter()
            for name, v in vectors.items():
                q = np.asarray(v, dtype=np.float32)
                scores = matrices[name] @ (q / np.linalg.norm(q))
                top = np.argpartition(-scores, k)[:k]
                top[np.argsort(-scores[top])]
            exact.append(time.perf_counter() - t)
    return {"floor": percentiles_ms(qdrant), "numpy": percentiles_ms(exact)}


async def load(
    target: str,
    user_ids: list[str],
    concurrency: int,
    requests: int,
    seconds: float,
    pause: float = 0.0,
):
    """Closed loop: `concurrency` callers, each sending its next request `pause` seconds after
    one returns.

    A RESOURCE_EXHAUSTED answer (the ranker's admission control: in local mode Recommend may
    take 80% of the shared event loop, 50% while the worker has a backlog, and a lone caller
    over that share is paced to it) is retried after 10 ms, as it asks;
    latency runs from the first attempt to the answer, service time is the admitted attempt's
    alone. Refusals are counted apart from errors.
    """
    latencies: list[float] = []
    service: list[float] = []
    errors: dict[str, int] = {}
    refusals = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        deadline = time.monotonic() + seconds
        counter = iter(range(10**9))

        async def caller() -> None:
            nonlocal refusals
            while time.monotonic() < deadline and (n := next(counter)) < requests:
                request = ranker_pb2.RecommendRequest(
                    user_id=user_ids[n % len(user_ids)], limit=10, explain=True
                )
                t = time.perf_counter()
                while True:
                    attempt = time.perf_counter()
                    try:
                        await stub.Recommend(request, timeout=30)
                        latencies.append(time.perf_counter() - t)
                        service.append(time.perf_counter() - attempt)
                        await asyncio.sleep(pause)
                        break
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                        if (
                            code == grpc.StatusCode.RESOURCE_EXHAUSTED
                            and time.perf_counter() - t < 30
                        ):
                            refusals += 1
                            await asyncio.sleep(0.01)
                            continue
                        errors[code.name] = errors.get(code.name, 0) + 1
                        break

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, service, errors, refusals, len(latencies) / elapsed


def measure(seeder: Seeder, root: Path, args: argparse.Namespace, n_items: int) -> dict[str, Any]:
    user_ids = [f"user-{u}" for u in range(min(args.users, 1000))]
    floor = floors(seeder, user_ids[: args.floor_users], seeder.settings)
    out: dict[str, Any] = {"items": n_items, **floor}
    with running_stack(root, SEEDED) as (child, _):
        # The first pass over the users, at c1, is the cold start: the layout, the first
        # fresh/popular lists, gRPC channels and the ranker's item cache are all read or made
        # then. The figures after it are the steady state a running ranker is in.
        lat, *_ = asyncio.run(load(child.target, user_ids, 1, len(user_ids), 3 * args.seconds))
        out["cold_c1"] = percentiles_ms(lat)
        for c in CONCURRENCY:
            n = args.requests * (1 if c == 1 else 3)
            lat, service, errors, refused, qps = asyncio.run(
                load(child.target, user_ids, c, n, args.seconds)
            )
            out[f"c{c}"] = {
                **percentiles_ms(lat),
                "service": percentiles_ms(service),
                "qps": round(qps, 1),
                "errors": errors,
                "refusals": refused,
            }
        # One caller pausing a call's time between calls: the ranker busy about half the time,
        # below the share of the loop it is paced to when a caller never pauses.
        pause = out["c1"]["p50"] / 1000
        lat, *_ = asyncio.run(load(child.target, user_ids, 1, args.requests, args.seconds, pause))
        out["half_c1"] = percentiles_ms(lat)
        out["peak_rss_mb"] = peak_rss_mb(child.process.pid)
    return out


def report(r: dict[str, Any]) -> None:
    print(f"## {r['items']} items")
    rows = [
        ["qdrant floor (bare query)", r["floor"]["p50"], r["floor"]["p99"], None, None, None],
        ["numpy exact top-k", r["numpy"]["p50"], r["numpy"]["p99"], None, None, None],
    ]
    cold, half = r["cold_c1"], r["half_c1"]
    rows.append(["Recommend c1, first pass (cold)", cold["p50"], cold["p99"], None, None, None])
    for c in CONCURRENCY:
        x = r[f"c{c}"]
        errors = sum(x["errors"].values())
        rows.append([f"Recommend c{c}", x["p50"], x["p99"], x["qps"], x["refusals"], errors])
        service = x["service"]
        rows.append([f"  admitted attempt c{c}", service["p50"], service["p99"], None, None, None])
        if c == 1:
            rows.append(["Recommend c1, half busy", half["p50"], half["p99"], None, None, None])
        if x["errors"]:
            print(f"c{c} errors: {x['errors']}")
    table(["what", "p50 ms", "p99 ms", "qps", "refusals (retried)", "errors"], rows)
    print(
        f"ratio Recommend/floor at c1: p50 {_ratio(r, 'p50')}x, p99 {_ratio(r, 'p99')}x; "
        f"admitted attempt/floor: p50 {_ratio(r, 'p50', True)}x, p99 {_ratio(r, 'p99', True)}x; "
        f"peak RSS {r['peak_rss_mb']} MB\n",
        flush=True,
    )


def _ratio(r: dict[str, Any], key: str, service: bool = False) -> float | None:
    served = (r["c1"]["service"] if service else r["c1"])[key]
    floor = r["floor"][key]
    return None if served is None or not floor else round(served / floor, 2)


def figures(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "items": r["items"],
        "recommend_p50_ms_c1": r["c1"]["p50"],
        "recommend_p99_ms_c1": r["c1"]["p99"],
        "recommend_cold_p50_ms_c1": r["cold_c1"]["p50"],
        "recommend_cold_p99_ms_c1": r["cold_c1"]["p99"],
        "recommend_half_busy_p50_ms_c1": r["half_c1"]["p50"],
        "recommend_half_busy_p99_ms_c1": r["half_c1"]["p99"],
        "floor_p50_ms_c1": r["floor"]["p50"],
        "floor_p99_ms_c1": r["floor"]["p99"],
        "numpy_p99_ms": r["numpy"]["p99"],
        "overhead_ratio_c1": _ratio(r, "p99"),
        "overhead_ratio_p50_c1": _ratio(r, "p50"),
        "service_p50_ms_c1": r["c1"]["service"]["p50"],
        "service_p99_ms_c1": r["c1"]["service"]["p99"],
        "service_overhead_ratio_p50_c1": _ratio(r, "p50", True),
        "service_overhead_ratio_c1": _ratio(r, "p99", True),
        "errors_c1": sum(r["c1"]["errors"].values()),
        "recommend_p99_ms_c8": r["c8"]["p99"],
        "recommend_qps_c8": r["c8"]["qps"],
        "recommend_p99_ms_c32": r["c32"]["p99"],
        "recommend_qps_c32": r["c32"]["qps"],
        "errors_c32": sum(r["c32"]["errors"].values()),
        "errors_c32_by_code": r["c32"]["errors"],
        "refusals_retried": {f"c{c}": r[f"c{c}"]["refusals"] for c in CONCURRENCY},
        "peak_rss_mb": r["peak_rss_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to keep it working")
    parser.add_argument("--requests", type=int, default=300, help="requests at c1 (3x at c8/c32)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time cap per concurrency")
    args = parser.parse_args()
    sizes, args.users, args.floor_users = (10_000, 20_000), 10_000, 200
    if args.quick:
        sizes, args.users, args.floor_users, args.requests, args.seconds = (300,), 50, 10, 10, 5
    header("Recommend latency and throughput (benchmarks/ranker.py)")
    print(
        f"seeded directly: {sizes[-1]} items max (text 384-d + image 1280-d vectors), "
        f"{args.users} user profiles (20 items seen, 5 of them liked); "
        f"queries over {min(args.users, 1000)} users, "
        "limit 10, no filter, seen items excluded\n",
        flush=True,
    )
    seeder = Seeder(Path(tempfile.mkdtemp(prefix="bench-ranker-")), np.random.default_rng(0))
    root = seeder.settings.data_dir.parent
    results = []
    for n_items in sizes:
        with seeder.store() as (catalog, users):
            seeder.add_items(catalog, n_items - seeder.count)
            if not results:  # profiles once, from the first catalog's items
                seeder.add_users(users, args.users, liked=5)
        result = measure(seeder, root, args, n_items)
        report(result)
        results.append(figures(result))
    first, *more = results
    if more:
        # The memory figure is the stack holding the larger catalog.
        first["peak_rss_mb_10k"], first["peak_rss_mb"] = (
            first["peak_rss_mb"],
            more[-1]["peak_rss_mb"],
        )
        first["at_20k"] = more[-1]
    last_line(first)


if __name__ == "__main__":
    main()
