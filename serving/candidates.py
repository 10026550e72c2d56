"""Candidate generation: every source in one `query_batch_points` round trip, then vectors.

Sources: the nearest items to each query vector (one request per modality), the newest items
("fresh"), the most popular ("popular") and items named by the caller ("co-engaged": fetched by
id, through the filter when there is one). Each request carries the same filter.
`OrderByQuery` serves fresh and popular in local mode and on a server alike (a server needs the
range indexes `ensure_collections` makes).

Searches return only the payload fields that events change (`LIVE_FIELDS`: popularity) and the
item's content digest; vectors and the fields only an upsert changes come from an `ItemCache`
keyed by point id and that digest, and only the items it lacks are read, in one `retrieve`.
Candidates' vectors were most of a Recommend (a few hundred points of 1,664 floats, which local
mode turns into Python lists one by one and a server sends over the wire), and after them the
payloads local mode deep-copies point by point (a third of a Recommend at 10k items).

Two choices keep a request cheap on Qdrant local mode, which evaluates filters and orderings
point by point in Python (a Recommend over 10k items took ~650 ms with them in every request):
excluded ids (what the user has seen) are dropped here from an over-fetched answer rather than
sent as a `HasId` filter, and the fresh and popular lists, the same for every user, are reused
for a few seconds (`PriorCache`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from fusionrec.store import (
    ATTRIBUTES,
    CATEGORY,
    CONTENT_DIGEST,
    CONTENT_FIELDS,
    CREATED_AT,
    ITEM_ID,
    POPULARITY,
    POPULARITY_AT,
    TAGS,
    TREND,
    modality_of,
)

# The payload fields every search returns: those events change, and the digest that says
# whether a cached item is current. The rest ranking reads (CONTENT_FIELDS) are cached.
LIVE_FIELDS = [CONTENT_DIGEST, POPULARITY, POPULARITY_AT]

FRESH = "fresh"
POPULAR = "popular"
CO_ENGAGED = "co-engaged"


@dataclass(frozen=True)
class Layout:
    """Which named vector serves each modality, and its dimension."""

    vector_names: dict[str, str]  # modality -> vector name
    dims: dict[str, int]  # modality -> dimension


@dataclass
class Candidates:
    ids: list[str] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (n, d)
    present: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (n,) bool
    sources: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def build_filter(
    categories: Iterable[str] = (),
    tags: Iterable[str] = (),
    attributes: Mapping[str, str] | None = None,
) -> models.Filter | None:
    must: list[models.Condition] = []
    if categories := list(categories):
        must.append(models.FieldCondition(key=CATEGORY, match=models.MatchAny(any=categories)))
    if tags := list(tags):
        must.append(models.FieldCondition(key=TAGS, match=models.MatchAny(any=tags)))
    for key, value in (attributes or {}).items():
        must.append(_attribute_equals(key, value))
    return models.Filter(must=must) if must else None


def _attribute_equals(key: str, value: str) -> models.Filter:
    """`attributes.<key> == value`, where the stored value may be text, a number or a bool.

    The API carries values as text, so "1999" must match 1999 and "true" must match True.
    """
    path = f"{ATTRIBUTES}.{key}"
    should: list[models.Condition] = [
        models.FieldCondition(key=path, match=models.MatchValue(value=value))
    ]
    if value in ("true", "false"):
        flag = models.MatchValue(value=value == "true")
        should.append(models.FieldCondition(key=path, match=flag))
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and np.isfinite(number):
        should.append(models.FieldCondition(key=path, range=models.Range(gte=number, lte=number)))
    return models.Filter(should=should)


@dataclass
class PriorCache:
    """The fresh and popular lists per filter, reused for `ttl_s` seconds.

    They do not depend on the user, and computing one is a scan of the whole collection in local
    mode (~65 ms at 10k items). A new item joins the fresh list at most `ttl_s` late; vector
    search finds it at once. Entries are replaced whole, so threads sharing a cache at worst
    compute a list twice.
    """

    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _lists: dict[str, tuple[float, list[models.ScoredPoint]]] = field(default_factory=dict)

    def get(self, key: str) -> list[models.ScoredPoint] | None:
        hit = self._lists.get(key)
        return hit[1] if hit is not None and self.clock() - hit[0] < self.ttl_s else None

    def put(self, key: str, points: list[models.ScoredPoint]) -> None:
        now = self.clock()
        # Many distinct filters must not grow the cache without bound: expired entries go.
        self._lists = {k: v for k, v in self._lists.items() if now - v[0] < self.ttl_s}
        self._lists[key] = (now, points)


@dataclass(frozen=True)
class Item:
    """What only an upsert changes: the CONTENT_FIELDS of the payload and the vectors."""

    fields: dict[str, Any]
    vectors: dict[str, np.ndarray]


class ItemCache:
    """Items by (point id, content digest), the `size` last used.

    A cached item is never stale: a new upsert brings a new digest (the same content, the same
    digest). Points without a digest are read every time. Thread-safe, for rankers that query
    the store from an executor.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], Item] = OrderedDict()
        self._lock = threading.Lock()

    def items(
        self, client: QdrantClient, collection: str, names: list[str], points: Sequence[Any]
    ) -> list[Item]:
        """The items of `points` (found with the digest in their payload), in their order."""
        keys = [(str(p.id), (p.payload or {}).get(CONTENT_DIGEST)) for p in points]
        with self._lock:
            got = {k: self._items[k] for k in keys if k in self._items}
            for k in got:
                self._items.move_to_end(k)
        missing = [k[0] for k in keys if k not in got]
        if missing:
            read = client.retrieve(
                collection,
                missing,
                with_payload=[CONTENT_DIGEST, *CONTENT_FIELDS],
                with_vectors=names,
            )
            fetched = {}
            for p in read:
                payload = p.payload or {}
                vectors = p.vector if isinstance(p.vector, dict) else {}
                fetched[(str(p.id), payload.get(CONTENT_DIGEST))] = Item(
                    {f: payload[f] for f in CONTENT_FIELDS if f in payload},
                    {n: np.asarray(v, dtype=np.float32) for n, v in vectors.items()},
                )
            # Read after the search: an item updated in between is ranked as it is now.
            by_id = {k[0]: item for k, item in fetched.items()}
            gone = Item({}, {})
            got.update({k: by_id.get(k[0], gone) for k in keys if k not in got})
            with self._lock:
                for k, item in fetched.items():
                    if isinstance(k[1], str):
                        self._items[k] = item
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return [got[k] for k in keys]


def generate(
    client: QdrantClient,
    collection: str,
    layout: Layout,
    queries: Mapping[str, np.ndarray],
    query_filter: models.Filter | None,
    *,
    per_modality: int,
    fresh: int,
    popular: int,
    exclude: Collection[str] = (),
    cache: ItemCache,
    priors: PriorCache | None = None,
    also: Collection[str] = (),
) -> Candidates:
    """Union of all sources, deduplicated, remembering which sources found each item.

    `also` holds point ids to add as candidates (the caller has excluded what it must). Without
    a filter they are read by id, which local mode answers without a scan; with one they go
    through it in the same batch.

    `exclude` holds point ids no source may return. Up to `per_modality` of them are dropped from
    answers over-fetched by their number (exact: at most that many can fall out); more go to the
    store as a `HasId` filter, since over-fetching thousands of points would cost more.
    """
    names = sorted(layout.vector_names.values())
    excluded = {str(i) for i in exclude}
    over = len(excluded)
    if over > per_modality:
        query_filter, over, priors = _with_excluded(query_filter, excluded), 0, None

    def request(
        query: Any, limit: int, using: str | None = None, where: models.Filter | None = None
    ) -> models.QueryRequest:
        return models.QueryRequest(
            query=query,
            using=using,
            filter=where or query_filter,
            limit=limit,
            with_payload=LIVE_FIELDS,
        )

    # (label, points kept, cache key, the request to send or the cached answer)
    planned: list[tuple[str, int, str | None, models.QueryRequest | list[models.ScoredPoint]]]
    planned = []
    if per_modality > 0:
        for modality, vector in queries.items():
            query = request(
                np.asarray(vector).tolist(), per_modality + over, layout.vector_names[modality]
            )
            planned.append((modality, per_modality, None, query))
    for label, key, limit in ((FRESH, CREATED_AT, fresh), (POPULAR, TREND, popular)):
        if limit <= 0:
            continue
        order = models.OrderByQuery(
            order_by=models.OrderBy(key=key, direction=models.Direction.DESC)
        )
        if priors is None:
            planned.append((label, limit, None, request(order, limit + over)))
            continue
        # Shared by every caller, so over-fetched as far as any caller's exclusions reach.
        fetch = limit + per_modality
        cache_key = f"{label}:{fetch}:{query_filter.model_dump_json() if query_filter else ''}"
        hit = priors.get(cache_key)
        planned.append((label, limit, cache_key, request(order, fetch) if hit is None else hit))
    named: list[Any] = []
    if also and query_filter is None:
        named = client.retrieve(collection, list(also), with_payload=LIVE_FIELDS)
    elif also:
        only = models.Filter(must=[query_filter, models.HasIdCondition(has_id=list(also))])
        planned.append((CO_ENGAGED, len(also), None, request(None, len(also), where=only)))
    asked = [r for *_, r in planned if isinstance(r, models.QueryRequest)]
    answers = iter(client.query_batch_points(collection, requests=asked) if asked else ())
    found = []
    for label, limit, cache_key, source in planned:
        if isinstance(source, models.QueryRequest):
            points = next(answers).points
            if priors is not None and cache_key is not None:
                priors.put(cache_key, points)
        else:
            points = source
        found.append((label, [p for p in points if str(p.id) not in excluded][:limit]))
    if named:
        found.append((CO_ENGAGED, named))
    return _merge(layout, found, lambda points: cache.items(client, collection, names, points))


def _with_excluded(query_filter: models.Filter | None, ids: Collection[str]) -> models.Filter:
    not_these = [models.HasIdCondition(has_id=list(ids))]
    if query_filter is None:
        return models.Filter(must_not=not_these)
    return query_filter.model_copy(update={"must_not": not_these})


def _merge(
    layout: Layout,
    found: list[tuple[str, list[Any]]],
    items_of: Callable[[list[Any]], list[Item]],
) -> Candidates:
    index: dict[str, int] = {}
    out = Candidates()
    points: list[Any] = []
    for label, answer in found:
        for point in answer:
            key = str(point.id)
            if key not in index:
                index[key] = len(points)
                points.append(point)
                out.sources.append([])
            if label not in out.sources[index[key]]:
                out.sources[index[key]].append(label)
    items = items_of(points) if points else []
    for point, item in zip(points, items, strict=True):
        out.ids.append(str(item.fields.get(ITEM_ID, point.id)))
        out.payloads.append({**item.fields, **(point.payload or {})})
    for modality, name in layout.vector_names.items():
        dim = layout.dims[modality]
        have = [item.vectors.get(name, np.empty(0)).shape == (dim,) for item in items]
        out.present[modality] = np.array(have, dtype=bool)
        matrix = np.zeros((len(items), dim), dtype=np.float32)
        for i, ok in enumerate(have):
            if ok:
                matrix[i] = items[i].vectors[name]
        out.vectors[modality] = matrix
    return out


def layout_of(vectors: Mapping[str, models.VectorParams]) -> tuple[Layout, list[str]]:
    """Layout from the items collection's vector config; also the modalities served twice.

    During an encoder upgrade a modality can have two vectors; the last name in sorted order
    serves, and the caller is told which modalities were ambiguous.
    """
    names: dict[str, str] = {}
    dims: dict[str, int] = {}
    twice: list[str] = []
    for name in sorted(vectors):
        modality = modality_of(name)
        if modality in names:
            twice.append(modality)
        names[modality], dims[modality] = name, vectors[name].size
    return Layout(names, dims), twice
