"""Profile arithmetic as pure functions: the same in the worker, the ranker and the evaluator.

A profile keeps, per vector name, an unnormalised accumulator of item vectors weighted by event
type and decayed by age (half-life), referenced to one time `t_ref`. Its direction is the taste;
its length is how much recent evidence stands behind it. Negative events subtract, so the
profile turns away from what the user disliked or skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fusionrec.settings import ProfileSettings

DAY_S = 86_400.0


def event_weight(event_type: str, value: float | None, cfg: ProfileSettings) -> float:
    """Signed weight of one event: a rating's weight follows its value around the midpoint."""
    if event_type == "rating":
        return ((value if value is not None else cfg.rating_midpoint) - cfg.rating_midpoint) / (
            cfg.rating_scale
        )
    return cfg.event_weights.get(event_type, 0.0)


def decay(age_s: float, half_life_s: float) -> float:
    """0.5 ** (age / half-life); an infinite half-life never decays."""
    return math.pow(0.5, max(age_s, 0.0) / half_life_s)


def _aging(
    t_ref: float, weight: float, t_event: float, half_life_s: float
) -> tuple[float, float, float]:
    """(factor for what was there, weight to add, new reference time) for one decayed event.

    A newer event ages the accumulator to its time; an older one (late, out of order) is itself
    aged to the accumulator's time, so the result does not depend on arrival order.
    """
    if t_event >= t_ref:
        return decay(t_event - t_ref, half_life_s), weight, t_event
    return 1.0, weight * decay(t_ref - t_event, half_life_s), t_ref


def accumulate(
    value: float, t_ref: float, weight: float, t_event: float, half_life_s: float
) -> tuple[float, float]:
    """`fold` for one number: an item's popularity is its decayed sum of positive weights."""
    keep, add, t_new = _aging(t_ref, weight, t_event, half_life_s)
    return value * keep + add, t_new


def trend(value: float, t_ref: float, half_life_s: float) -> float | None:
    """A key that orders items by popularity decayed to any common time (None: no popularity):
    ln(value * 0.5 ** ((t - t_ref) / h)) = trend - t * ln 2 / h, the same shift for all."""
    if value <= 0:
        return None
    shift = t_ref * math.log(2) / half_life_s if math.isfinite(half_life_s) else 0.0
    return math.log(value) + shift


def fold(
    vectors: Mapping[str, np.ndarray],
    t_ref: float,
    item: Mapping[str, np.ndarray],
    weight: float,
    t_event: float,
    half_life_s: float,
) -> tuple[dict[str, np.ndarray], float]:
    """Add one weighted item to the accumulators, in the modalities the item has (the aging
    of `_aging`: independent of arrival order)."""
    keep, add, t_new = _aging(t_ref, weight, t_event, half_life_s)
    out = {name: v * keep for name, v in vectors.items()}
    for name, x in item.items():
        x = np.asarray(x, dtype=np.float32)
        out[name] = out[name] + add * x if name in out else add * x
    return {k: v.astype(np.float32, copy=False) for k, v in out.items()}, t_new


def fold_tags(
    affinity: Mapping[str, float],
    t_ref: float,
    item_tags: Iterable[str],
    weight: float,
    t_event: float,
    half_life_s: float,
    cap: int,
) -> dict[str, float]:
    """`fold` for the profile's tag affinity, the item's tags taken as one unit vector (each of
    k tags weighs 1/sqrt(k)); the `cap` strongest tags are kept. Call it before `fold`: both age
    from the profile's `t_ref` as it was."""
    keep, add, _ = _aging(t_ref, weight, t_event, half_life_s)
    out = {tag: v * keep for tag, v in affinity.items()}
    tags = set(item_tags)
    for tag in tags:
        out[tag] = out.get(tag, 0.0) + add / math.sqrt(len(tags))
    if len(out) > cap:
        out = dict(sorted(out.items(), key=lambda kv: -abs(kv[1]))[:cap])
    return out


def co_engage(positives: list[str], item_id: str, window: int) -> list[str]:
    """Record a positive on `item_id` in a user's recent positives (oldest first, at most
    `window`, in place); return the partners it is co-engaged with: the items before it there.

    Pairs come from one user's consecutive positives rather than from everything two users ever
    shared: "liked next" predicts the next positive far better (MovieLens, held-out replay).
    """
    partners = [k for k in positives[-window:] if k != item_id]
    if item_id in positives:
        positives.remove(item_id)
    positives.append(item_id)
    del positives[:-window]
    return partners


def count_co_engagement(
    co: dict[str, dict[str, float]],
    positives: list[str],
    item_id: str,
    window: int,
    cap: int | None = None,
) -> None:
    """Record a positive on `item_id` in `positives` (`co_engage`) and count it with each
    partner, both ways, in `co` ({item: {partner: count}}, in place; `cap` as in `add_co`)."""
    for partner in co_engage(positives, item_id, window):
        for a, b in ((item_id, partner), (partner, item_id)):
            co[a] = add_co(co.get(a, {}), {b: 1}, cap)


def add_co(
    co: Mapping[str, float], partners: Mapping[str, float], cap: int | None = None
) -> dict[str, float]:
    """Co-engagement counts with `partners` added; the `cap` strongest are kept (all: None)."""
    out = dict(co)
    for k, n in partners.items():
        out[k] = out.get(k, 0.0) + n
    if cap is not None and len(out) > cap:
        out = dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:cap])
    return out


def normalised(vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unit-length taste per vector name; a zero accumulator (evidence cancelled out) is dropped."""
    out = {}
    for name, v in vectors.items():
        n = float(np.linalg.norm(v))
        if n > 1e-9:
            out[name] = (v / n).astype(np.float32)
    return out


@dataclass
class Profile:
    """A user's state as the profile agent keeps it (and stores in the `users` collection)."""

    user_id: str
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    t_ref: float = 0.0
    # Affinity for item tags (categories, genres), folded like the vectors.
    tag_affinity: dict[str, float] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    # The latest positives, oldest first (`co_engage`): the ranker's co-engagement query.
    positives: list[str] = field(default_factory=list)
    positive_at: float = 0.0  # time of the latest positive event
    recent_event_ids: list[str] = field(default_factory=list)
    # Events whose item had not arrived yet ({"held_at", "event"}), applied when it does.
    pending: list[dict] = field(default_factory=list)
    updated_at: float = 0.0
    # Popularity this user's last batch owes its items ({"token", "gains": {item: [[w, t]]}}),
    # saved with the profile and cleared once delivered: a crash in between cannot lose it, and
    # the token keeps a second delivery from counting twice.
    outbox: dict | None = None

    def remember(self, event_id: str, item_id: str, cfg: ProfileSettings) -> None:
        """Record an accepted event (applied or held): its id for dedupe, its item as seen."""
        self.recent_event_ids.append(event_id)
        del self.recent_event_ids[: -cfg.dedupe_window]
        if item_id in self.seen:
            self.seen.remove(item_id)
        self.seen.append(item_id)
        del self.seen[: -cfg.seen_cap]

    def already_applied(self, event_id: str) -> bool:
        return event_id in self.recent_event_ids
