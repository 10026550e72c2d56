"""A small synchronous client for the Ranker, returning plain dataclasses.

Errors surface as `grpc.RpcError` (with `.code()` and `.details()`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.settings import Settings
from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc


@dataclass(frozen=True)
class RankedItem:
    item_id: str
    score: float
    contributions: dict[str, float]
    title: str
    category: str | None
    tags: list[str]
    sources: list[str]


@dataclass(frozen=True)
class Ranking:
    items: list[RankedItem]
    cold_start: bool = False
    modality_weights: dict[str, float] = field(default_factory=dict)


class RankerClient:
    """Plaintext by default; TLS when `tls` or any certificate is given (root_certificates
    None = the system roots); `certificate_chain` + `private_key` for mTLS; `token` is sent as
    a bearer token, over TLS only."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 5.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        token: str | None = None,
    ) -> None:
        if tls or root_certificates or certificate_chain:
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            if token:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(token)
                )
            self._channel = grpc.secure_channel(target, credentials)
        elif token:
            raise ValueError("a bearer token is sent over TLS only")
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = ranker_pb2_grpc.RankerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = 5.0) -> RankerClient:
        """A client for settings.ranker's host and port with settings.security's client side."""
        r, s = settings.ranker, settings.security
        return cls(
            f"{r.host}:{r.port}",
            timeout=timeout,
            tls=s.tls,
            root_certificates=_read(s.ca_file),
            certificate_chain=_read(s.client_cert_file),
            private_key=_read(s.client_key_file),
            token=s.token.get_secret_value() if s.token else None,
        )

    def recommend(
        self,
        user_id: str,
        limit: int = 10,
        *,
        categories: Iterable[str] = (),
        tags: Iterable[str] = (),
        attributes: Mapping[str, str] | None = None,
        exclude_seen: bool = True,
        modality_weights: Mapping[str, float] | None = None,
        explain: bool = True,
    ) -> Ranking:
        reply = self._stub.Recommend(
            ranker_pb2.RecommendRequest(
                user_id=user_id,
                limit=limit,
                filter=_filter(categories, tags, attributes),
                exclude_seen=exclude_seen,
                modality_weights=modality_weights or {},
                explain=explain,
            ),
            timeout=self.timeout,
        )
        return _ranking(reply.items, reply.modality_weights, cold_start=reply.cold_start)

    def similar(
        self,
        item_id: str,
        limit: int = 10,
        *,
        categories: Iterable[str] = (),
        tags: Iterable[str] = (),
        attributes: Mapping[str, str] | None = None,
        modality_weights: Mapping[str, float] | None = None,
        explain: bool = True,
    ) -> Ranking:
        reply = self._stub.SimilarItems(
            ranker_pb2.SimilarItemsRequest(
                item_id=item_id,
                limit=limit,
                filter=_filter(categories, tags, attributes),
                modality_weights=modality_weights or {},
                explain=explain,
            ),
            timeout=self.timeout,
        )
        return _ranking(reply.items, reply.modality_weights)

    def health(self, service: str = "") -> str:
        """The serving status name, e.g. "SERVING"; "" asks about the whole server."""
        reply = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def serving(self) -> bool:
        """Whether the server says SERVING; False while it is not up yet or unreachable."""
        try:
            return self.health() == "SERVING"
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RankerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def _filter(
    categories: Iterable[str], tags: Iterable[str], attributes: Mapping[str, str] | None
) -> ranker_pb2.Filter:
    return ranker_pb2.Filter(
        categories=list(categories), tags=list(tags), attributes=dict(attributes or {})
    )


def _ranking(
    items: Iterable[ranker_pb2.ScoredItem],
    weights: Mapping[str, float],
    *,
    cold_start: bool = False,
) -> Ranking:
    return Ranking(
        items=[
            RankedItem(
                item_id=i.item_id,
                score=i.score,
                contributions=dict(i.contributions),
                title=i.title,
                category=i.category if i.HasField("category") else None,
                tags=list(i.tags),
                sources=list(i.sources),
            )
            for i in items
        ],
        cold_start=cold_start,
        modality_weights=dict(weights),
    )
