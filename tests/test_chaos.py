"""At-least-once without duplicates in effect, with real processes and a real SIGKILL.

benchmarks/chaos.py at a small size: a Tansu broker that outlives the worker, `fusionrec up
--kafka` SIGKILLed (its process group) three times at seeded random moments mid-consumption
while 200 text-only items and 1,000 events stream in, restarted on the same data directory;
then the Qdrant store is read back and every item and event accounted for (see that module).
40 users, ~25 events each: far below profiles.dedupe_window (2000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos import run_chaos


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root: Path = tmp_path_factory.mktemp("chaos")
    return run_chaos(root, n_items=200, n_events=1000, kills=3, n_users=40, seed=1, span_s=30)


def test_kills_landed_mid_stream(chaos: dict[str, Any]) -> None:
    assert chaos["kills"] == 3
    # Each kill came after that life's first batch; at least one with work still queued.
    assert any(k["publishing"] or (k["lag"] or 0) > 0 for k in chaos["kill_log"]), chaos


def test_every_item_stored_once(chaos: dict[str, Any]) -> None:
    assert chaos["items_in_store"] == chaos["items_published"] == 200
    assert chaos["items_missing"] == 0
    assert chaos["duplicate_points"] == 0
    assert chaos["points"] == 201  # and the drain marker


def test_every_event_applied_once_in_effect(chaos: dict[str, Any]) -> None:
    assert chaos["events_published"] == 1000
    assert chaos["events_applied"] == 1000, chaos
    assert chaos["events_applied_twice"] == 0, chaos
    assert chaos["events_lost"] == chaos["events_unexplained"] == 0, chaos
    assert chaos["events_still_held"] == 0, chaos
    assert chaos["event_ids_remembered_twice"] == 0, chaos
    assert chaos["users_profile_mismatch"] == 0, chaos


def test_popularity_counted_exactly_once(chaos: dict[str, Any]) -> None:
    # A batch's popularity is saved with its profiles as a debt, then delivered under a token
    # the items remember (Users._commit): a kill anywhere neither loses nor doubles it.
    assert chaos["popularity_extra"] == 0, chaos
    assert chaos["items_popularity_mismatch"] == 0, chaos


def test_co_engagement_counted_exactly_once(chaos: dict[str, Any]) -> None:
    # Delivered with the popularity, under the same token.
    assert chaos["co_engagement_expected"] > 0
    assert chaos["co_engagement_stored"] == chaos["co_engagement_expected"], chaos
    assert chaos["co_engagement_asymmetric"] == 0, chaos
