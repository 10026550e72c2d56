"""What the stack benchmarks share: the embedded stack as a child process, direct seeding of
the store, peak RSS, percentiles, the table and the closing JSON line."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from fusionrec import store
from fusionrec.launcher import ChildStack, spawn_stack
from fusionrec.settings import Settings, load_settings
from serving.client import RankerClient
from streams.catalog import Catalog
from streams.profiles import Profile, count_co_engagement, fold_tags
from streams.records import ItemRecord
from streams.users import Users

# The encoders the stack runs in the ranker and events benchmarks (their vectors are seeded
# directly); the freshness benchmark runs the defaults.
SEEDED = {"FUSIONREC_ENCODERS__ENABLED": '["text", "image"]'}
T = TypeVar("T")
STACK = "embedded (fusionrec up: Tansu broker subprocess, Qdrant local mode, worker + ranker)"


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def header(title: str) -> None:
    print(f"# {title}\nstack: {STACK}\nmachine: {machine()}\n", flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def last_line(figures: Mapping[str, Any]) -> None:
    print(json.dumps({"stack": STACK, "machine": machine(), **figures}), flush=True)


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50": round(float(np.percentile(ms, 50)), 1),
        "p99": round(float(np.percentile(ms, 99)), 1),
        "max": round(float(ms.max()), 1),
    }


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process and its children (the stack's Python process and its Tansu
    broker), read while they run."""
    total_kb, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
        total_kb += next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
    return round(total_kb / 1024, 1)


def admitted(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, asked again while the ranker's admission control refuses it
    (RESOURCE_EXHAUSTED says "retry later"; in local mode ranker calls may take half of each
    second of the event loop they share with the worker)."""
    while True:
        try:
            return call(*args, **kwargs)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            time.sleep(0.005)


@contextmanager
def running_stack(root: Path, env: Mapping[str, str]) -> Iterator[tuple[ChildStack, Settings]]:
    """`fusionrec up` on `root/state`, serving; settings that reach its broker and ranker."""
    child = spawn_stack(root, env)
    client = RankerClient(child.target, timeout=5)
    try:
        deadline = time.monotonic() + 300
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(f"the stack died:\n{child.log_tail()}")
            if client.serving():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not serve in 300 s:\n{child.log_tail()}")
            time.sleep(0.2)
        yield child, load_settings(kafka={"bootstrap": child.bootstrap})
    finally:
        client.close()
        child.stop()


class Seeder:
    """Writes items and profiles straight into the stack's Qdrant data directory (before the
    stack starts: local mode allows one process), with vectors drawn around topic centres
    instead of encoded, so 20k items take seconds, not an hour of image encoding."""

    def __init__(self, root: Path, rng: np.random.Generator, topics: int = 50) -> None:
        self.settings = Settings(data_dir=root / "state")
        self.rng = rng
        # The vector names and sizes of the stack's text and image encoders.
        self.dims = {"text.minilm-l6-v2": 384, "image.mobilenet-v2": 1280}
        self.centres = {n: _unit(rng.standard_normal((topics, d))) for n, d in self.dims.items()}
        self.items: dict[str, list[np.ndarray]] = {n: [] for n in self.dims}
        self.topics: list[int] = []  # each item's topic: its tag is `topic-<n>`
        self.count = 0

    @contextmanager
    def store(self) -> Iterator[tuple[Catalog, Users]]:
        client = store.connect(self.settings)
        try:
            store.ensure_collections(client, self.settings, self.dims)
            store.fast_local_commits(client)
            catalog = Catalog(client, self.settings, {})
            yield catalog, Users(client, self.settings, catalog)
        finally:
            client.close()

    def add_items(self, catalog: Catalog, n: int, chunk: int = 512) -> None:
        now = time.time()
        end = self.count + n
        for start in range(self.count, end, chunk):
            ids = range(start, min(start + chunk, end))
            topics = self.rng.integers(0, len(next(iter(self.centres.values()))), len(ids))
            vectors = {
                name: _unit(c[topics] + self.rng.standard_normal((len(ids), c.shape[1])) / 16)
                for name, c in self.centres.items()
            }
            records = [
                ItemRecord.model_validate(
                    {
                        "id": f"item-{i}",
                        "title": f"item {i}",
                        "category": f"c{t % 10}",
                        "tags": [f"topic-{t}"],
                        "created_at": now - i,
                    }
                )
                for i, t in zip(ids, topics, strict=True)
            ]
            rows = [{n: v[j] for n, v in vectors.items()} for j in range(len(ids))]
            catalog.upsert(records, rows)
            for name, v in vectors.items():
                self.items[name].append(v)
            self.topics.extend(int(t) for t in topics)
        self.count = end

    def add_users(self, users: Users, n: int, seen: int = 20, liked: int = 0) -> None:
        """Profiles as the worker folds them: an unnormalised sum of the `seen` items' vectors.

        The last `liked` of those count as positives, as the worker folds them: the profile's
        tag affinity and recent positives, and the items' popularity and co-engagement (one
        delivery), so a Recommend takes every path it takes in production."""
        matrices = self.matrices()
        cfg = users.cfg
        now = time.time()
        gains: dict[str, list[list[float]]] = {}
        co: dict[str, dict[str, float]] = {}
        profiles = []
        for u in range(n):
            picks = self.rng.integers(0, self.count, seen)
            profile = Profile(
                user_id=f"user-{u}",
                vectors={name: m[picks].sum(axis=0) for name, m in matrices.items()},
                t_ref=now,
                seen=[f"item-{i}" for i in picks],
            )
            for i in picks[seen - liked :]:
                item = f"item-{i}"
                tags = [f"topic-{self.topics[i]}"]
                profile.tag_affinity = fold_tags(
                    profile.tag_affinity, now, tags, 1.0, now, users.half_life_s, cfg.tag_cap
                )
                gains.setdefault(item, []).append([1.0, now])
                count_co_engagement(co, profile.positives, item, cfg.co_window)
                profile.positive_at = now
            profiles.append(profile)
            if len(profiles) == 512:
                users.save(profiles)
                profiles = []
        users.save(profiles)
        if gains:
            known = users.catalog.lookup(gains.keys() | co.keys())
            users.catalog.add_engagement(gains, co, known, "seed:1")

    def matrices(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.items.items()}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
