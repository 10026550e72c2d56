"""Process launchers: the embedded stack (`up`), a stream worker, a standalone ranker."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import mode
from threadpoolctl import threadpool_limits

from encoders.registry import build_encoders
from fusionrec import store
from fusionrec.broker import EmbeddedBroker, listening
from fusionrec.kafka_auth import kafka_python_options
from fusionrec.loop import Backlog
from fusionrec.settings import KafkaSettings, Settings
from serving.server import start_server, stop_server
from streams.app import create_app
from streams.deadletters import SentLetters

log = logging.getLogger(__name__)


class RankerService(mode.Service):
    """The gRPC ranker as a service of the Faust worker: it binds to the worker's loop and
    shares its Qdrant client (local mode allows one client per data directory)."""

    def __init__(self, settings: Settings, client: Any, worker: Backlog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.client = client
        self.worker = worker
        self.server: Any = None

    async def on_start(self) -> None:
        self.server = await start_server(self.settings, self.client, worker=self.worker)
        log.info("ranker listening on %s:%s", self.settings.ranker.host, self.server.port)

    async def on_stop(self) -> None:
        if self.server is not None:
            await stop_server(self.server, grace=2.0)


class BrokerLossGuard(mode.Service):
    """Tansu (the embedded broker) keeps everything in memory: restarted, it has lost its topics,
    our consumer group and its committed offsets, and a client sees only a reconnect. Faust and
    aiokafka rejoin and go on, but now and then (2 restarts in 14 under CPU load here) the
    messages published meanwhile were never processed: records fetched while the group rejoins
    are dropped, and the seek back to "committed" leaves a partition that has no committed
    offset past them. And a commit pending at the restart can land on the new broker: an offset
    into a log that no longer exists. So the worker checks every `interval` for a marker topic
    of its own; gone means the broker restarted: the marker and the dead-letters topic are
    declared again, and once the group has rejoined every assigned partition is read again from
    its start (sinks are idempotent: the replay applies nothing twice)."""

    # A rebalance soon after the first (a rejoin in two steps) could drop records the same way.
    rewind_window_s = 30.0

    def __init__(
        self,
        app: faust.App,
        kafka: KafkaSettings,
        sent: SentLetters,
        interval: float = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.app = app
        self.kafka = kafka
        self.sent = sent
        self.interval = interval
        self.marker = f"fusionrec-alive-{uuid.uuid4().hex[:12]}"
        self._admin: Any = None
        # The admin client blocks: its own thread, so a slow call holds nothing else up.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="broker-guard")

    def _marker_present(self) -> bool | None:
        """Whether the broker has our marker; None while it cannot be asked."""
        from kafka.admin import KafkaAdminClient

        try:
            if self._admin is None:
                if not any(listening(*address(b)) for b in self.kafka.bootstrap.split(",")):
                    # An admin client that cannot bootstrap leaves its IO thread behind: one a
                    # check (every few seconds) for as long as the broker is away.
                    return None
                # Short timeouts: while the broker is away each check gives up in seconds (by
                # default kafka-python tries for 30 s, backing off to 30 s between attempts).
                self._admin = KafkaAdminClient(
                    bootstrap_servers=self.kafka.bootstrap,
                    bootstrap_timeout_ms=3000,
                    request_timeout_ms=5000,
                    reconnect_backoff_max_ms=1000,
                    **kafka_python_options(self.kafka),
                )
            return self.marker in self._admin.list_topics()
        except Exception as exc:
            log.debug("broker not answering (%s)", exc)
            self._close_admin()
            return None

    def _declare(self) -> None:
        spec = {"replication_factor": 1}
        self._admin.create_topics(
            {
                self.marker: {**spec, "num_partitions": 1},
                # The worker declares it once, at start: a send that had to auto-create it
                # stalled on Tansu.
                self.kafka.dead_letters_topic: {**spec, "num_partitions": self.kafka.partitions},
            },
            raise_errors=False,  # already there: someone was first
        )

    def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()

    @mode.Service.task
    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        seen_at: int | None = None  # the app's rebalance count when the marker was last seen
        rewind_after: int | None = None
        rewind_until = 0.0
        while not self.should_stop:
            try:
                present = await loop.run_in_executor(self._pool, self._marker_present)
                if present is False:
                    if seen_at is not None:
                        log.warning(
                            "the broker restarted empty (memory only): its topics, our consumer "
                            "group and committed offsets are gone; every partition is read "
                            "again from its start once the group has rejoined"
                        )
                        rewind_after = seen_at
                        rewind_until = time.monotonic() + self.rewind_window_s
                        # The dead letters sent went with it: the re-read sends them again.
                        self.sent.forget()
                    await loop.run_in_executor(self._pool, self._declare)
                if present is not None:
                    seen_at = self.app.rebalancing_count
                if rewind_after is not None and time.monotonic() > rewind_until:
                    rewind_after = None
                if (
                    rewind_after is not None
                    and self.app.rebalancing_count > rewind_after
                    and not self.app.rebalancing
                ):
                    assigned = self.app.consumer.assignment()
                    await self.app.consumer.seek_wait({tp: 0 for tp in assigned})
                    log.warning("re-reading %d partitions from their start", len(assigned))
                    rewind_after = self.app.rebalancing_count
            except Exception:
                log.exception("broker loss guard")
            await self.sleep(self.interval)

    async def on_stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close_admin)
        self._pool.shutdown(wait=False)


def address(server: str) -> tuple[str, int]:
    """("host", port) from "host:port" (or "[v6]:port")."""
    host, _, port = server.strip().rpartition(":")
    return host.strip("[]"), int(port)


# Past worker.stop_deadline_s from the stop signal (SIGTERM, SIGINT), whatever still waits (a
# Kafka client on a broker that is gone, a thread that does not end), the process exits hard,
# with EXIT_OVERDUE. Nothing committed is lost: Qdrant commits each batch's writes before its
# offsets can be (SQLite WAL), offsets not yet committed only mean a replay, which the idempotent
# sinks absorb, and an embedded broker dies with the process (memory only: its messages were
# going anyway).
EXIT_OVERDUE = 70  # EX_SOFTWARE


class BoundedWorker(faust.Worker):
    """A Faust worker whose stop, once signalled, takes at most `stop_deadline_s`."""

    def __init__(self, *services: Any, stop_deadline_s: float, **kwargs: Any) -> None:
        super().__init__(*services, **kwargs)
        self.stop_deadline_s = stop_deadline_s

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if not self._signal_stop_time:
            exit_after(self.stop_deadline_s)
        super()._schedule_shutdown(signal)


def exit_after(seconds: float) -> None:
    """Exit the process hard in `seconds` unless it has ended by then (a daemon timer)."""

    def overdue() -> None:
        log.error(
            "still stopping %.0f s after the stop signal: exiting now; what still ran:", seconds
        )
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_OVERDUE)

    timer = threading.Timer(seconds, overdue)
    timer.name = "stop-deadline"
    timer.daemon = True
    timer.start()


def stopping_cannot_hang(final_commit_s: float) -> None:
    """Two ways Faust's stop waited for a broker that was gone, forever (seen: SIGTERM with the
    broker SIGKILLed never exited). Its last offset commit: now given up after `final_commit_s`
    (what was processed is in the store already; the messages since the last commit are read
    again on the next start, into idempotent sinks, so nothing is lost or applied twice). And
    aiokafka's consumer.stop() raising CancelledError (its fetcher awaits a fetch it has just
    cancelled; aio-libs/aiokafka#647 is of the same kind), which in Faust's consumer thread
    skips mode's "thread has shut down" signal, so the worker waited for that thread (now a log
    line: what the stop had left to close are sockets to a broker not there)."""
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    wait_empty = Consumer.wait_empty
    stop = AIOKafkaConsumerThread.on_thread_stop
    if getattr(stop, "cannot_hang", False):
        return

    async def bounded_wait_empty(self: Consumer) -> None:
        if not self.app.should_stop:  # a rebalance: Faust's own wait, unchanged
            await wait_empty(self)
            return
        try:
            await asyncio.wait_for(wait_empty(self), final_commit_s)
        except TimeoutError:
            log.warning(
                "stopping: the last offset commit did not finish in %.0f s (broker away?); "
                "messages since the previous one will be read again (idempotent)",
                final_commit_s,
            )

    async def on_thread_stop(self: AIOKafkaConsumerThread) -> None:
        try:
            await stop(self)
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("the Kafka consumer did not stop cleanly (%r); going on", exc)

    on_thread_stop.cannot_hang = True  # type: ignore[attr-defined]
    Consumer.wait_empty = bounded_wait_empty  # type: ignore[method-assign]
    AIOKafkaConsumerThread.on_thread_stop = on_thread_stop  # type: ignore[method-assign]


# Collect the young generation every 10k allocations, not 700: at 700 the objects of the call in
# flight were promoted at each collection, and a full collection (30-40 ms at 10k items) came
# every ~3 s of Recommend calls back to back, hitting ~1% of them. In 25 s of such calls the
# collections took 730 ms before, 100-215 ms after (none full; pauses up to 7 ms, 16 ms gen1).
GC_THRESHOLDS = (10_000, 20, 100)


def settle(blas_threads: int) -> None:
    """After start-up: freeze what loading made (a full collection over the torch heap froze the
    loop ~350 ms) and collect less often (GC_THRESHOLDS); and cap the BLAS threads.

    A long-running role's parallelism is its own threads (the encoder, the loop, the ranker's
    executor). OpenBLAS's extra thread spins for a while after each call it takes part in
    (local mode scores with numpy): 10k x 1280 products every 20 ms took 2.4 s of CPU a second
    with 2 threads, 0.3 s with 1, each product 1.6-2.1 ms against 3.0 ms. In the embedded stack
    onboarding items the spinning thread used nearly as much CPU as the encoder; with one,
    freshness at 50 items/s went from p99 1.5-2.8 s to 0.9-1.7 s (alternating runs). Libraries
    loaded later keep their own default."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    threadpool_limits(blas_threads, user_api="blas")


def run_worker(settings: Settings, *, serve: bool) -> None:
    """Run the stream worker (with the ranker in-process when `serve`) until SIGINT/SIGTERM."""
    client = store.connect(settings)
    encoders = build_encoders(
        settings.encoders,
        max_image_pixels=settings.media.max_image_pixels,
        max_audio_seconds=settings.media.max_audio_seconds,
    )
    store.ensure_collections(client, settings, {e.vector_name: e.dim for e in encoders.values()})
    store.fast_local_commits(client)
    settle(settings.blas_threads)
    # When the worker last had a backlog: an in-process ranker then leaves it half the loop.
    backlog = Backlog()
    sent_letters = SentLetters()  # shared with BrokerLossGuard, which may empty it
    app = create_app(settings, client, encoders, backlog, sent_letters)
    services: list[mode.Service] = [RankerService(settings, client, backlog)] if serve else []
    if settings.kafka.embedded:
        services.append(BrokerLossGuard(app, settings.kafka, sent_letters))
    # Logging is the CLI's (fusionrec.logs: format, masked secrets); Faust must not replace it.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RetryNoise())
    stopping_cannot_hang(settings.worker.final_commit_s)
    worker = BoundedWorker(
        app,
        *services,
        stop_deadline_s=settings.worker.stop_deadline_s,
        loglevel=settings.log_level,
        override_logging=False,
    )
    with contextlib.suppress(SystemExit):
        worker.execute_from_commandline()
    client.close()


class RetryNoise(logging.Filter):
    """While the broker is away, aiokafka retries every 100 ms and logs each failure (about 75
    lines a second here), which buries every other line: let one warning or error of the Kafka
    clients (aiokafka, kafka-python) through per logger and message template every `window`
    seconds, saying how many were held back."""

    def __init__(self, window: float = 30.0) -> None:
        super().__init__()
        self.window = window
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()  # Faust's consumer logs from its own thread

    def filter(self, record: logging.LogRecord) -> bool:
        client = record.name.split(".", 1)[0] in ("aiokafka", "kafka")
        if not client or record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        with self._lock:
            shown, held = self._last.get(key, (-math.inf, 0))
            if record.created - shown < self.window:
                self._last[key] = (shown, held + 1)
                return False
            self._last[key] = (record.created, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it not shown)"
            record.args = ()
        return True


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
        # reconnects, and its BrokerLossGuard sees the broker came back empty.
        broker.supervise()
        run_worker(settings.model_copy(update={"kafka": embedded}), serve=True)


def serve(settings: Settings) -> None:
    """A standalone ranker for the distributed topology (stateless; point it at a Qdrant server)."""

    async def main() -> None:
        client = store.connect(settings)
        settle(settings.blas_threads)
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
