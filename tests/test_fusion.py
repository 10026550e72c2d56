"""Late fusion: examples, then properties over random users, candidates and weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.fusion import (
    POPULARITY,
    RECENCY,
    add_priors,
    fuse,
    popularity_prior,
    recency_prior,
    tag_vectors,
    top_k,
)

DIMS = {"text": 4, "image": 3, "audio": 2}


def test_both_modalities_weighted_mean() -> None:
    user = {"text": np.array([1.0, 0, 0, 0]), "image": np.array([0, 2.0, 0])}
    items = {"text": np.array([[1.0, 0, 0, 0]]), "image": np.array([[0, 0, 5.0]])}
    present = {"text": np.array([True]), "image": np.array([True])}
    scores, parts = fuse(user, items, present, {"text": 3.0, "image": 1.0})
    assert scores == pytest.approx([0.75])  # (3 * 1 + 1 * 0) / 4
    assert parts["text"] == pytest.approx([0.75])
    assert parts["image"] == pytest.approx([0.0])


def test_missing_modality_is_left_out_not_zero() -> None:
    user = {"text": np.array([1.0, 0, 0, 0]), "image": np.array([0, 1.0, 0])}
    items = {"text": np.array([[1.0, 0, 0, 0]] * 2), "image": np.array([[0, 1.0, 0], [0, 0, 0]])}
    present = {"text": np.array([True, True]), "image": np.array([True, False])}
    scores, parts = fuse(user, items, present, {"text": 1.0, "image": 1.0})
    assert scores == pytest.approx([1.0, 1.0])
    assert parts["image"][1] == 0.0 and parts["text"][1] == pytest.approx(1.0)


def test_zero_user_vector_and_unshared_modalities() -> None:
    user = {"text": np.zeros(4), "image": np.array([0, 1.0, 0])}
    items = {"text": np.ones((1, 4)), "image": np.zeros((1, 3))}
    present = {"text": np.array([True]), "image": np.array([False])}
    scores, parts = fuse(user, items, present, {"text": 1.0, "image": 1.0})
    assert scores == pytest.approx([0.0])
    assert set(parts) == {"image"}


def test_no_candidates_and_negative_weight() -> None:
    scores, parts = fuse({"text": np.ones(4)}, {"text": np.zeros((0, 4))}, {"text": []}, {})
    assert scores.shape == (0,) and parts == {}
    with pytest.raises(ValueError, match=">= 0"):
        fuse({}, {}, {}, {"text": -1.0})


def test_priors() -> None:
    assert popularity_prior(np.array([0.0, np.e - 1, -3.0])) == pytest.approx([0, 1, 0])
    assert popularity_prior(np.zeros(3)) == pytest.approx([0, 0, 0])
    # Decayed to the newest time among candidates: 4 as of t=0 is 1 as of t=20 (half-life 10),
    # level with the item that has 1 as of t=20; the ranker's clock plays no part.
    at = np.array([0.0, 20.0, 5.0])
    prior = popularity_prior(np.array([4.0, 1.0, 0.0]), at, half_life_s=10.0)
    assert prior == pytest.approx([1.0, 1.0, 0.0])
    assert popularity_prior(np.array([4.0, 1.0]), at[:2]) == pytest.approx(
        [1.0, np.log(2) / np.log(5)]
    )
    rec = recency_prior(np.array([100.0, 90.0, 200.0, np.nan]), now=100.0, half_life_s=10.0)
    assert rec == pytest.approx([1.0, 0.5, 1.0, 0.0])
    scores, parts = add_priors(
        np.array([0.5, 0.1]),
        {"text": np.array([0.5, 0.1])},
        {POPULARITY: np.array([0.0, 1.0]), RECENCY: np.array([1.0, 1.0])},
        {POPULARITY: 0.2, RECENCY: 0.1},
    )
    assert scores == pytest.approx([0.6, 0.4])
    assert sum(parts.values()) == pytest.approx(scores)


def test_top_k_breaks_ties_by_id() -> None:
    assert top_k(np.array([0.5, 0.9, 0.5]), ["b", "z", "a"], 2) == [1, 2]


# --- properties -------------------------------------------------------------------------------

floats = st.floats(-1.0, 1.0, allow_nan=False, width=32)


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict, dict, dict, dict]:
    n = draw(st.integers(1, 6))
    user, items, present, weights = {}, {}, {}, {}
    for m, d in DIMS.items():
        items[m] = np.array(
            draw(st.lists(st.lists(floats, min_size=d, max_size=d), min_size=n, max_size=n))
        )
        present[m] = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        # Off, or a weight a setting could hold: a subnormal one underflows to 0 when scaled.
        weights[m] = draw(st.one_of(st.just(0.0), st.floats(1e-6, 10.0)))
        if draw(st.booleans()):
            user[m] = np.array(draw(st.lists(floats, min_size=d, max_size=d)))
    return user, items, present, weights


@settings(max_examples=200, deadline=None)
@given(cases())
def test_scores_bounded_and_sum_of_contributions(case: tuple) -> None:
    scores, parts = fuse(*case)
    assert np.all(np.abs(scores) <= 1.0 + 1e-9)
    if parts:
        assert np.allclose(sum(parts.values()), scores)


@settings(max_examples=200, deadline=None)
@given(cases(), st.floats(1e-3, 1e3))
def test_weight_scale_invariance(case: tuple, c: float) -> None:
    user, items, present, weights = case
    scaled = {m: w * c for m, w in weights.items()}
    assert np.allclose(
        fuse(user, items, present, weights)[0], fuse(user, items, present, scaled)[0]
    )


@settings(max_examples=200, deadline=None)
@given(cases(), st.sampled_from(sorted(DIMS)))
def test_missing_modality_never_counts_as_zero(case: tuple, m: str) -> None:
    """A candidate lacking m scores exactly as if m did not exist at all."""
    user, items, present, weights = case
    present = {**present, m: np.zeros_like(present[m])}
    without = {k: v for k, v in items.items() if k != m}
    full = fuse(user, items, present, weights)[0]
    assert np.allclose(full, fuse(user, without, {k: present[k] for k in without}, weights)[0])


@settings(max_examples=200, deadline=None)
@given(cases(), st.sampled_from(sorted(DIMS)), st.floats(0.1, 10.0))
def test_more_weight_where_closer_raises_score(case: tuple, m: str, extra: float) -> None:
    """Raising w_m moves each score toward its similarity in m: up wherever m is above the mean."""
    user, items, present, weights = case
    before = fuse(user, items, present, weights)[0]
    after = fuse(user, items, present, {**weights, m: weights[m] + extra})[0]
    if m not in user or not np.any(user[m]):
        return
    sim_m = _cosine(items[m], user[m])
    has = present[m] & (np.linalg.norm(items[m], axis=1) > 0)
    closer = has & (sim_m > before + 1e-9)
    assert np.all(after[closer] >= before[closer] - 1e-9)
    assert np.all(after[~has] == pytest.approx(before[~has]))


def _cosine(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(u)
    return np.divide(x @ u, norms, out=np.zeros(len(x)), where=norms > 0)


def test_stacked_users_get_what_each_gets_alone() -> None:
    rng = np.random.default_rng(3)
    items = {"text": rng.normal(size=(7, 4)), "image": rng.normal(size=(7, 3))}
    present = {"text": np.ones(7, bool), "image": rng.random(7) < 0.6}
    users = [
        {"text": rng.normal(size=4), "image": rng.normal(size=3)},
        {"text": rng.normal(size=4)},  # no image profile
        {"image": rng.normal(size=3)},
    ]
    weights = {"text": 1.0, "image": 0.4}
    stacked = {m: np.stack([u.get(m, np.zeros(items[m].shape[1])) for u in users]) for m in items}
    scores, parts = fuse(stacked, items, present, weights)
    assert scores.shape == (3, 7)
    for row, user in enumerate(users):
        alone, alone_parts = fuse(user, items, present, weights)
        np.testing.assert_allclose(scores[row], alone, atol=1e-12)
        for m, p in alone_parts.items():
            np.testing.assert_allclose(parts[m][row], p, atol=1e-12)


def test_tag_vectors_give_the_cosine_over_all_tags() -> None:
    affinity = {"drama": 2.0, "war": 1.0, "zero": 0.0}
    item_tags = [["drama"], ["drama", "comedy"], ["comedy", "horror"], [], ["war", "drama"]]
    user, items, present = tag_vectors(affinity, item_tags)
    assert present.tolist() == [True, True, True, False, True]
    scores, _ = fuse({"tags": user}, {"tags": items}, {"tags": present}, {"tags": 1.0})
    norm = np.sqrt(5.0)
    want = [2 / norm, 2 / norm / np.sqrt(2), 0.0, 0.0, 3 / norm / np.sqrt(2)]
    np.testing.assert_allclose(scores, want, atol=1e-12)
    # A shared vocabulary (many users at once) gives the same cosines.
    shared = sorted({t for tags in item_tags for t in tags} | {"war"})
    user2, items2, _ = tag_vectors(affinity, item_tags, shared)
    again, _ = fuse({"tags": user2}, {"tags": items2}, {"tags": present}, {"tags": 1.0})
    np.testing.assert_allclose(again, want, atol=1e-12)
