"""Candidate generation: every source in one `query_batch_points` round trip, vectors included.

Sources: the nearest items to each query vector (one request per modality), the newest items
("fresh") and the most popular ("popular"). Each request carries the same filter and returns
payload and vectors, so fusion needs no second fetch. `OrderByQuery` serves fresh and popular in
local mode and on a server alike (a server needs the range indexes `ensure_collections` makes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from fusionrec.store import (
    ATTRIBUTES,
    CATEGORY,
    CREATED_AT,
    ITEM_ID,
    POPULARITY,
    TAGS,
    modality_of,
)

FRESH = "fresh"
POPULAR = "popular"


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
    exclude_point_ids: Iterable[str] = (),
) -> models.Filter | None:
    must: list[models.Condition] = []
    if categories := list(categories):
        must.append(models.FieldCondition(key=CATEGORY, match=models.MatchAny(any=categories)))
    if tags := list(tags):
        must.append(models.FieldCondition(key=TAGS, match=models.MatchAny(any=tags)))
    for key, value in (attributes or {}).items():
        must.append(_attribute_equals(key, value))
    exclude = list(exclude_point_ids)
    must_not = [models.HasIdCondition(has_id=exclude)] if exclude else None
    return models.Filter(must=must or None, must_not=must_not) if must or must_not else None


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
) -> Candidates:
    """Union of all sources, deduplicated, remembering which sources found each item."""
    names = sorted(layout.vector_names.values())
    labelled: list[tuple[str, models.QueryRequest]] = []

    def add(label: str, query: Any, limit: int, using: str | None = None) -> None:
        if limit > 0:
            request = models.QueryRequest(
                query=query,
                using=using,
                filter=query_filter,
                limit=limit,
                with_payload=True,
                with_vector=names,
            )
            labelled.append((label, request))

    for modality, vector in queries.items():
        add(modality, np.asarray(vector).tolist(), per_modality, layout.vector_names[modality])
    newest = models.OrderBy(key=CREATED_AT, direction=models.Direction.DESC)
    add(FRESH, models.OrderByQuery(order_by=newest), fresh)
    most_popular = models.OrderBy(key=POPULARITY, direction=models.Direction.DESC)
    add(POPULAR, models.OrderByQuery(order_by=most_popular), popular)
    if not labelled:
        return Candidates()
    answers = client.query_batch_points(collection, requests=[r for _, r in labelled])
    return _merge(
        layout, [(label, a.points) for (label, _), a in zip(labelled, answers, strict=True)]
    )


def _merge(layout: Layout, found: list[tuple[str, list[models.ScoredPoint]]]) -> Candidates:
    index: dict[str, int] = {}
    out = Candidates()
    rows: list[dict[str, Any]] = []
    for label, points in found:
        for point in points:
            key = str(point.id)
            if key not in index:
                index[key] = len(out.ids)
                payload = point.payload or {}
                out.ids.append(str(payload.get(ITEM_ID, key)))
                out.payloads.append(payload)
                out.sources.append([])
                rows.append(point.vector if isinstance(point.vector, dict) else {})
            if label not in out.sources[index[key]]:
                out.sources[index[key]].append(label)
    for modality, name in layout.vector_names.items():
        have = [name in row for row in rows]
        dim = layout.dims[modality]
        out.present[modality] = np.array(have, dtype=bool)
        out.vectors[modality] = np.array(
            [row[name] if ok else np.zeros(dim) for row, ok in zip(rows, have, strict=True)],
            dtype=np.float32,
        ).reshape(len(rows), dim)
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
