"""Prometheus metrics of every role, and the HTTP endpoint that exposes them.

Our own endpoint (prometheus_client's thread), not Faust's web server: the app runs with
web_enabled=False, where services registered with app.web_server never start.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from fusionrec.settings import MetricsSettings

log = logging.getLogger(__name__)

# Seconds; from a fast batch on a small catalog to the brute-force search of local mode.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CONSUMER_LAG = Gauge(
    "fusionrec_consumer_lag",
    "Messages behind the partition's high watermark after the last batch",
    ["topic", "partition"],
)
ITEMS_ENCODED = Counter("fusionrec_items_encoded", "Items encoded and written to the store")
EVENTS_ACCEPTED = Counter(
    "fusionrec_events_accepted",
    "Events taken into a profile (applied, or held for their item); replays of an event_id not",
)
DEAD_LETTERS = Counter(
    "fusionrec_dead_letters", "Messages sent to the dead-letters topic", ["reason"]
)
ENCODE_SECONDS = Histogram(
    "fusionrec_encode_seconds", "Time to encode one batch of items", buckets=_LATENCY
)
FRESHNESS_SECONDS = Histogram(
    "fusionrec_freshness_seconds",
    "From an item's created_at to its upsert into the store",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
RANK_SECONDS = Histogram(
    "fusionrec_rank_seconds", "Ranker call latency, admitted calls", ["method"], buckets=_LATENCY
)
RANKER_CALLS = Counter("fusionrec_ranker_calls", "Ranker calls by outcome", ["method", "code"])
RANKER_IN_FLIGHT = Gauge("fusionrec_ranker_in_flight", "Ranker calls admitted and not finished")

# Dead-letter reasons are free text with details; the label takes one of these kinds.
INVALID, TOO_LARGE, ENCODE_FAILED, PROCESSING_FAILED, HELD_TOO_LONG = (
    "invalid_record",
    "too_large",
    "encode_failed",
    "processing_failed",
    "held_too_long",
)

_started: tuple[str, int] | None = None
_lock = threading.Lock()


def serve(settings: MetricsSettings) -> None:
    """Start the endpoint when settings.port is set; once per process (the embedded stack's
    worker and ranker share one registry, so one endpoint shows both)."""
    global _started
    if settings.port is None:
        return
    with _lock:
        if _started is None:
            start_http_server(settings.port, addr=settings.host)
            _started = (settings.host, settings.port)
            log.info("metrics on http://%s:%s/metrics", settings.host, settings.port)
        elif _started != (settings.host, settings.port):
            log.warning("metrics already served on %s:%s", *_started)
