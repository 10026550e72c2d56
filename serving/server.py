"""Start and stop the gRPC ranker, with the standard health and reflection services."""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from qdrant_client import QdrantClient

from fusionrec.settings import Settings
from protos.fusionrec.v1 import ranker_pb2, ranker_pb2_grpc
from serving.ranker import RankerServicer

RANKER_SERVICE = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
# Threads for store calls against a Qdrant server; local mode calls stay on the loop's thread.
SERVER_MODE_THREADS = 4


@dataclass
class RunningRanker:
    server: grpc.aio.Server
    port: int  # the bound port: the one asked for, or the one the OS chose for port 0
    health: health.aio.HealthServicer
    executor: Executor | None  # ours to shut down on stop


async def start_server(
    settings: Settings,
    client: QdrantClient,
    *,
    port: int | None = None,
    executor: Executor | None = None,
) -> RunningRanker:
    """Serve on settings.ranker.host and `port` (default settings.ranker.port; 0 picks one).

    Call from the event loop that should run the server (e.g. a mode.Service's on_start).
    Store calls run on `executor` when one is given (the caller owns it; in local mode it must
    be the one thread every user of the shared client goes through); otherwise on a pool of
    our own against a Qdrant server, and inline on the loop in local mode.
    """
    owned = None
    if executor is None and settings.qdrant.url:
        executor = owned = ThreadPoolExecutor(
            SERVER_MODE_THREADS, thread_name_prefix="ranker-store"
        )
    server = grpc.aio.server()
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
    host = settings.ranker.host
    address = f"[{host}]" if ":" in host else host
    bound = server.add_insecure_port(f"{address}:{settings.ranker.port if port is None else port}")
    await server.start()
    for service in ("", RANKER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningRanker(server, bound, health_servicer, owned)


async def stop_server(ranker: RunningRanker, grace: float) -> None:
    """Report NOT_SERVING, let calls in flight finish for up to `grace` seconds, then stop."""
    await ranker.health.enter_graceful_shutdown()
    await ranker.server.stop(grace)
    if ranker.executor is not None:
        ranker.executor.shutdown(wait=False, cancel_futures=True)
