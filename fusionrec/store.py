"""The Qdrant layout every role shares: collections, vector names, point ids, payload fields."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from fusionrec.settings import Settings

# Fixed namespace: point ids must stay the same across processes and releases.
_NAMESPACE = uuid.UUID("6f1c2a52-8d0e-4d3b-9a57-3f1f0c9e2b11")

# Payload fields of an item point that filters and priors read.
ITEM_ID = "item_id"
TITLE = "title"
CATEGORY = "category"
TAGS = "tags"
ATTRIBUTES = "attributes"
CREATED_AT = "created_at"
POPULARITY = "popularity"  # decayed sum of positive event weights, as of POPULARITY_AT
POPULARITY_AT = "popularity_at"
# ln(popularity) + popularity_at * ln 2 / half-life: orders items by popularity decayed to any
# common time, so the store can rank "popular now" without rewriting every item as time passes.
TREND = "trend"
# {item id: count}: how often users engaged that item right after this one, or before it.
CO_ENGAGED = "co_engaged"
# A digest of what only an upsert of the item changes (its vectors and CONTENT_FIELDS): readers
# may cache those under (point id, digest), since any change of them changes it.
CONTENT_DIGEST = "content_digest"
CONTENT_FIELDS = (ITEM_ID, TITLE, CATEGORY, TAGS, CREATED_AT)


def content_digest(vectors: Mapping[str, np.ndarray], payload: Mapping[str, Any]) -> str:
    """Digest of named vectors and the payload's CONTENT_FIELDS, stable across processes and
    replays."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(vectors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(vectors[name], dtype=np.float32).tobytes())
    h.update(json.dumps([payload.get(f) for f in CONTENT_FIELDS]).encode())
    return h.hexdigest()


def item_point_id(item_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"item:{item_id}"))


def user_point_id(user_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"user:{user_id}"))


def ledger_point_id(epoch: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"ledger:{epoch}"))


def modality_of(vector_name: str) -> str:
    """`text.minilm-l6-v2` -> `text`: a vector name is `<modality>.<encoder name>`."""
    return vector_name.split(".", 1)[0]


# SQLite's result codes for a database it cannot write now (locked by another process, disk
# full or failing, file gone), as opposed to a statement it refuses.
_LOCAL_OUTAGES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN")
# How long a local-mode write waits for a lock held elsewhere before it fails (SQLite's default
# here is 5 s): short, so the worker waits with backoff, off the loop the ranker shares.
LOCAL_BUSY_TIMEOUT_MS = 200


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the store is out of reach for now (worth waiting for), as opposed to a
    request it refuses. Covers the REST transport, HTTP 502-504, gRPC UNAVAILABLE/DEADLINE and,
    in local mode, a database file that cannot be written now."""
    if isinstance(exc, ResponseHandlingException | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorname", "").startswith(_LOCAL_OUTAGES)
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code in (502, 503, 504)
    if isinstance(exc, grpc.RpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def connect(settings: Settings) -> QdrantClient:
    q = settings.qdrant
    if q.url:
        key = q.api_key.get_secret_value() if q.api_key else None
        return QdrantClient(url=q.url, api_key=key, prefer_grpc=True, timeout=10)
    path = Path(settings.data_dir) / "qdrant"
    path.mkdir(parents=True, exist_ok=True)
    client = QdrantClient(path=str(path))
    score_in_float32(client)
    return client


def score_in_float32(client: QdrantClient) -> None:
    """Make local mode score in float32, as a Qdrant server does.

    Local mode turns every query vector into a float64 array, and reloads a collection's vectors
    from disk as float64: against a float32 matrix (a collection made in this process) numpy
    casts the whole matrix for each query. One 1280-d query over 10k items took 20-30 ms that
    way here, ~6 ms against a reloaded float64 matrix (which takes twice the memory), ~4.5 ms in
    float32 (the dot product itself ~2 ms). The stored values came from float32, so the
    matrices lose nothing; queries lose float64 precision in the score, which the server never
    had. Local mode has no setting for this: its query resolution is wrapped once per process,
    and the loaded matrices cast. A release of qdrant-client without that method is left as it
    is (slower, not wrong)."""
    from qdrant_client.local.local_collection import LocalCollection

    method = LocalCollection.__dict__.get("_resolve_query_vector_name")
    resolve = getattr(method, "__func__", None)
    if resolve is not None and not getattr(resolve, "in_float32", False):

        def resolved(cls: type, query_vector: Any) -> tuple[str, Any]:
            name, vector = resolve(cls, query_vector)
            if isinstance(vector, np.ndarray) and vector.dtype == np.float64:
                vector = vector.astype(np.float32)
            return name, vector

        resolved.in_float32 = True  # type: ignore[attr-defined]
        LocalCollection._resolve_query_vector_name = classmethod(resolved)  # type: ignore[method-assign]
    for collection in _local_collections(client):
        vectors = getattr(collection, "vectors", {})
        for name, matrix in vectors.items():
            if getattr(matrix, "dtype", None) == np.float64:
                vectors[name] = matrix.astype(np.float32)


def ensure_collections(client: QdrantClient, settings: Settings, dims: Mapping[str, int]) -> None:
    """Create `items` and `users` with one named vector per encoder, both scored by dot product.

    Item vectors are unit length (Catalog.upsert makes sure), so dot product is their cosine,
    without the cost of cosine in local mode: it renormalises the whole matrix on every query
    (about 30 ms per 1280-d query at 10k items). A collection made as cosine by an older release
    ranks the same. Users use dot product because a profile is stored unnormalised: its length
    is how much evidence stands behind it, and cosine would normalise that away on write.
    """
    layouts = {
        settings.qdrant.items_collection: models.Distance.DOT,
        settings.qdrant.users_collection: models.Distance.DOT,
    }
    if not client.collection_exists(settings.qdrant.meta_collection):
        client.create_collection(settings.qdrant.meta_collection, vectors_config={})
    for name, distance in layouts.items():
        wanted = {v: models.VectorParams(size=d, distance=distance) for v, d in dims.items()}
        if client.collection_exists(name):
            have = client.get_collection(name).config.params.vectors
            have = have if isinstance(have, dict) else {}
            missing = sorted(set(wanted) - set(have))
            if missing:
                raise RuntimeError(
                    f"collection {name!r} lacks vectors {missing}: an encoder changed; "
                    "re-encode into a new collection or restore the previous encoder settings"
                )
            continue
        client.create_collection(name, vectors_config=wanted)
        if name == settings.qdrant.items_collection:
            for field, schema in (
                (CATEGORY, models.PayloadSchemaType.KEYWORD),
                (TAGS, models.PayloadSchemaType.KEYWORD),
                (CREATED_AT, models.PayloadSchemaType.FLOAT),
                (POPULARITY, models.PayloadSchemaType.FLOAT),
                (TREND, models.PayloadSchemaType.FLOAT),
            ):
                client.create_payload_index(name, field, field_schema=schema)


def fast_local_commits(client: QdrantClient) -> None:
    """Qdrant local mode writes every point in its own SQLite transaction with an fsync: ~1.6 ms
    a point here, which held profile folding near 300 events/s. In WAL mode with
    synchronous=NORMAL (~0.35 ms a point) a commit still survives a crash of this process; only
    a power cut can lose the last ones, and the embedded broker loses its messages then anyway.
    A lock held elsewhere fails a write after LOCAL_BUSY_TIMEOUT_MS, not 5 s (`unavailable`).
    The connections are also wrapped so that `batched_commits` can commit a run of points at
    once. Local mode has no setting for either, hence the reach into its connections; a server
    client has none and is left alone."""
    holder = _Holder()
    for collection in _local_collections(client):
        connection = collection.storage.storage
        if isinstance(connection, sqlite3.Connection):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA busy_timeout={LOCAL_BUSY_TIMEOUT_MS}")
            collection.storage.storage = _HeldConnection(connection, holder)


@contextmanager
def batched_commits(client: QdrantClient) -> Iterator[None]:
    """Inside this block local mode's commit a point becomes a commit a run: the points written
    to one collection in a row are committed together, when a write goes to another collection
    or the block ends, whatever happens in it. Commits stay in the order of the writes, so a
    crash leaves a prefix of them, as before (what the popularity protocol relies on: profiles,
    then items, then the ledger). Call it around code that does not await: what an offset
    commit acknowledges must be on disk first. Nests; a no-op for a server client."""
    holders = {
        c.storage.storage.holder
        for c in _local_collections(client)
        if isinstance(c.storage.storage, _HeldConnection)
    }
    for h in holders:
        h.depth += 1
    try:
        yield
    finally:
        for h in holders:
            h.depth -= 1
            if h.depth == 0:
                h.flush()


class _Holder:
    """The run being held for the connections of one client."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: sqlite3.Connection | None = None

    def hold(self, connection: sqlite3.Connection) -> None:
        if self.pending is not connection:
            self.flush()
            self.pending = connection

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.commit()


class _HeldConnection:
    """A SQLite connection whose `with connection:` blocks (local mode's commit a point) leave
    the commit to its holder while a batch is open. A failed write still rolls back the run it
    belongs to and raises: the batch fails and is retried whole (writes are idempotent)."""

    def __init__(self, connection: sqlite3.Connection, holder: _Holder) -> None:
        self.connection = connection
        self.holder = holder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)

    def __enter__(self) -> sqlite3.Connection:
        return self.connection.__enter__()

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool | None:
        if self.holder.depth and kind is None:
            self.holder.hold(self.connection)
            return False
        if self.holder.pending is self.connection:
            self.holder.pending = None  # rolled back (or committed) with this block
        return self.connection.__exit__(kind, value, tb)


def _local_collections(client: QdrantClient) -> list[Any]:
    collections = getattr(getattr(client, "_client", None), "collections", None) or {}
    return [c for c in collections.values() if hasattr(getattr(c, "storage", None), "storage")]
