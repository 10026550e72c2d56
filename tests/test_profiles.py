"""Profile arithmetic: pure functions over numpy arrays."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusionrec.settings import ProfileSettings
from streams.profiles import (
    DAY_S,
    Profile,
    accumulate,
    add_co,
    co_engage,
    decay,
    event_weight,
    fold,
    fold_tags,
    normalised,
    trend,
)

CFG = ProfileSettings()
HL = 10 * DAY_S


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_event_weights_signed_by_type_and_rating():
    assert event_weight("purchase", None, CFG) > event_weight("like", None, CFG) > 0
    assert event_weight("dislike", None, CFG) < 0 and event_weight("skip", None, CFG) < 0
    assert event_weight("rating", 5, CFG) == 1.0
    assert event_weight("rating", 4, CFG) == 0.5
    assert event_weight("rating", 3, CFG) == 0.0
    assert event_weight("rating", 1, CFG) == -1.0


def test_decay_halves_each_half_life():
    assert decay(0, HL) == 1.0
    assert decay(HL, HL) == pytest.approx(0.5)
    assert decay(3 * HL, HL) == pytest.approx(0.125)
    assert decay(-5, HL) == 1.0  # no growth from clock skew


def test_fold_moves_towards_liked_and_away_from_disliked():
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    v, t = fold({}, 0.0, {"text.m": a}, 1.0, 100.0, HL)
    assert t == 100.0
    v, t = fold(v, t, {"text.m": b}, -1.0, 200.0, HL)
    taste = normalised(v)["text.m"]
    assert taste @ a > 0 > taste @ b


def test_fold_only_touches_modalities_the_item_has():
    v, _t = fold({"image.m": unit(1, 0)}, 0.0, {"text.m": unit(0, 1, 0)}, 1.0, 0.0, HL)
    assert set(v) == {"image.m", "text.m"}
    np.testing.assert_allclose(v["image.m"], unit(1, 0))


def test_older_evidence_counts_less():
    a, b = unit(1, 0), unit(0, 1)
    v, t = fold({}, 0.0, {"x": a}, 1.0, 0.0, HL)
    v, t = fold(v, t, {"x": b}, 1.0, HL, HL)  # b one half-life later
    np.testing.assert_allclose(v["x"], 0.5 * a + b, rtol=1e-6)


@given(st.permutations(range(5)))
def test_fold_result_does_not_depend_on_arrival_order(order):
    rng = np.random.default_rng(0)
    items = [rng.normal(size=4).astype(np.float32) for _ in range(5)]
    times = [0.0, 3 * DAY_S, 1 * DAY_S, 10 * DAY_S, 7 * DAY_S]
    weights = [1.0, -0.5, 2.0, 0.3, 1.0]

    def run(seq):
        v, t = {}, 0.0
        for i in seq:
            v, t = fold(v, t, {"x": items[i]}, weights[i], times[i], HL)
        return v["x"], t

    base, t0 = run(range(5))
    got, t1 = run(order)
    assert t0 == t1
    np.testing.assert_allclose(got, base, rtol=1e-4, atol=1e-5)


def test_normalised_drops_cancelled_evidence():
    a = unit(1, 1)
    v, t = fold({}, 0.0, {"x": a}, 1.0, 0.0, HL)
    v, t = fold(v, t, {"x": a}, -1.0, 0.0, HL)
    assert normalised(v) == {}


def test_profile_remembers_bounded_and_dedupes():
    cfg = ProfileSettings(seen_cap=3, dedupe_window=2)
    p = Profile("u")
    for i in range(5):
        p.remember(f"e{i}", f"i{i}", cfg)
    assert p.seen == ["i2", "i3", "i4"]
    assert p.already_applied("e4") and not p.already_applied("e0")
    p.remember("e5", "i2", cfg)
    assert p.seen == ["i3", "i4", "i2"]  # re-seen moves to most recent


@given(
    st.lists(st.tuples(st.floats(0.1, 2.0), st.floats(0, 100 * DAY_S)), min_size=1, max_size=8),
    st.lists(st.tuples(st.floats(0.1, 2.0), st.floats(0, 100 * DAY_S)), min_size=1, max_size=8),
)
def test_popularity_trend_orders_as_decayed_popularity(a, b) -> None:
    """Popularity accumulates as profiles do (order-free); its trend key orders two items as
    their popularity decayed to one common time does, whatever that time."""
    items = []
    for events in (a, b):
        value, at = 0.0, 0.0
        for w, t in events:
            value, at = accumulate(value, at, w, t, HL)
        shuffled = (0.0, 0.0)
        for w, t in reversed(events):
            shuffled = accumulate(*shuffled, w, t, HL)
        assert shuffled == pytest.approx((value, at), rel=1e-9)
        items.append((value, at))
    t_common = 200 * DAY_S
    now = [v * decay(t_common - at, HL) for v, at in items]
    keys = [trend(v, at, HL) for v, at in items]
    if abs(now[0] - now[1]) > 1e-9 * max(now):
        assert (now[0] > now[1]) == (keys[0] > keys[1])
    assert trend(0.0, 5.0, HL) is None


@given(
    st.lists(
        st.tuples(
            st.sets(st.sampled_from(["a", "b", "c", "d"]), max_size=3),
            st.floats(-1.0, 2.0),
            st.floats(0, 100 * DAY_S),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_tag_affinity_folds_like_the_vectors(events) -> None:
    """Order-free like `fold`, and each item's tags count as one unit vector."""

    def run(seq):
        tags, t_ref = {}, 0.0
        for item_tags, w, t in seq:
            tags = fold_tags(tags, t_ref, item_tags, w, t, HL, cap=10)
            _, t_ref = fold({}, t_ref, {}, w, t, HL)
        return tags

    forward, backward = run(events), run(list(reversed(events)))
    assert forward.keys() == backward.keys()
    for tag in forward:
        assert forward[tag] == pytest.approx(backward[tag], rel=1e-6, abs=1e-9)


def test_tag_affinity_keeps_the_strongest_tags() -> None:
    tags = fold_tags({}, 0.0, ["x", "y", "z", "w"], 1.0, 0.0, HL, cap=10)
    assert tags == pytest.approx({t: 0.5 for t in "xyzw"})
    tags = fold_tags(tags, 0.0, ["x"], 1.0, 0.0, HL, cap=2)
    assert len(tags) == 2 and tags["x"] == 1.5


def test_co_engage_pairs_a_positive_with_the_previous_ones_in_the_window() -> None:
    positives: list[str] = []
    assert co_engage(positives, "a", 3) == []
    assert co_engage(positives, "b", 3) == ["a"]
    assert co_engage(positives, "c", 3) == ["a", "b"]
    assert co_engage(positives, "d", 3) == ["a", "b", "c"]
    assert positives == ["b", "c", "d"]
    assert co_engage(positives, "c", 3) == ["b", "d"]  # again: not paired with itself
    assert positives == ["b", "d", "c"]


def test_add_co_sums_and_keeps_the_strongest() -> None:
    assert add_co({"a": 2.0, "b": 1.0}, {"b": 1, "c": 1}, cap=10) == {"a": 2, "b": 2, "c": 1}
    assert add_co({"a": 2.0, "b": 1.0}, {"c": 3}, cap=2) == {"c": 3, "a": 2}
