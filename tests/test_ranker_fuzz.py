"""Bad input on the gRPC door: the check_* validators as properties, then generated requests
against a real server, judged by an oracle written here from the API's rules (not by calling
the validators), and the edge a fuzzer rarely reaches: huge messages (1 ms deadlines are in
test_shedding, where a slow store makes them expire)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qdrant_client import QdrantClient

from fusionrec.settings import MODALITIES, Settings
from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc
from serving.client import RankerClient
from serving.ranker import (
    MAX_FILTER_VALUES,
    RpcFailure,
    check_filter,
    check_id,
    check_limit,
    check_weights,
)
from tests.test_ranker import BackgroundServer, _fill

MAX_LIMIT = 50
MAX_ID = 256
KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}")

ids = st.text(max_size=MAX_ID + 20)
limits = st.one_of(st.integers(-3, MAX_LIMIT + 3), st.integers(-(2**31), 2**31 - 1))
# float32 on the wire: larger values arrive as infinity.
weights = st.dictionaries(
    st.one_of(st.sampled_from(MODALITIES), st.text(max_size=6)),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    max_size=4,
)
values = st.one_of(
    st.lists(st.text(max_size=12), max_size=4),
    st.lists(st.just("v"), min_size=MAX_FILTER_VALUES - 1, max_size=MAX_FILTER_VALUES + 2),
)
attribute_keys = st.one_of(st.from_regex(KEY, fullmatch=True), st.text(max_size=70))
filters = st.builds(
    ranker_pb2.Filter,
    categories=values,
    tags=values,
    attributes=st.one_of(
        st.dictionaries(attribute_keys, st.text(max_size=12), max_size=4),
        st.just({f"k{i}": "1" for i in range(MAX_FILTER_VALUES + 1)}),
    ),
)


def valid_filter(f: ranker_pb2.Filter) -> bool:
    lists = (f.categories, f.tags, f.attributes)
    return all(len(v) <= MAX_FILTER_VALUES for v in lists) and all(
        KEY.fullmatch(k) for k in f.attributes
    )


def valid_weights(w: dict[str, float]) -> bool:
    return all(m in MODALITIES and math.isfinite(v) and v >= 0 for m, v in w.items())


def invalid(call) -> bool:  # type: ignore[no-untyped-def]
    try:
        call()
    except RpcFailure as failure:
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.message
        return True
    return False


@given(ids, st.integers(0, 400))
def test_check_id(value: str, max_length: int) -> None:
    assert invalid(lambda: check_id("user_id", value, max_length)) == (
        not value or len(value) > max_length
    )


@given(limits)
def test_check_limit(limit: int) -> None:
    assert invalid(lambda: check_limit(limit, MAX_LIMIT)) == (not 1 <= limit <= MAX_LIMIT)


@given(weights)
def test_check_weights(w: dict[str, float]) -> None:
    assert invalid(lambda: check_weights(w)) == (not valid_weights(w))


@given(filters)
def test_check_filter(f: ranker_pb2.Filter) -> None:
    assert invalid(lambda: check_filter(f)) == (not valid_filter(f))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    config = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        ranker={
            "modality_weights": {"text": 1.0, "image": 1.0},
            "max_limit": MAX_LIMIT,
            "max_id_length": MAX_ID,
        },
    )
    store = QdrantClient(":memory:")
    _fill(store, config)
    with ThreadPoolExecutor(1) as executor:
        running = BackgroundServer(config, store, executor)
        yield running
        running.close()
    store.close()


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[ranker_pb2_grpc.RankerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.ranker.port}") as channel:
        yield ranker_pb2_grpc.RankerStub(channel)


def outcome(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        assert err.details(), "every refusal says why"
        return err.code()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user_id=ids,
    limit=limits,
    w=weights,
    f=filters,
    exclude_seen=st.none() | st.booleans(),
    explain=st.booleans(),
)
def test_recommend_requests(
    stub: ranker_pb2_grpc.RankerStub,
    user_id: str,
    limit: int,
    w: dict[str, float],
    f: ranker_pb2.Filter,
    exclude_seen: bool | None,
    explain: bool,
) -> None:
    request = ranker_pb2.RecommendRequest(
        user_id=user_id,
        limit=limit,
        modality_weights=w,
        filter=f,
        exclude_seen=exclude_seen,
        explain=explain,
    )
    ok = 0 < len(user_id) <= MAX_ID and 1 <= limit <= MAX_LIMIT
    ok = ok and valid_weights(dict(request.modality_weights)) and valid_filter(f)
    got = outcome(lambda: stub.Recommend(request, timeout=10))
    assert got == (grpc.StatusCode.OK if ok else grpc.StatusCode.INVALID_ARGUMENT)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item_id=st.one_of(ids, st.sampled_from(["i1", "i3", "i5"])), limit=limits, f=filters)
def test_similar_items_requests(
    stub: ranker_pb2_grpc.RankerStub, item_id: str, limit: int, f: ranker_pb2.Filter
) -> None:
    request = ranker_pb2.SimilarItemsRequest(item_id=item_id, limit=limit, filter=f)
    ok = 0 < len(item_id) <= MAX_ID and 1 <= limit <= MAX_LIMIT and valid_filter(f)
    got = outcome(lambda: stub.SimilarItems(request, timeout=10))
    if not ok:
        assert got == grpc.StatusCode.INVALID_ARGUMENT
    else:
        known = item_id in ("i1", "i3", "i5")
        assert got == (grpc.StatusCode.OK if known else grpc.StatusCode.NOT_FOUND)


def test_huge_requests_are_refused_and_the_server_goes_on(server: BackgroundServer) -> None:
    with RankerClient(f"127.0.0.1:{server.ranker.port}") as c:
        assert outcome(lambda: c.recommend("u" * 5000)) == grpc.StatusCode.INVALID_ARGUMENT
        # Above ranker.max_request_bytes grpc refuses the message before it is parsed.
        assert outcome(lambda: c.recommend("u" * 200_000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert outcome(lambda: c.similar("i1", tags=["t" * 100] * 1000)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert c.recommend("u-image", 1).items[0].item_id == "i1"
