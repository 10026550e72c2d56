"""User profiles as durable state: Qdrant `users` is the store, an in-process LRU the working copy.

Why Qdrant and not a Faust table: the ranker reads profiles from Qdrant anyway, local mode on a
path is durable across restarts (the embedded broker is memory-only), and per-record changelog
writes collapse the embedded broker after ~15k messages. Profiles are written back once per
batch, and event ids applied recently are stored with the profile, so a replay after a crash
applies nothing twice. The same code serves the distributed topology against a Qdrant server,
where users are partitioned across workers by the events topic's key (the user id).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from qdrant_client import QdrantClient, models

from fusionrec import store
from fusionrec.settings import Settings
from streams.catalog import Catalog, CatalogItem
from streams.profiles import (
    DAY_S,
    Profile,
    add_co,
    count_co_engagement,
    event_weight,
    fold,
    fold_tags,
)
from streams.records import EventRecord

# What each user's batch owes its items: {user_id: {"gains": {item_id: [[weight, event time],
# ...]}, "co": {item_id: {partner item_id: count}}}}: popularity and co-engagement.
Gains = dict[str, dict[str, dict]]


class Users:
    def __init__(
        self, client: QdrantClient, settings: Settings, catalog: Catalog, cache_size: int = 50_000
    ) -> None:
        self.client = client
        self.cfg = settings.profiles
        self.catalog = catalog
        self.collection = settings.qdrant.users_collection
        self.cache: OrderedDict[str, Profile] = OrderedDict()
        self.cache_size = cache_size
        self.half_life_s = self.cfg.half_life_days * DAY_S
        # Users whose profile holds events for items that have not arrived yet.
        self.holding: set[str] = set()
        # Popularity is delivered under tokens "<epoch>:<n>": this process and its n-th batch.
        self.meta = settings.qdrant.meta_collection
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.ledger: dict[str, int] | None = None  # epoch -> last batch delivered; read lazily
        # Users whose batch's delivery failed in this process: paid before any later batch, for
        # the ledger takes a later delivery to mean every earlier one of its epoch is done.
        self.owing: set[str] = set()

    # -- state --------------------------------------------------------------------------------
    def load(self, user_ids: Iterable[str]) -> dict[str, Profile]:
        wanted = list(dict.fromkeys(user_ids))
        missing = [u for u in wanted if u not in self.cache]
        if missing:
            points = self.client.retrieve(
                self.collection,
                ids=[store.user_point_id(u) for u in missing],
                with_vectors=True,
                with_payload=True,
            )
            found = {p.payload["user_id"]: p for p in points}
            for u in missing:
                self._cache(_from_point(found[u]) if u in found else Profile(user_id=u))
        out = {}
        for u in wanted:
            self.cache.move_to_end(u)
            out[u] = self.cache[u]
        return out

    def save(self, profiles: Iterable[Profile]) -> None:
        points = [_to_point(p) for p in profiles]
        if points:
            self.client.upsert(self.collection, points=points)

    def _cache(self, profile: Profile) -> None:
        self.cache[profile.user_id] = profile
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)  # saved every batch, so eviction loses nothing

    def recover_holding(self) -> None:
        """After a restart: find the stored profiles that hold events (one scan, at start-up)."""
        self.holding.update(
            p["user_id"]
            for p in self._scan(
                models.IsEmptyCondition(is_empty=models.PayloadField(key="pending")), ["user_id"]
            )
        )

    def _scan(self, absent: models.Condition, fields: list[str]) -> list[dict]:
        """Those payload fields of the stored users for whom `absent` does not hold."""
        out: list[dict] = []
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection,
                scroll_filter=models.Filter(must_not=[absent]),
                limit=256,
                offset=offset,
                with_payload=fields,
            )
            out.extend(p.payload or {} for p in points)
            if offset is None:
                return out

    # -- events -------------------------------------------------------------------------------
    def apply(self, events: Sequence[EventRecord]) -> int:
        """Fold a batch of events into profiles; returns how many were new (not duplicates).

        Events whose item is not in the catalog yet are held in the profile until it arrives.
        """
        self._pay_failed()
        profiles = self.load(e.user_id for e in events)
        with store.batched_commits(self.client), self._store_is_truth(profiles):
            self._deliver([p for p in profiles.values() if self._owes(p)])  # left by a crash
            fresh: list[EventRecord] = []
            now = time.time()
            for e in sorted(events, key=lambda e: e.timestamp):
                p = profiles[e.user_id]
                if p.already_applied(e.event_id):
                    continue
                p.remember(e.event_id, e.item_id, self.cfg)
                fresh.append(e)
            items = self.catalog.lookup({e.item_id for e in fresh}, with_vectors=True)
            gains: Gains = {}
            for e in fresh:
                p = profiles[e.user_id]
                if e.item_id not in items:
                    p.pending.append({"held_at": now, "event": e.model_dump(mode="json")})
                    self.holding.add(e.user_id)
                    continue
                self._fold(p, e, items[e.item_id], gains)
            touched = [profiles[u] for u in dict.fromkeys(e.user_id for e in fresh)]
            for p in touched:
                p.updated_at = now
            self._commit(touched, gains, items)
        return len(fresh)

    def retry_pending(self, now: float | None = None) -> list[EventRecord]:
        """Apply held events whose item has arrived; return those held past the TTL (dropped here,
        dead-lettered by the caller)."""
        now = time.time() if now is None else now
        if not self.holding:
            return []
        self._pay_failed()
        held = list(self.load(self.holding).values())
        with store.batched_commits(self.client), self._store_is_truth(p.user_id for p in held):
            self._deliver([p for p in held if self._owes(p)])
            items = self.catalog.lookup(
                {h["event"]["item_id"] for p in held for h in p.pending}, with_vectors=True
            )
            expired: list[EventRecord] = []
            gains: Gains = {}
            for p in held:
                keep = []
                for held_event in sorted(p.pending, key=lambda h: h["event"]["timestamp"]):
                    e = EventRecord.model_validate(held_event["event"])
                    if e.item_id in items:
                        self._fold(p, e, items[e.item_id], gains)
                    elif now - held_event["held_at"] > self.cfg.pending_ttl_s:
                        expired.append(e)
                    else:
                        keep.append(held_event)
                p.pending = keep
            self._commit(held, gains, items)
            self.holding.difference_update(p.user_id for p in held if not p.pending)
        return expired

    @contextmanager
    def _store_is_truth(self, profiles: Iterable[str]) -> Iterator[None]:
        """Changes are made to cached profiles first; if the write to the store fails, drop
        them from the cache so a retry starts again from what the store holds."""
        try:
            yield
        except BaseException:
            for u in list(profiles):
                self.cache.pop(u, None)
            raise

    def _fold(self, p: Profile, e: EventRecord, item: CatalogItem, gains: Gains) -> None:
        """Fold the event into the profile; a positive one also owes its item popularity, and
        co-engagement to it and the user's previous positives, both ways."""
        w = event_weight(e.type, e.value, self.cfg)
        if w:
            p.tag_affinity = fold_tags(
                p.tag_affinity,
                p.t_ref,
                item.tags,
                w,
                e.timestamp,
                self.half_life_s,
                self.cfg.tag_cap,
            )
            p.vectors, p.t_ref = fold(
                p.vectors, p.t_ref, item.vectors, w, e.timestamp, self.half_life_s
            )
        if w > 0:
            owed = gains.setdefault(p.user_id, {"gains": {}, "co": {}})
            owed["gains"].setdefault(e.item_id, []).append([w, e.timestamp])
            p.positive_at = max(p.positive_at, e.timestamp)
            count_co_engagement(owed["co"], p.positives, e.item_id, self.cfg.co_window)

    # -- popularity, exactly once -------------------------------------------------------------
    def _commit(self, touched: list[Profile], gains: Gains, items: dict[str, CatalogItem]) -> None:
        """Save the profiles with the popularity they owe, then deliver it.

        A crash after the save leaves the debt in the stored profiles, paid on the user's next
        batch or at start-up. Whether a debt is paid is told by the ledger: deliveries run in
        order, so it keeps per process (epoch) only the last batch number delivered, one write
        a batch. A crash between delivery and ledger delivers again under the same token, which
        the items refuse.
        """
        self.seq += 1
        token = f"{self.epoch}:{self.seq}"
        for p in touched:
            owed = gains.get(p.user_id)
            p.outbox = {"token": token, **owed} if owed else None
        self.save(touched)
        try:
            self._deliver([p for p in touched if p.outbox], items)
        except BaseException:
            self.owing.update(p.user_id for p in touched if p.outbox)
            raise

    def _pay_failed(self) -> None:
        """Deliver what the batches whose delivery failed still owe."""
        if self.owing:
            self._pay(self.owing)
            self.owing.clear()

    def _pay(self, user_ids: Iterable[str]) -> None:
        """Deliver what these users' profiles still owe, as the store holds them (a failure
        dropped them from the cache)."""
        owed = self.load(user_ids)
        with store.batched_commits(self.client), self._store_is_truth(owed):
            self._deliver([p for p in owed.values() if self._owes(p)])

    def _owes(self, p: Profile) -> bool:
        if not p.outbox:
            return False
        epoch, _, seq = str(p.outbox["token"]).partition(":")
        return int(seq or 0) > self._ledger().get(epoch, -1)

    def _ledger(self) -> dict[str, int]:
        if self.ledger is None:
            points, _ = self.client.scroll(self.meta, limit=1_000_000, with_payload=True)
            self.ledger = {
                p.payload["epoch"]: int(p.payload["delivered"])
                for p in points
                if p.payload and "epoch" in p.payload
            }
        return self.ledger

    def _deliver(
        self, owing: Sequence[Profile], items: Mapping[str, CatalogItem] | None = None
    ) -> None:
        if not owing:
            return
        by_token: dict[str, tuple[dict[str, list], dict[str, dict[str, float]]]] = {}
        for p in owing:
            assert p.outbox is not None
            gains, co = by_token.setdefault(p.outbox["token"], ({}, {}))
            for item_id, events in p.outbox.get("gains", {}).items():
                gains.setdefault(item_id, []).extend(events)
            for item_id, partners in p.outbox.get("co", {}).items():
                co[item_id] = add_co(co.get(item_id, {}), partners)
        touched = {i for gains, co in by_token.values() for i in (*gains, *co)}
        known = dict(items or {})
        known.update(self.catalog.lookup(touched - set(known)))
        ledger = self._ledger()
        changed: dict[str, int] = {}
        for token, (gains, co) in by_token.items():
            self.catalog.add_engagement(gains, co, known, token)
            epoch, _, seq = token.partition(":")
            changed[epoch] = max(int(seq or 0), changed.get(epoch, -1), ledger.get(epoch, -1))
        self.client.upsert(
            self.meta,
            points=[
                models.PointStruct(
                    id=store.ledger_point_id(epoch),
                    vector={},
                    payload={"epoch": epoch, "delivered": seq},
                )
                for epoch, seq in changed.items()
            ],
        )
        ledger.update(changed)

    def recover_outboxes(self) -> None:
        """After a restart: deliver the popularity that profiles still owe (one scan)."""
        owing = [
            payload["user_id"]
            for payload in self._scan(
                models.IsEmptyCondition(is_empty=models.PayloadField(key="outbox")),
                ["user_id", "outbox"],
            )
            if self._owes(Profile(user_id=payload["user_id"], outbox=payload.get("outbox")))
        ]
        for start in range(0, len(owing), 256):
            self._pay(owing[start : start + 256])


def _to_point(p: Profile) -> models.PointStruct:
    return models.PointStruct(
        id=store.user_point_id(p.user_id),
        vector={name: v.tolist() for name, v in p.vectors.items()},
        payload={
            "user_id": p.user_id,
            "t_ref": p.t_ref,
            "tag_affinity": p.tag_affinity,
            "seen": p.seen,
            "positives": p.positives,
            "positive_at": p.positive_at,
            "recent_event_ids": p.recent_event_ids,
            "pending": p.pending,
            "updated_at": p.updated_at,
            "outbox": p.outbox,
        },
    )


def _from_point(point: models.Record) -> Profile:
    payload = point.payload or {}
    vectors = point.vector if isinstance(point.vector, dict) else {}
    return Profile(
        user_id=payload["user_id"],
        vectors={k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()},
        t_ref=float(payload.get("t_ref", 0.0)),
        tag_affinity={str(k): float(v) for k, v in (payload.get("tag_affinity") or {}).items()},
        seen=list(payload.get("seen", [])),
        positives=list(payload.get("positives", [])),
        positive_at=float(payload.get("positive_at", 0.0)),
        recent_event_ids=list(payload.get("recent_event_ids", [])),
        pending=list(payload.get("pending", [])),
        updated_at=float(payload.get("updated_at", 0.0)),
        outbox=payload.get("outbox") or None,
    )
