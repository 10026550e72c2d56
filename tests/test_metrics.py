"""The real stack's Prometheus endpoint, scraped as Prometheus would while items, a bad message,
events and ranker calls go through it."""

from __future__ import annotations

import time
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_the_stack_counts_what_goes_through_it(stack: Stack) -> None:
    before = scrape(stack.metrics_url)
    item = stack.item("city", f"metrics-{uuid.uuid4()}", title="Metered", description="A city.")
    stack.publisher.send_raw("items", b"k", b"{not json")
    stack.publisher.publish_all("items", [item])
    stack.wait("the item", lambda: stack.known(item["id"]))
    user = f"metered-{uuid.uuid4()}"
    event = {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "item_id": item["id"],
        "type": "like",
        "timestamp": time.time(),
    }
    stack.publisher.publish_all("events", [event, event])  # the replay is not counted
    stack.wait("the profile", lambda: not stack.client.recommend(user, 3).cold_start)

    def delta(name: str, **labels: str) -> float:
        return value(scrape(stack.metrics_url), name, **labels) - value(before, name, **labels)

    stack.wait(
        "the dead letter to be counted",
        lambda: delta("fusionrec_dead_letters_total", reason="invalid_record") >= 1,
        timeout=30,
    )
    assert delta("fusionrec_items_encoded_total") >= 1
    assert delta("fusionrec_events_accepted_total") == 1
    assert delta("fusionrec_encode_seconds_count") >= 1
    assert delta("fusionrec_freshness_seconds_count") >= 1
    # The item was created when the test made it, seconds ago, not at the epoch.
    assert (
        0
        < delta("fusionrec_freshness_seconds_sum")
        < 120 * delta("fusionrec_freshness_seconds_count")
    )
    assert delta("fusionrec_rank_seconds_count", method="Recommend") >= 1
    assert delta("fusionrec_ranker_calls_total", method="Recommend", code="OK") >= 1
    after = scrape(stack.metrics_url)
    assert ("fusionrec_consumer_lag", frozenset({("topic", "items"), ("partition", "0")})) in after
    assert value(after, "fusionrec_ranker_in_flight") == 0
