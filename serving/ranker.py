"""The gRPC Ranker: profile -> candidates -> late fusion -> top items, each with its reasons."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from functools import wraps
from typing import Any, TypeVar

import grpc
import numpy as np
from qdrant_client import QdrantClient

from fusionrec.settings import MODALITIES, Settings
from fusionrec.store import (
    CATEGORY,
    CO_ENGAGED,
    CREATED_AT,
    POPULARITY,
    POPULARITY_AT,
    TAGS,
    TITLE,
    item_point_id,
    user_point_id,
)
from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc
from serving import fusion
from serving.candidates import (
    Candidates,
    ItemCache,
    Layout,
    PriorCache,
    build_filter,
    generate,
    layout_of,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Request = TypeVar("Request")
Response = TypeVar("Response")

# An attribute key names one payload field: dots or brackets would reach into nested payload.
_ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_FILTER_VALUES = 100
# How long the items collection's vector layout is trusted before it is read again: an encoder
# upgrade adds vectors while the ranker runs.
LAYOUT_TTL_S = 30.0


class RpcFailure(Exception):
    """Ends the call with a status code and a message meant for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def _rpc(method: Handler) -> Handler:
    @wraps(method)
    async def handler(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message)

    return handler


def _invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_id(kind: str, value: str, max_length: int) -> None:
    if not value:
        raise _invalid(f"{kind} is empty")
    if len(value) > max_length:
        raise _invalid(f"{kind} is {len(value)} characters long; the limit is {max_length}")


def check_limit(limit: int, max_limit: int) -> None:
    if not 0 < limit <= max_limit:
        raise _invalid(f"limit must be in 1..{max_limit}, got {limit}")


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(MODALITIES))
    if unknown:
        raise _invalid(f"unknown modalities in modality_weights: {unknown}; known: {MODALITIES}")
    bad = {m: w for m, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise _invalid(f"modality weights must be finite and >= 0, got {bad}")
    return dict(weights)


def check_filter(f: ranker_pb2.Filter) -> None:
    for name, values in (
        ("categories", f.categories),
        ("tags", f.tags),
        ("attributes", f.attributes),
    ):
        if len(values) > MAX_FILTER_VALUES:
            raise _invalid(
                f"filter.{name} has {len(values)} values; the limit is {MAX_FILTER_VALUES}"
            )
    bad = sorted(k for k in f.attributes if not _ATTRIBUTE_KEY.fullmatch(k))
    if bad:
        raise _invalid(
            f"bad filter.attributes keys {bad}: a key is 1-64 letters, digits, '_' or '-'"
        )


def _number(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    )


# What a Recommend reads of a profile; the rest (event ids kept for dedupe, the outbox) can be
# large, and local mode deep-copies whatever it returns.
PROFILE_FIELDS = ["seen", "positives", "tag_affinity", "positive_at"]


class RankerServicer(ranker_pb2_grpc.RankerServicer):
    """Store calls run inline on the loop unless an executor is given.

    Inline is the only safe choice for Qdrant local mode shared with the stream worker: its
    client must not be used from two threads at once. Against a Qdrant server, an executor
    keeps the loop free while a query is in flight.
    """

    def __init__(
        self,
        settings: Settings,
        client: QdrantClient,
        *,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._client = client
        self._executor = executor
        self._clock = clock
        self._layout: Layout | None = None
        self._layout_read_at = -math.inf
        self._priors = PriorCache(settings.ranker.prior_cache_ttl_s)
        self._items = ItemCache(settings.ranker.item_cache_size)

    async def _checked(
        self, request: Any, id_name: str, id_value: str, context: grpc.aio.ServicerContext
    ) -> tuple[dict[str, float], Layout]:
        """The checks both RPCs share (INVALID_ARGUMENT on failure): the id, limit, weights and
        filter; then the current vector layout."""
        r = self._settings.ranker
        check_id(id_name, id_value, r.max_id_length)
        check_limit(request.limit, r.max_limit)
        overrides = check_weights(request.modality_weights)
        check_filter(request.filter)
        return overrides, await self._current_layout(context)

    @_rpc
    async def Recommend(
        self, request: ranker_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.RecommendResponse:
        q = self._settings.qdrant
        overrides, layout = await self._checked(request, "user_id", request.user_id, context)
        users = await self._store(
            context,
            lambda: self._client.retrieve(
                q.users_collection,
                [user_point_id(request.user_id)],
                with_payload=PROFILE_FIELDS,
                with_vectors=True,
            ),
        )
        vectors = users[0].vector if users else None
        payload = (users[0].payload if users else None) or {}
        weights = self._weights(layout, overrides)
        queries = _queries(vectors, layout, weights)
        exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
        seen = [str(s) for s in payload.get("seen") or []] if exclude_seen else []
        recent = self._settings.ranker.co_recent
        positives = [str(i) for i in payload.get("positives") or []][-recent:] if recent else []
        co = await self._co_engaged(context, positives)
        found = await self._candidates(context, layout, queries, request.filter, seen, True, co)
        affinity = _numbers(payload.get("tag_affinity"))
        last_positive = _number(payload.get("positive_at"))
        session = (co, last_positive if math.isfinite(last_positive) else 0.0)
        return ranker_pb2.RecommendResponse(
            items=self._rank(
                found, queries, affinity, session, weights, request.limit, request.explain
            ),
            cold_start=not queries,
            modality_weights=weights if request.explain else {},
        )

    @_rpc
    async def SimilarItems(
        self, request: ranker_pb2.SimilarItemsRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.SimilarItemsResponse:
        q = self._settings.qdrant
        overrides, layout = await self._checked(request, "item_id", request.item_id, context)
        point_id = item_point_id(request.item_id)
        items = await self._store(
            context,
            lambda: self._client.retrieve(
                q.items_collection,
                [point_id],
                with_payload=[TAGS, CO_ENGAGED],
                with_vectors=sorted(layout.vector_names.values()),
            ),
        )
        if not items:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"item {request.item_id!r} not found")
        weights = self._weights(layout, overrides)
        queries = _queries(items[0].vector, layout, weights)
        payload = items[0].payload or {}
        co = _numbers(payload.get(CO_ENGAGED))
        # An item with no usable vector still gets an answer: the popular and fresh items.
        found = await self._candidates(
            context, layout, queries, request.filter, [request.item_id], not queries, co
        )
        tags = {str(t): 1.0 for t in payload.get(TAGS) or []}
        return ranker_pb2.SimilarItemsResponse(
            items=self._rank(
                found, queries, tags, (co, None), weights, request.limit, request.explain
            ),
            modality_weights=weights if request.explain else {},
        )

    def _weights(self, layout: Layout, overrides: Mapping[str, float]) -> dict[str, float]:
        """The request's weight per modality, else the server's."""
        base = self._settings.ranker.modality_weights
        return {m: overrides.get(m, base.get(m, 0.0)) for m in layout.vector_names}

    async def _co_engaged(
        self, context: grpc.aio.ServicerContext, item_ids: list[str]
    ) -> dict[str, float]:
        """How often others engaged each item next to these (the user's latest positives)."""
        if not item_ids or self._settings.ranker.co_weight <= 0:
            return {}
        points = await self._store(
            context,
            lambda: self._client.retrieve(
                self._settings.qdrant.items_collection,
                [item_point_id(i) for i in item_ids],
                with_payload=[CO_ENGAGED],
            ),
        )
        return fusion.co_counts([_numbers((p.payload or {}).get(CO_ENGAGED)) for p in points])

    async def _candidates(
        self,
        context: grpc.aio.ServicerContext,
        layout: Layout,
        queries: Mapping[str, np.ndarray],
        f: ranker_pb2.Filter,
        exclude: list[str],
        with_priors: bool,
        co: Mapping[str, float],
    ) -> Candidates:
        """Vector search, the priors' lists (`with_priors`) and the most co-engaged items;
        none of the items in `exclude` (ids)."""
        r = self._settings.ranker
        query_filter = build_filter(f.categories, f.tags, dict(f.attributes))
        excluded = set(exclude)
        best = sorted((i for i in co if i not in excluded), key=lambda i: (-co[i], i))
        also = [item_point_id(i) for i in best[: r.co_candidates]]
        return await self._store(
            context,
            lambda: generate(
                self._client,
                self._settings.qdrant.items_collection,
                layout,
                queries,
                query_filter,
                per_modality=r.candidates_per_modality,
                fresh=r.fresh_candidates if with_priors else 0,
                popular=r.popular_candidates if with_priors else 0,
                exclude=[item_point_id(i) for i in exclude],
                cache=self._items,
                priors=self._priors,
                also=also,
            ),
        )

    def _rank(
        self,
        found: Candidates,
        queries: Mapping[str, np.ndarray],
        affinity: Mapping[str, float],
        co: tuple[Mapping[str, float], float | None],
        weights: Mapping[str, float],
        limit: int,
        explain: bool,
    ) -> list[ranker_pb2.ScoredItem]:
        """Fuse the modalities and the tag affinity (as one more modality), add the priors:
        popularity, recency and co-engagement. `co` is the counts and the time of the user's
        last positive (None: the counts are of the query item, no session to age)."""
        r = self._settings.ranker
        counts, last_positive = co
        popularity_at = np.array([_number(p.get(POPULARITY_AT)) for p in found.payloads])
        # The stream's clock: the newest positive among the candidates (or the user's own).
        now = max(np.nanmax(popularity_at, initial=0.0), last_positive or 0.0)
        session = r.co_session_half_life_hours * 3600.0
        gate = 1.0 if last_positive is None else fusion.session_gate(last_positive, now, session)
        user_tags, item_tags, has_tags = fusion.tag_vectors(
            affinity, [p.get(TAGS) or [] for p in found.payloads]
        )
        scores, parts = fusion.fuse(
            {**queries, fusion.TAGS: user_tags},
            {**found.vectors, fusion.TAGS: item_tags},
            {**found.present, fusion.TAGS: has_tags},
            {**weights, fusion.TAGS: r.tag_weight},
        )
        priors = {
            fusion.POPULARITY: fusion.popularity_prior(
                np.array([_number(p.get(POPULARITY)) for p in found.payloads]),
                popularity_at,
                self._settings.profiles.popularity_half_life_days * 86400.0,
            ),
            fusion.RECENCY: fusion.recency_prior(
                np.array([_number(p.get(CREATED_AT)) for p in found.payloads]),
                now=self._clock(),
                half_life_s=r.recency_half_life_days * 86400.0,
            ),
            fusion.CO_ENGAGEMENT: gate
            * fusion.count_prior(np.array([counts.get(i, 0.0) for i in found.ids])),
        }
        prior_weights = {
            fusion.POPULARITY: r.popularity_weight,
            fusion.RECENCY: r.recency_weight,
            fusion.CO_ENGAGEMENT: r.co_weight,
        }
        scores, parts = fusion.add_priors(scores, parts, priors, prior_weights)
        out = []
        for i in fusion.top_k(scores, found.ids, limit):
            payload = found.payloads[i]
            item = ranker_pb2.ScoredItem(
                item_id=found.ids[i],
                score=float(scores[i]),
                title=str(payload.get(TITLE) or ""),
                tags=[str(t) for t in payload.get(TAGS) or []],
            )
            if payload.get(CATEGORY) is not None:
                item.category = str(payload[CATEGORY])
            if explain:
                item.sources.extend(found.sources[i])
                for name, values in parts.items():
                    # A modality the item lacks did not take part in its score.
                    if name not in found.present or found.present[name][i]:
                        item.contributions[name] = float(values[i])
            out.append(item)
        return out

    async def _current_layout(self, context: grpc.aio.ServicerContext) -> Layout:
        now = time.monotonic()
        if self._layout is None or now - self._layout_read_at > LAYOUT_TTL_S:
            name = self._settings.qdrant.items_collection
            info = await self._store(context, lambda: self._client.get_collection(name))
            vectors = info.config.params.vectors
            layout, twice = layout_of(vectors if isinstance(vectors, dict) else {})
            if not layout.vector_names:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{name!r} has no named vectors yet")
            if twice:
                log.warning("modalities %s have several vectors; serving %s", twice, layout)
            self._layout, self._layout_read_at = layout, now
        return self._layout

    async def _store(self, context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the query")
        try:
            if self._executor is None:
                return call()
            future = asyncio.get_running_loop().run_in_executor(self._executor, call)
            return await asyncio.wait_for(future, remaining)
        except TimeoutError:
            raise RpcFailure(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the vector store did not answer in time"
            ) from None
        except Exception as exc:
            log.warning("vector store call failed", exc_info=True)
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"vector store unavailable: {type(exc).__name__}: {exc}",
            ) from exc


def _numbers(value: Any) -> dict[str, float]:
    """A stored {key: number} map, keeping only finite numbers (payloads are not trusted)."""
    pairs = ((str(k), _number(v)) for k, v in (value if isinstance(value, dict) else {}).items())
    return {k: v for k, v in pairs if math.isfinite(v)}


def _queries(vectors: Any, layout: Layout, weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The query vector per modality: those present, non-zero and weighted above 0."""
    named = vectors if isinstance(vectors, dict) else {}
    out = {}
    for m, name in layout.vector_names.items():
        v = np.asarray(named.get(name, ()), dtype=np.float32)
        if weights.get(m, 0.0) > 0 and v.size == layout.dims[m] and np.any(v):
            out[m] = v
    return out
