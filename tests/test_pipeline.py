"""End to end through the real broker, real encoders, real Qdrant local mode and real gRPC."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import time
import uuid

import pytest
from kafka import KafkaConsumer

from tests.conftest import MAX_MESSAGE_BYTES, Stack

pytestmark = pytest.mark.integration

THEMES = ("forest", "city", "snow")
# Every catalog item reads the same: only the image tells them apart.
NEUTRAL = {"title": "Item", "description": "An item in the catalog."}


def likes(user: str, item_ids: list[str], kind: str = "like") -> list[dict]:
    now = time.time()
    return [
        {
            "event_id": str(uuid.uuid4()),
            "user_id": user,
            "item_id": i,
            "type": kind,
            "timestamp": now + k,
        }
        for k, i in enumerate(item_ids)
    ]


def wait_profile(stack: Stack, user: str) -> None:
    stack.wait(f"{user}'s profile", lambda: not stack.client.recommend(user, 1).cold_start)


@pytest.fixture(scope="module")
def catalog(stack: Stack) -> list[dict]:
    items = [stack.item(t, f"p-{t}-{k}", **NEUTRAL) for t in THEMES for k in range(6)]
    stack.publisher.publish_all("items", items)
    stack.wait("the catalog", lambda: all(stack.known(i["id"]) for i in items), timeout=120)
    return items


def test_likes_of_image_similar_items_raise_image_similar_items(stack: Stack, catalog):
    user = "forest-fan"
    stack.publisher.publish_all("events", likes(user, ["p-forest-0", "p-forest-1", "p-forest-2"]))
    wait_profile(stack, user)
    ranking = stack.client.recommend(user, 18)
    ids = [i.item_id for i in ranking.items]
    assert not {"p-forest-0", "p-forest-1", "p-forest-2"} & set(ids), "seen items are excluded"
    assert all(i.startswith("p-forest") for i in ids[:3]), ids
    top = ranking.items[0]
    assert "image" in top.contributions and "text" in top.contributions


def test_what_others_liked_next_is_recommended_through_the_stream(stack: Stack, catalog):
    # Two users liked a snow item right after a city one; a third has just liked that city item.
    for fan in ("co-fan-1", "co-fan-2"):
        stack.publisher.publish_all("events", likes(fan, ["p-city-5", "p-snow-4"]))
    stack.wait(
        "p-city-5's co-engagement",
        lambda: "p-snow-4" in [i.item_id for i in stack.client.similar("p-city-5", 3).items],
    )
    stack.publisher.publish_all("events", likes("co-newcomer", ["p-city-5"]))
    wait_profile(stack, "co-newcomer")
    got = {i.item_id: i for i in stack.client.recommend("co-newcomer", 18).items}
    assert "co-engaged" in got["p-snow-4"].sources
    assert got["p-snow-4"].contributions["co_engagement"] > 0
    # Image similarity alone would put the other city items first.
    assert next(iter(got)) == "p-snow-4", list(got)


def test_dislikes_push_items_down(stack: Stack, catalog):
    user = "city-hater"
    stack.publisher.publish_all("events", likes(user, ["p-city-0", "p-city-1"], kind="dislike"))
    wait_profile(stack, user)
    ids = [i.item_id for i in stack.client.recommend(user, 18).items]
    city = [ids.index(i) for i in ids if i.startswith("p-city")]
    assert min(city) >= len(ids) - len(city) - 2, ids


def test_new_user_gets_popular_and_fresh(stack: Stack, catalog):
    ranking = stack.client.recommend(f"new-{uuid.uuid4()}", 5)
    assert ranking.cold_start and len(ranking.items) == 5


def test_item_from_an_outside_producer_becomes_recommendable(stack: Stack, catalog, kcat):
    user = "snow-fan"
    stack.publisher.publish_all("events", likes(user, ["p-snow-0", "p-snow-1", "p-snow-2"]))
    wait_profile(stack, user)
    item = stack.item("snow", "kcat-snow", **NEUTRAL)
    line = f"{item['id']}\t{json.dumps(item)}\n"
    subprocess.run(
        [*kcat, "-P", "-b", stack.bootstrap, "-t", "items", "-K", "\t"],
        input=line.encode(),
        check=True,
        timeout=30,
    )
    stack.wait(
        "kcat-snow in snow-fan's top 5",
        lambda: "kcat-snow" in [i.item_id for i in stack.client.recommend(user, 5).items],
    )


def test_an_event_before_its_item_is_held_then_applied(stack: Stack, catalog):
    user = "early-bird"
    stack.publisher.publish_all("events", likes(user, ["late-forest"]))
    stack.publisher.publish_all("items", [stack.item("forest", "late-forest", **NEUTRAL)])
    wait_profile(stack, user)
    ids = [i.item_id for i in stack.client.recommend(user, 3).items]
    assert "late-forest" not in ids and all(i.startswith("p-forest") for i in ids), ids


def dead_letters(stack: Stack, want: int, timeout: float = 60.0) -> list[dict]:
    consumer = KafkaConsumer(
        stack.settings.kafka.dead_letters_topic,
        bootstrap_servers=stack.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
    )
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += [json.loads(m.value) for m in consumer]
    consumer.close()
    return got


def test_bad_messages_land_in_dead_letters_and_good_ones_keep_flowing(stack: Stack, catalog):
    (stack.media / "liar.png").write_bytes(b"this is not a PNG")
    bad = {
        b"{not json": "invalid JSON",
        json.dumps({"id": 5}).encode(): "id: Input should be a valid string",
        json.dumps({"id": "liar", "image": "liar.png"}).encode(): "encode failed: image",
        json.dumps(
            {"id": "huge", "description": "x" * MAX_MESSAGE_BYTES}
        ).encode(): "exceeds max_message_bytes",
        json.dumps({"id": "escape", "image": "../../etc/passwd"}).encode(): "encode failed: image",
    }
    for value in bad:
        stack.publisher.send_raw("items", b"k", value)
    stack.publisher.publish_all("items", [stack.item("city", "after-bad", **NEUTRAL)])
    stack.wait("the good item after the bad ones", lambda: stack.known("after-bad"))
    letters = dead_letters(stack, len(bad))
    for value, reason in bad.items():
        match = [d for d in letters if base64.b64decode(d["value_base64"]) == value[: 512 * 1024]]
        assert match, f"no dead letter for {value[:40]!r}"
        assert reason in match[0]["reason"], match[0]["reason"]
        assert match[0]["source"]["topic"] == "items" and match[0]["value_size"] == len(value)
    assert not stack.known("liar") and not stack.known("huge")


def test_replaying_items_leaves_one_point_per_item(stack: Stack, catalog):
    stack.publisher.publish_all("items", catalog)
    stack.publisher.publish_all("items", [stack.item("snow", "replay-marker", **NEUTRAL)])
    stack.wait("the replay to pass", lambda: stack.known("replay-marker"))
    ids = [i.item_id for i in stack.client.recommend(f"new-{uuid.uuid4()}", 200).items]
    assert len(ids) == len(set(ids))
    assert {i["id"] for i in catalog} <= set(ids)


def test_updates_and_deletes_are_messages_on_the_items_topic(stack: Stack, catalog):
    item = stack.item("forest", "changing", **NEUTRAL)
    stack.publisher.publish_all("items", [item])
    stack.wait("the item", lambda: stack.known("changing"))
    stack.publisher.publish_all("items", [{**item, "category": "renamed", "tags": ["moved"]}])

    def moved() -> bool:
        ranking = stack.client.recommend(f"new-{uuid.uuid4()}", 5, tags=["moved"])
        return [i.item_id for i in ranking.items] == ["changing"]

    stack.wait("the update", moved)
    stack.publisher.publish_all("items", [{"id": "changing", "op": "delete"}])
    stack.wait("the delete", lambda: not stack.known("changing"))


def test_a_locked_store_holds_the_worker_and_the_ranker_keeps_answering(stack: Stack, catalog):
    """The store away for real (local mode: another process holds the items file's write lock,
    as a backup tool may): the worker retries the batch with backoff instead of dead-lettering
    it, the ranker keeps answering from what it has, and the item arrives once the lock goes."""
    from tests.test_metrics import scrape, value

    items = stack.settings.qdrant.items_collection
    path = stack.media.parent / "state" / "qdrant" / "collection" / items / "storage.sqlite"
    before = scrape(stack.metrics_url)
    held = stack.item("snow", f"held-{uuid.uuid4()}", **NEUTRAL)
    lock = sqlite3.connect(path, isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        stack.publisher.publish_all("items", [held])
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # a few retries' worth
            assert stack.client.serving()
            assert stack.client.similar("p-snow-0", 3).items
            assert not stack.known(held["id"])
            time.sleep(0.2)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    stack.wait("the held item", lambda: stack.known(held["id"]), timeout=60)
    after = scrape(stack.metrics_url)
    for reason in ("processing_failed", "encode_failed"):
        counted = value(after, "fusionrec_dead_letters_total", reason=reason)
        assert counted == value(before, "fusionrec_dead_letters_total", reason=reason)
