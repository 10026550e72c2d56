"""The item catalog in Qdrant: encode items on arrival, upsert them idempotently, look them up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from encoders.base import EncodeError, Encoder, l2_normalise
from fusionrec import store
from fusionrec.settings import Settings
from streams.media import MediaError, load_media
from streams.profiles import DAY_S, accumulate, add_co, trend
from streams.records import ItemRecord
from streams.video import Clip, split_video

POPULARITY_BATCHES = "popularity_batches"
# A redelivery comes within a few batches of the first (a crash, then a restart), and an item
# sees at most one delivery per batch: the last 64 tokens cover it.
KEPT_BATCHES = 64


@dataclass(frozen=True)
class CatalogItem:
    vectors: dict[str, np.ndarray]
    popularity: float
    popularity_at: float = 0.0
    # Tokens of the latest batches folded into the popularity and co-engagement: a batch
    # delivered again is refused.
    batches: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    co: dict[str, float] = field(default_factory=dict)


class Catalog:
    def __init__(
        self, client: QdrantClient, settings: Settings, encoders: Mapping[str, Encoder]
    ) -> None:
        self.client = client
        self.settings = settings
        self.encoders = encoders
        threads = settings.worker.encode_threads
        # Where the modalities of a batch encode side by side (threads start on first use).
        self.pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="encode-modality")
            if threads > 1
            else None
        )
        self.collection = settings.qdrant.items_collection
        self.popularity_half_life_s = settings.profiles.popularity_half_life_days * DAY_S
        self.co_cap = settings.profiles.co_cap

    def encode(self, items: Sequence[ItemRecord]) -> list[dict[str, np.ndarray] | EncodeError]:
        """Vectors per item, one named vector per modality it has; or that item's error.

        Blocking (media I/O and model inference): the agent runs it in an executor thread.
        The modalities encode at once when `worker.encode_threads` > 1 (onnxruntime and torch
        let go of the GIL). An item with a modality that fails is refused whole rather than stored
        half-encoded. A modality given as several pieces (a video's key frames) gets their
        mean vector.
        """
        out: list[dict[str, np.ndarray] | EncodeError] = [{} for _ in items]
        clips: dict[int, Clip] = {}
        work: list[tuple[Encoder, str, list[int], list[str | bytes]]] = []
        for modality, encoder in self.encoders.items():
            owner, contents = [], []
            for i, item in enumerate(items):
                if isinstance(out[i], EncodeError):
                    continue
                try:
                    pieces = self._contents(item, modality, i, clips)
                except MediaError as exc:
                    out[i] = EncodeError(f"{modality}: {exc}")
                    continue
                owner.extend([i] * len(pieces))
                contents.extend(pieces)
            if contents:
                work.append((encoder, modality, owner, contents))
        run = self.pool.map if self.pool is not None else map
        encoded = run(lambda w: w[0].encode_batch(w[3]), work)
        for (encoder, modality, owner, _), vectors in zip(work, encoded, strict=True):
            results: dict[int, list[np.ndarray | EncodeError]] = {}
            for i, result in zip(owner, vectors, strict=True):
                results.setdefault(i, []).append(result)
            for i, pieces in results.items():
                slot = out[i]
                if not isinstance(slot, dict):
                    continue  # already refused
                errors = [r for r in pieces if isinstance(r, EncodeError)]
                if errors:
                    out[i] = EncodeError(f"{modality}: {errors[0]}")
                else:
                    slot[encoder.vector_name] = l2_normalise(np.mean(pieces, axis=0))
        for i, slot in enumerate(out):
            if isinstance(slot, dict) and not slot:
                out[i] = EncodeError("item has no content in any enabled modality")
        return out

    def _contents(
        self, item: ItemRecord, modality: str, i: int, clips: dict[int, Clip]
    ) -> list[str | bytes]:
        if modality == "text":
            return [item.text] if item.text else []
        ref = getattr(item, modality, None)
        if ref is not None:
            return [load_media(ref, self.settings.media)]
        if item.video is None:
            return []
        if modality == "image":
            return self._clip(i, item, clips).frames
        sound = self._clip(i, item, clips).audio if modality == "audio" else None
        return [sound] if sound else []

    def _clip(self, i: int, item: ItemRecord, clips: dict[int, Clip]) -> Clip:
        """The item's video, decoded once for all the modalities it feeds."""
        if i not in clips:
            m = self.settings.media
            data = load_media(item.video, m)
            clips[i] = split_video(data, m.video_frames, m.max_audio_seconds, m.max_image_pixels)
        return clips[i]

    def upsert(self, items: Sequence[ItemRecord], vectors: Sequence[dict[str, np.ndarray]]) -> None:
        """Write items; the point id is uuid5(item id), so a replay overwrites, never duplicates.

        Popularity and co-engagement are earned from events, not sent by producers: an update
        keeps them.
        """
        if not items:
            return
        kept = self.lookup([i.id for i in items])
        # Unit length: the items collection scores by dot product (fusionrec.store).
        unit = [
            {name: l2_normalise(v).astype(np.float32) for name, v in vecs.items()}
            for vecs in vectors
        ]
        points = []
        for item, vecs in zip(items, unit, strict=True):
            payload = {
                store.ITEM_ID: item.id,
                store.TITLE: item.title,
                store.CATEGORY: item.category,
                store.TAGS: list(item.tags),
                store.ATTRIBUTES: dict(item.attributes),
                store.CREATED_AT: item.created_at,
                "modalities": sorted({store.modality_of(n) for n in vecs}),
                **self._engagement(kept[item.id] if item.id in kept else CatalogItem({}, 0.0)),
            }
            payload[store.CONTENT_DIGEST] = store.content_digest(vecs, payload)
            points.append(
                models.PointStruct(
                    id=store.item_point_id(item.id),
                    vector={name: v.tolist() for name, v in vecs.items()},
                    payload=payload,
                )
            )
        with store.batched_commits(self.client):
            self.client.upsert(self.collection, points=points)

    def delete(self, item_ids: Iterable[str]) -> None:
        ids = [store.item_point_id(i) for i in item_ids]
        if ids:
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=ids))

    def lookup(self, item_ids: Iterable[str], with_vectors: bool = False) -> dict[str, CatalogItem]:
        """The stored items among `item_ids` (absent ones are simply missing from the answer)."""
        ids = sorted({store.item_point_id(i) for i in item_ids})
        if not ids:
            return {}
        found = self.client.retrieve(
            self.collection, ids=ids, with_vectors=with_vectors, with_payload=True
        )
        return {
            p.payload[store.ITEM_ID]: CatalogItem(
                vectors={k: np.asarray(v, dtype=np.float32) for k, v in (p.vector or {}).items()}
                if isinstance(p.vector, dict)
                else {},
                popularity=float(p.payload.get(store.POPULARITY) or 0.0),
                popularity_at=float(p.payload.get(store.POPULARITY_AT) or 0.0),
                batches=tuple(p.payload.get(POPULARITY_BATCHES) or ()),
                tags=tuple(p.payload.get(store.TAGS) or ()),
                co=dict(p.payload.get(store.CO_ENGAGED) or {}),
            )
            for p in found
        }

    def add_engagement(
        self,
        gains: Mapping[str, Sequence[Sequence[float]]],
        co: Mapping[str, Mapping[str, float]],
        known: Mapping[str, CatalogItem],
        token: str,
    ) -> None:
        """Fold one batch into items, in one round trip: its (weight, event time) gains into
        their decayed popularity, its {partner: count} into their co-engagement. `known` holds
        the current values; items that already took `token` skip it."""
        ops = []
        for item_id in dict.fromkeys([*gains, *co]):
            item = known.get(item_id)
            if item is None or token in item.batches:
                continue
            value, at = item.popularity, item.popularity_at
            for weight, t in gains.get(item_id, ()):
                value, at = accumulate(value, at, weight, t, self.popularity_half_life_s)
            updated = replace(
                item,
                popularity=value,
                popularity_at=at,
                batches=(*item.batches, token)[-KEPT_BATCHES:],
                co=add_co(item.co, co.get(item_id, {}), self.co_cap),
            )
            ops.append(
                models.SetPayloadOperation(
                    set_payload=models.SetPayload(
                        payload=self._engagement(updated),
                        points=[store.item_point_id(item_id)],
                    )
                )
            )
        if ops:
            self.client.batch_update_points(self.collection, update_operations=ops)

    def _engagement(self, item: CatalogItem) -> dict[str, Any]:
        """The payload fields events write: popularity (its value, its time and the ordering
        key), the batches taken and the co-engagement counts."""
        return {
            store.POPULARITY: item.popularity,
            store.POPULARITY_AT: item.popularity_at,
            store.TREND: trend(item.popularity, item.popularity_at, self.popularity_half_life_s),
            POPULARITY_BATCHES: list(item.batches),
            store.CO_ENGAGED: item.co,
        }
