"""Process launchers: the embedded stack (`up`), a stream worker, a standalone ranker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sqlite3
from typing import Any

import faust
import mode

from encoders.registry import build_encoders
from fusionrec import store
from fusionrec.broker import EmbeddedBroker
from fusionrec.settings import Settings
from serving.server import start_server, stop_server
from streams.app import create_app

log = logging.getLogger(__name__)


class RankerService(mode.Service):
    """The gRPC ranker as a service of the Faust worker: it binds to the worker's loop and
    shares its Qdrant client (local mode allows one client per data directory)."""

    def __init__(self, settings: Settings, client: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.client = client
        self.server: Any = None

    async def on_start(self) -> None:
        self.server = await start_server(self.settings, self.client)
        log.info("ranker listening on %s:%s", self.settings.ranker.host, self.server.port)

    async def on_stop(self) -> None:
        if self.server is not None:
            await stop_server(self.server, grace=2.0)


def run_worker(settings: Settings, *, serve: bool) -> None:
    """Run the stream worker (with the ranker in-process when `serve`) until SIGINT/SIGTERM."""
    client = store.connect(settings)
    encoders = build_encoders(
        settings.encoders,
        max_image_pixels=settings.media.max_image_pixels,
        max_audio_seconds=settings.media.max_audio_seconds,
    )
    store.ensure_collections(client, settings, {e.vector_name: e.dim for e in encoders.values()})
    fast_local_commits(client)
    # A full collection over the torch heap froze the loop ~350 ms: freeze what loading made.
    gc.collect()
    gc.freeze()
    app = create_app(settings, client, encoders)
    services = [RankerService(settings, client)] if serve else []
    # Logging is the CLI's (fusionrec.logs: format, masked secrets); Faust must not replace it.
    worker = faust.Worker(app, *services, loglevel=settings.log_level, override_logging=False)
    with contextlib.suppress(SystemExit):
        worker.execute_from_commandline()
    client.close()


def fast_local_commits(client: Any) -> None:
    """Qdrant local mode writes every point in its own SQLite transaction with an fsync: ~1.6 ms
    a point here, which held profile folding near 300 events/s. In WAL mode with
    synchronous=NORMAL (~0.35 ms a point) a commit still survives a crash of this process; only
    a power cut can lose the last ones, and the embedded broker loses its messages then anyway.
    Local mode has no setting for this, hence the reach into its connections; a server client
    has none and is left alone."""
    collections = getattr(getattr(client, "_client", None), "collections", None) or {}
    for collection in collections.values():
        connection = getattr(getattr(collection, "storage", None), "storage", None)
        if isinstance(connection, sqlite3.Connection):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")


def up(settings: Settings) -> None:
    """The embedded stack: broker (unless --kafka), worker and ranker in this one process."""
    if settings.kafka.bootstrap is not None:
        run_worker(settings, serve=True)
        return
    with EmbeddedBroker(port=settings.kafka.embedded_port) as broker:
        log.warning(
            "embedded broker on %s: memory only, messages are lost when it stops",
            broker.bootstrap,
        )
        embedded = settings.kafka.model_copy(
            update={"bootstrap": broker.bootstrap, "embedded": True}
        )
        # Should Tansu die (a kill, the OOM killer), bring it back on the same port: the worker
        # reconnects and rejoins (the broker comes back empty).
        broker.supervise()
        run_worker(settings.model_copy(update={"kafka": embedded}), serve=True)


def serve(settings: Settings) -> None:
    """A standalone ranker for the distributed topology (stateless; point it at a Qdrant server)."""

    async def main() -> None:
        client = store.connect(settings)
        server = await start_server(settings, client)
        log.info("ranker listening on %s:%s", settings.ranker.host, server.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await stop_server(server, grace=2.0)
        client.close()

    asyncio.run(main())
