"""Start and stop the gRPC ranker, with the standard health and reflection services, TLS or
mTLS, a bearer token, and admission control (serving/guards.py)."""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from qdrant_client import QdrantClient

from fusionrec.loop import Backlog
from fusionrec.settings import SecuritySettings, Settings
from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc
from serving.guards import Guard
from serving.ranker import RankerServicer

RANKER_SERVICE = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
# Threads for store calls against a Qdrant server; local mode calls stay on the loop's thread.
SERVER_MODE_THREADS = 4
# grpc's own cap on all RPCs, a backstop for memory above the Ranker's admission limit: room
# for health checks, reflection and the calls being refused.
OTHER_RPCS = 64


@dataclass
class RunningRanker:
    server: grpc.aio.Server
    port: int  # the bound port: the one asked for, or the one the OS chose for port 0
    health: health.aio.HealthServicer
    executor: Executor | None  # ours to shut down on stop
    guard: Guard


async def start_server(
    settings: Settings,
    client: QdrantClient,
    *,
    port: int | None = None,
    executor: Executor | None = None,
    worker: Backlog | None = None,
) -> RunningRanker:
    """Serve on settings.ranker.host and `port` (default settings.ranker.port; 0 picks one).

    Call from the event loop that should run the server (e.g. a mode.Service's on_start).
    Store calls run on `executor` when one is given (the caller owns it; in local mode it must
    be the one thread every user of the shared client goes through); otherwise on a pool of
    our own against a Qdrant server, and inline on the loop in local mode, where `worker` says
    when the stream worker sharing it last had a backlog (none: the loop is the ranker's).
    """
    owned = None
    if executor is None and settings.qdrant.url:
        executor = owned = ThreadPoolExecutor(
            SERVER_MODE_THREADS, thread_name_prefix="ranker-store"
        )
    r, security = settings.ranker, settings.security
    credentials = server_credentials(security)
    if security.token is not None and credentials is None:
        raise ValueError(
            "security.token needs TLS (cert_file, key_file): a token never travels in clear"
        )
    guard = Guard(
        limited=RANKER_SERVICE,
        max_in_flight=r.max_in_flight,
        token=security.token.get_secret_value() if security.token else None,
        inline=executor is None,
        worker=worker,
    )
    server = grpc.aio.server(
        interceptors=[guard],
        maximum_concurrent_rpcs=r.max_in_flight + OTHER_RPCS,
        options=[("grpc.max_receive_message_length", r.max_request_bytes)],
    )
    ranker_pb2_grpc.add_RankerServicer_to_server(
        RankerServicer(settings, client, executor=executor), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            RANKER_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"[{r.host}]" if ":" in r.host else r.host
    address = f"{address}:{r.port if port is None else port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    for service in ("", RANKER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningRanker(server, bound, health_servicer, owned, guard)


async def stop_server(ranker: RunningRanker, grace: float) -> None:
    """Report NOT_SERVING, let calls in flight finish for up to `grace` seconds, then stop."""
    await ranker.health.enter_graceful_shutdown()
    await ranker.server.stop(grace)
    if ranker.executor is not None:
        ranker.executor.shutdown(wait=False, cancel_futures=True)


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS from cert_file/key_file (None: plaintext); with client_auth_ca_file, clients must
    present a certificate signed by that CA (mTLS)."""
    if security.cert_file is None or security.key_file is None:
        return None
    ca = security.client_auth_ca_file
    return grpc.ssl_server_credentials(
        [(security.key_file.read_bytes(), security.cert_file.read_bytes())],
        root_certificates=ca.read_bytes() if ca else None,
        require_client_auth=ca is not None,
    )
