"""Catalog and profile state against real Qdrant local mode (no broker: the agents' logic alone)."""

from __future__ import annotations

import sqlite3

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException

from fusionrec import store
from fusionrec.settings import Settings
from streams.catalog import Catalog
from streams.records import EventRecord, ItemRecord
from streams.users import Users

DIMS = {"text.t": 3, "image.i": 2}


@pytest.fixture()
def state(tmp_path):
    settings = Settings(data_dir=tmp_path)
    client = QdrantClient(path=str(tmp_path / "q"))
    store.ensure_collections(client, settings, DIMS)
    catalog = Catalog(client, settings, encoders={})
    yield settings, client, catalog, Users(client, settings, catalog)
    client.close()


def add_item(catalog: Catalog, item_id: str, text, image=None) -> None:
    vecs = {"text.t": np.asarray(text, np.float32)}
    if image is not None:
        vecs["image.i"] = np.asarray(image, np.float32)
    catalog.upsert([ItemRecord(id=item_id, title=item_id)], [vecs])


def event(eid: str, item: str, kind: str = "like", user: str = "u", t: float = 100.0):
    return EventRecord(event_id=eid, user_id=user, item_id=item, type=kind, timestamp=t)


def test_replayed_items_stay_one_point_each(state):
    _, client, catalog, _ = state
    for _ in range(2):
        add_item(catalog, "a", [1, 0, 0])
        add_item(catalog, "b", [0, 1, 0], [1, 0])
    assert client.count("items").count == 2
    catalog.delete(["a"])
    assert client.count("items").count == 1


def test_duplicate_event_ids_apply_once_and_survive_a_restart(state, tmp_path):
    settings, client, catalog, users = state
    add_item(catalog, "a", [1, 0, 0])
    assert users.apply([event("e1", "a"), event("e1", "a")]) == 1
    assert users.apply([event("e1", "a")]) == 0
    v1 = users.load(["u"])["u"].vectors["text.t"].copy()
    # A fresh process: empty cache, state read back from Qdrant.
    again = Users(client, settings, catalog)
    assert again.apply([event("e1", "a")]) == 0
    np.testing.assert_allclose(again.load(["u"])["u"].vectors["text.t"], v1)
    assert catalog.lookup(["a"])["a"].popularity == 1.0


def test_tag_affinity_is_folded_and_kept(state):
    settings, client, catalog, users = state
    catalog.upsert(
        [ItemRecord(id="t", title="t", tags=["war", "drama"])],
        [{"text.t": np.asarray([1, 0, 0], np.float32)}],
    )
    users.apply([event("e1", "t"), event("e2", "t", kind="dislike", user="v")])
    again = Users(client, settings, catalog).load(["u", "v"])
    assert again["u"].tag_affinity == pytest.approx({"war": 2**-0.5, "drama": 2**-0.5})
    assert again["v"].tag_affinity == pytest.approx({"war": -(2**-0.5), "drama": -(2**-0.5)})


def test_events_fold_into_the_modalities_items_have(state):
    _, _, catalog, users = state
    add_item(catalog, "a", [1, 0, 0], [0, 1])
    add_item(catalog, "b", [0, 0, 1])
    users.apply([event("e1", "a"), event("e2", "b", "dislike", t=101.0)])
    p = users.load(["u"])["u"]
    assert p.vectors["text.t"][0] > 0 > p.vectors["text.t"][2]
    assert p.vectors["image.i"][1] > 0
    assert p.seen == ["a", "b"]


def test_events_for_missing_items_are_held_until_the_item_arrives(state):
    settings, client, catalog, users = state
    users.apply([event("e1", "later")])
    p = users.load(["u"])["u"]
    assert p.vectors == {} and len(p.pending) == 1 and "later" in p.seen
    assert users.retry_pending() == []
    add_item(catalog, "later", [0, 1, 0])
    # A restarted worker finds the held event in the store and applies it.
    restarted = Users(client, settings, catalog)
    restarted.recover_holding()
    assert restarted.retry_pending() == []
    p = restarted.load(["u"])["u"]
    assert p.pending == [] and p.vectors["text.t"][1] > 0
    assert restarted.holding == set()


def test_a_locked_database_is_an_outage_and_a_retry_applies_once(state, tmp_path):
    """Local mode's store outage for real: another process holds the users file's write lock
    (as a backup tool may); the write fails fast as `unavailable`, and nothing is half-done."""
    settings, client, catalog, users = state
    add_item(catalog, "a", [1, 0, 0])
    store.fast_local_commits(client)
    path = tmp_path / "q" / "collection" / settings.qdrant.users_collection / "storage.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as failure:
            users.apply([event("e1", "a")])
        assert store.unavailable(failure.value)
        assert users.load(["u"])["u"].recent_event_ids == []  # read again from the store
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert users.apply([event("e1", "a")]) == 1
    assert users.apply([event("e1", "a")]) == 0
    assert catalog.lookup(["a"])["a"].popularity > 0


def test_held_events_expire_to_the_caller(state):
    _, _, _, users = state
    users.apply([event("e1", "never")])
    expired = users.retry_pending(now=1e12)
    assert [e.event_id for e in expired] == ["e1"]
    assert users.load(["u"])["u"].pending == []


def test_a_failed_store_write_applies_nothing_and_a_retry_applies_once(state, monkeypatch):
    _, client, catalog, users = state
    add_item(catalog, "a", [1, 0, 0])
    real_upsert = client.upsert

    def store_down(*args, **kwargs):
        raise ResponseHandlingException(ConnectionError("connection refused"))

    monkeypatch.setattr(client, "upsert", store_down)
    with pytest.raises(ResponseHandlingException) as failure:
        users.apply([event("e1", "a")])
    assert store.unavailable(failure.value)
    monkeypatch.setattr(client, "upsert", real_upsert)
    assert users.apply([event("e1", "a")]) == 1  # the retry is not taken for a duplicate
    assert users.apply([event("e1", "a")]) == 0
    assert catalog.lookup(["a"])["a"].popularity == 1.0


class Killed(Exception):
    """Stands for SIGKILL at one point of a batch (the real kill is in test_chaos)."""


@pytest.mark.parametrize("where", ["before delivery", "after delivery, before the ledger"])
def test_popularity_counts_once_whatever_a_crash_interrupts(state, monkeypatch, where):
    settings, client, catalog, users = state
    add_item(catalog, "a", [1, 0, 0])
    add_item(catalog, "b", [0, 1, 0])
    batch = [event("e1", "a"), event("e2", "b", user="v"), event("e3", "a", user="v")]
    real_upsert = client.upsert

    def crash(*args, **kwargs):
        raise Killed(where)

    def crash_on_ledger(collection, *args, **kwargs):
        if collection == settings.qdrant.meta_collection:
            raise Killed(where)
        return real_upsert(collection, *args, **kwargs)

    if where == "before delivery":
        monkeypatch.setattr(catalog, "add_engagement", crash)
    else:
        monkeypatch.setattr(client, "upsert", crash_on_ledger)
    with pytest.raises(Killed):
        users.apply(batch)
    monkeypatch.undo()
    # A restart: the debt saved with the profiles is paid once; the replayed batch is a duplicate.
    again = Users(client, settings, Catalog(client, settings, encoders={}))
    again.recover_outboxes()
    found = catalog.lookup(["a", "b"])
    assert found["a"].popularity == pytest.approx(2.0)
    assert found["b"].popularity == pytest.approx(1.0)
    assert (found["a"].co, found["b"].co) == ({"b": 1}, {"a": 1})  # v liked b, then a
    assert again.apply(batch) == 0
    again.recover_outboxes()
    third = Users(client, settings, Catalog(client, settings, encoders={}))
    third.recover_outboxes()  # paid debts stay paid across restarts
    assert catalog.lookup(["a", "b"]) == found


def test_a_debt_left_behind_is_paid_on_the_users_next_batch(state, monkeypatch):
    _, _, catalog, users = state
    add_item(catalog, "a", [1, 0, 0])
    monkeypatch.setattr(catalog, "add_engagement", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        users.apply([event("e1", "a")])
    monkeypatch.undo()
    assert users.apply([event("e2", "a", t=200.0)]) == 1
    item = catalog.lookup(["a"])["a"]
    assert (item.popularity, item.popularity_at) == pytest.approx((2.0, 200.0), rel=1e-3)
    users.recover_outboxes()
    assert catalog.lookup(["a"])["a"] == item


def test_a_debt_whose_delivery_failed_is_paid_before_any_later_batch(state, monkeypatch):
    """A batch failing unforeseen after its profiles were saved is dead-lettered, not retried:
    the next batch, of other users, must not let the ledger pass its debt by."""
    settings, client, catalog, users = state
    add_item(catalog, "a", [1, 0, 0])
    add_item(catalog, "b", [0, 1, 0])
    monkeypatch.setattr(catalog, "add_engagement", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        users.apply([event("e1", "a"), event("e2", "b")])
    monkeypatch.undo()
    assert users.apply([event("e3", "b", user="v")]) == 1
    found = catalog.lookup(["a", "b"])
    assert (found["a"].popularity, found["b"].popularity) == pytest.approx((1.0, 2.0))
    assert (found["a"].co, found["b"].co) == ({"b": 1}, {"a": 1})
    again = Users(client, settings, Catalog(client, settings, encoders={}))
    again.recover_outboxes()  # paid once, and a restart does not pay it again
    assert catalog.lookup(["a", "b"]) == found


def test_positives_are_co_engaged_with_the_users_previous_ones(state):
    settings, _, catalog, users = state
    for item in "abcd":
        add_item(catalog, item, [1, 0, 0])
    window = settings.profiles.co_window
    users.apply([event("e1", "a"), event("e2", "b", t=101), event("e3", "c", "dislike", t=102)])
    users.apply([event("e4", "d", user="v", t=103), event("e5", "b", user="v", t=104)])
    found = catalog.lookup("abcd")
    assert found["a"].co == {"b": 1}
    assert found["b"].co == {"a": 1, "d": 1}
    assert found["c"].co == {}  # a dislike pairs with nothing
    assert users.load(["u"])["u"].positives == ["a", "b"][-window:]
    add_item(catalog, "b", [0, 1, 0])  # the producer updates the item: its counts stay
    assert catalog.lookup(["b"])["b"].co == {"a": 1, "d": 1}


def test_what_counts_as_the_store_being_away():
    import grpc
    from qdrant_client.http.exceptions import UnexpectedResponse

    class Rpc(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

    assert store.unavailable(ResponseHandlingException(OSError("reset")))
    assert store.unavailable(UnexpectedResponse(503, "Service Unavailable", b"", httpx.Headers()))
    assert store.unavailable(Rpc(grpc.StatusCode.UNAVAILABLE))
    assert not store.unavailable(UnexpectedResponse(400, "Bad Request", b"", httpx.Headers()))
    assert not store.unavailable(Rpc(grpc.StatusCode.INVALID_ARGUMENT))
    assert not store.unavailable(ValueError("a bug"))
    assert not store.unavailable(sqlite3.OperationalError("no such table: points"))
