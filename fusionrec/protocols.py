"""The evaluation protocols of ../shared/data/movielens-100k/README.md and their metrics, pure.

Splits take ratings and return history (streamed in first) and the test period; metrics take
rankings (item ids, best first) and the relevant items. Nothing here touches the stack, so the
evaluator and its unit tests share one definition of every figure.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

K = 20
POSITIVE_MIN = 4.0  # a rating of 4 or 5 is a positive (README: implicit feedback)
TEST_FRACTION = 0.2
COLD_FRACTION = 0.2


@dataclass(frozen=True)
class Rating:
    user: str
    item: str
    value: float
    ts: float | None  # None: the data set has no timestamps (only protocol B applies)

    @property
    def positive(self) -> bool:
        return self.value >= POSITIVE_MIN


@dataclass
class Split:
    """History (streamed in first, time-ordered where timestamps exist) and the test period.

    `test` holds every rating of the test period in time order (protocol C replays them all);
    `positives` maps each test user to the items that count as hits.
    """

    name: str
    history: list[Rating]
    test: list[Rating]
    positives: dict[str, set[str]]
    cold_items: frozenset[str] = field(default_factory=frozenset)


def read_ratings(path: Path) -> list[Rating]:
    """`ratings.tsv`: user_id, item_id, rating[, timestamp], tab-separated, with a header."""
    out = []
    with path.open(encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows)
        timed = len(header) >= 4
        for row in rows:
            if row:
                ts = float(row[3]) if timed and len(row) > 3 and row[3] != "" else None
                out.append(Rating(row[0], row[1], float(row[2]), ts))
    return out


def has_timestamps(ratings: Sequence[Rating]) -> bool:
    return bool(ratings) and all(r.ts is not None for r in ratings)


def by_time(ratings: Iterable[Rating]) -> list[Rating]:
    """Stable sort by timestamp: ties keep file order, so splits are reproducible."""
    return sorted(ratings, key=lambda r: r.ts if r.ts is not None else 0.0)


def _positives(ratings: Iterable[Rating]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in ratings:
        if r.positive:
            out.setdefault(r.user, set()).add(r.item)
    return out


def protocol_a(ratings: Sequence[Rating]) -> Split:
    """Temporal: the last 20% of positives (globally by time) open the test period; every rating
    from the first of them on is test, everything before is history."""
    if not has_timestamps(ratings):
        raise ValueError("protocol A needs timestamps; this data set supports only protocol B")
    ordered = by_time(ratings)
    where = [i for i, r in enumerate(ordered) if r.positive]
    n_test = int(TEST_FRACTION * len(where))
    if n_test == 0:
        raise ValueError("too few positives for a test period")
    start = where[len(where) - n_test]
    test = ordered[start:]
    return Split("A", ordered[:start], test, _positives(test))


def cold_items(ratings: Sequence[Rating], seed: int = 0) -> frozenset[str]:
    """README: rng(0).choice over the ids (as integers, ascending) of items with a positive."""
    ids = sorted({int(r.item) for r in ratings if r.positive})
    chosen = np.random.default_rng(seed).choice(ids, int(COLD_FRACTION * len(ids)), replace=False)
    return frozenset(str(int(i)) for i in chosen)


def protocol_b(ratings: Sequence[Rating], seed: int = 0) -> Split:
    """Item cold-start: every interaction on a cold item leaves history; its positives are test."""
    cold = cold_items(ratings, seed)
    ordered = by_time(ratings) if has_timestamps(ratings) else list(ratings)
    history = [r for r in ordered if r.item not in cold]
    test = [r for r in ordered if r.item in cold]
    return Split("B", history, test, _positives(test), cold)


def history_users(split: Split, positive_only: bool = True) -> set[str]:
    return {r.user for r in split.history if r.positive or not positive_only}


# -- metrics ----------------------------------------------------------------------------------
def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int = K) -> float:
    """Hits in the top k over all relevant items (not over min(k, |relevant|))."""
    return sum(1 for i in ranked[:k] if i in relevant) / len(relevant) if relevant else 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int = K) -> float:
    """Binary-relevance NDCG: the ideal list puts min(k, |relevant|) hits on top."""
    dcg = sum(1.0 / math.log2(r + 2) for r, i in enumerate(ranked[:k]) if i in relevant)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def rr_at_k(ranked: Sequence[str], relevant: set[str], k: int = K) -> float:
    """Reciprocal rank of the first hit in the top k, else 0."""
    return next((1.0 / (r + 1) for r, i in enumerate(ranked[:k]) if i in relevant), 0.0)


def rank_of(ranked: Sequence[str], item: str, k: int = K) -> int | None:
    """1-based rank of `item` in the top k, or None."""
    head = list(ranked[:k])
    return head.index(item) + 1 if item in head else None


def score_users(
    rankings: Mapping[str, Sequence[str]],
    positives: Mapping[str, set[str]],
    keep: set[str] | None = None,
    k: int = K,
) -> dict[str, float]:
    """Recall, NDCG and MRR @k averaged over users with at least one relevant item (restricted
    to `keep` when given), with how many users and distinct items stand behind the figure."""
    rows = []
    items: set[str] = set()
    for user, rel in positives.items():
        rel = rel & keep if keep is not None else rel
        if not rel or user not in rankings:
            continue
        ranked = rankings[user]
        rows.append(
            (recall_at_k(ranked, rel, k), ndcg_at_k(ranked, rel, k), rr_at_k(ranked, rel, k))
        )
        items |= rel
    mean = np.mean(rows, axis=0) if rows else np.zeros(3)
    return {
        f"recall@{k}": float(mean[0]),
        f"ndcg@{k}": float(mean[1]),
        f"mrr@{k}": float(mean[2]),
        "users": len(rows),
        "items": len(items),
    }


def score_events(ranks: Sequence[int | None], k: int = K) -> dict[str, float]:
    """Prequential figures over single test positives: HitRate, NDCG, MRR @k from each rank."""
    n = len(ranks)
    if n == 0:
        return {f"hit@{k}": 0.0, f"ndcg@{k}": 0.0, f"mrr@{k}": 0.0, "events": 0}
    hit = sum(1 for r in ranks if r is not None and r <= k)
    ndcg = sum(1.0 / math.log2(r + 1) for r in ranks if r is not None and r <= k)
    mrr = sum(1.0 / r for r in ranks if r is not None and r <= k)
    return {f"hit@{k}": hit / n, f"ndcg@{k}": ndcg / n, f"mrr@{k}": mrr / n, "events": n}


def coverage(rankings: Iterable[Sequence[str]], catalog: set[str], k: int = K) -> float:
    """Share of `catalog` that appears in at least one top-k list."""
    shown = {i for ranked in rankings for i in ranked[:k]}
    return len(shown & catalog) / len(catalog) if catalog else 0.0


# -- buckets for the report's plots -----------------------------------------------------------
POPULARITY_EDGES = (0, 1, 11, 51, 151)  # positives in history: 0, 1-10, 11-50, 51-150, 151+
AGE_EDGES_DAYS = (0, 30, 90, 180)  # days since the item's first rating in history


def popularity_counts(history: Iterable[Rating]) -> Counter[str]:
    return Counter(r.item for r in history if r.positive)


def bucket(value: float, edges: Sequence[float]) -> str:
    """Label of the half-open bucket [edges[j], edges[j+1]) holding value; the last is open."""
    j = max(i for i, e in enumerate(edges) if value >= e) if value >= edges[0] else 0
    lo = edges[j]
    if j + 1 < len(edges):
        hi = edges[j + 1] - 1
        return f"{lo:g}" if hi == lo else f"{lo:g}-{hi:g}"
    return f"{lo:g}+"


def first_seen(history: Iterable[Rating]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in history:
        if r.ts is not None and (r.item not in out or r.ts < out[r.item]):
            out[r.item] = r.ts
    return out


def age_bucket(item: str, at: float | None, first: Mapping[str, float]) -> str:
    """Age of the item at test time, from its first rating in history; unseen ones are 'new'."""
    if at is None or item not in first:
        return "new"
    return bucket((at - first[item]) / 86_400.0, AGE_EDGES_DAYS) + " d"


def sample_indices(n: int, max_n: int | None, seed: int = 0) -> list[int]:
    """All of range(n), or a seeded uniform sample of max_n of them, kept in order."""
    if max_n is None or max_n >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, max_n, replace=False).tolist())
