"""Late fusion as pure numpy functions: the ranker and the offline evaluator both score with these.

Everything is keyed by modality ("text", "image", "audio"), never by vector name, and
vectorised over all n candidates at once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from streams.profiles import add_co

# Contribution keys of the priors, beside the modality names.
POPULARITY = "popularity"
RECENCY = "recency"
CO_ENGAGEMENT = "co_engagement"
# Tag affinity takes part in `fuse` as one more modality under this key.
TAGS = "tags"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1; zero rows stay zero (and are treated as absent by `fuse`)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def fuse(
    user: Mapping[str, np.ndarray],
    items: Mapping[str, np.ndarray],
    present: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted mean of per-modality cosine similarities, over the modalities both sides have.

    user[m]: (d,) query vector, any length (profiles are unnormalised); a zero vector counts as
    absent. items[m]: (n, d) candidate vectors; present[m]: (n,) bool, False where the candidate
    lacks modality m (its row is ignored). A modality missing on either side is left out of that
    candidate's mean rather than counted as similarity 0, so scores stay in [-1, 1] and do not
    change when all weights are scaled. A candidate sharing no weighted modality with the user
    scores 0 (no evidence either way). Returns (scores (n,), contributions per modality (n,)),
    where the contributions sum to the scores. Users may come stacked, user[m] (u, d) with zero
    rows where a user lacks m; the results are then (u, n), row by row what each alone gets.
    """
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"modality weights must be >= 0, got {dict(weights)}")
    n = _count(items, present)
    lead = {np.shape(u)[:-1] for u in user.values()}
    if len(lead) > 1:
        raise ValueError(f"user vectors disagree on the number of users: {lead}")
    shape = (*(lead.pop() if lead else ()), n)
    # Dividing by the largest weight keeps tiny (even subnormal) weights from underflowing.
    top = max(weights.values(), default=0.0)
    total = np.zeros(shape)
    parts: dict[str, np.ndarray] = {}
    for m, u in user.items():
        w = float(weights.get(m, 0.0)) / top if top > 0 else 0.0
        if w == 0.0 or m not in items:
            continue
        u_hat = _unit_rows(np.asarray(u, dtype=np.float64))
        user_has = np.linalg.norm(u_hat, axis=-1, keepdims=True) > 0
        if not user_has.any():
            continue
        # Candidates keep their own precision (float32 from the store): the cosine is their
        # dot with the unit user vector over their norms, so no (n, d) array is copied.
        vecs = np.asarray(items[m])
        if vecs.dtype != np.float32:
            vecs = vecs.astype(np.float64, copy=False)
        norms = np.linalg.norm(vecs, axis=-1)
        cosines = np.divide(
            u_hat.astype(vecs.dtype) @ vecs.T, norms, out=np.zeros(shape), where=norms > 0
        )
        has = np.asarray(present[m], dtype=bool) & (norms > 0) & user_has
        parts[m] = np.where(has, w * cosines, 0.0)
        total += np.where(has, w, 0.0)
    covered = total > 0
    contributions = {
        m: np.divide(p, total, out=np.zeros(shape), where=covered) for m, p in parts.items()
    }
    scores = np.sum(list(contributions.values()), axis=0) if contributions else np.zeros(shape)
    return scores, contributions


def _count(items: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray]) -> int:
    sizes = {len(v) for v in items.values()} | {len(v) for v in present.values()}
    if len(sizes) > 1:
        raise ValueError(f"items and present disagree on the number of candidates: {sizes}")
    return sizes.pop() if sizes else 0


def tag_vectors(
    affinity: Mapping[str, float],
    item_tags: Sequence[Sequence[str]],
    vocabulary: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tags as a modality for `fuse`: (user (k+1,), items (n, k+1), present (n,)).

    The columns are the user's tags (or a given `vocabulary`, the same for many users) plus one
    that holds the weight of each item's other tags, so the cosine `fuse` takes is the one over
    all tags, not over the user's alone. An item with k tags is the unit vector with 1/sqrt(k)
    on each.
    """
    words = [t for t, v in affinity.items() if v] if vocabulary is None else vocabulary
    vocab = {tag: j for j, tag in enumerate(words)}
    user = np.zeros(len(vocab) + 1)
    for tag, j in vocab.items():
        user[j] = affinity.get(tag, 0.0)
    items = np.zeros((len(item_tags), len(vocab) + 1))
    present = np.zeros(len(item_tags), dtype=bool)
    # Gathered and written at once: element by element, this was most of its time.
    rows: list[int] = []
    columns: list[int] = []
    values: list[float] = []
    for i, tags in enumerate(item_tags):
        unique = set(tags)
        if not unique:
            continue
        present[i] = True
        share = 1.0 / math.sqrt(len(unique))
        known = [vocab[t] for t in unique if t in vocab]
        rows += [i] * (len(known) + 1)
        columns += [*known, len(vocab)]
        values += [share] * len(known) + [share * math.sqrt(len(unique) - len(known))]
    items[rows, columns] = values
    return user, items, present


def count_prior(counts: np.ndarray) -> np.ndarray:
    """log1p(count) scaled to [0, 1] by the largest among the candidates; 0 when none has any."""
    logs = np.log1p(np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64)), 0.0, None))
    top = logs.max(initial=0.0)
    return logs / top if top > 0 else np.zeros_like(logs)


def popularity_prior(
    popularity: np.ndarray, at: np.ndarray | None = None, half_life_s: float = np.inf
) -> np.ndarray:
    """`count_prior` of the popularity, each first decayed from its time `at` to the newest of
    those times: candidates compare as of one moment (the latest activity among them), so the
    answer does not depend on the ranker's clock.
    """
    pop = np.clip(np.nan_to_num(np.asarray(popularity, dtype=np.float64)), 0.0, None)
    if at is not None and np.isfinite(half_life_s) and pop.any():
        t = np.nan_to_num(np.asarray(at, dtype=np.float64))
        pop = pop * np.exp2(-(t[pop > 0].max() - t) / half_life_s)
    return count_prior(pop)


def session_gate(last_positive_at: float, now: float, half_life_s: float) -> float:
    """0.5 ** (time since the user's last positive / half-life): co-engagement predicts what a
    user engages next while a session lasts, and only distracts from the profile after it."""
    return float(np.exp2(-max(now - last_positive_at, 0.0) / half_life_s))


def co_counts(neighbours: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Co-engagement with a few recent items: the sum of their counts per partner item."""
    return functools.reduce(add_co, neighbours, {})


def recency_prior(created_at: np.ndarray, now: float, half_life_s: float) -> np.ndarray:
    """0.5 ** (age / half_life) in (0, 1]; future timestamps count as new, unknown (NaN) as 0."""
    if half_life_s <= 0:
        raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
    created = np.asarray(created_at, dtype=np.float64)
    age = np.clip(now - created, 0.0, None)
    return np.where(np.isnan(created), 0.0, np.exp2(-age / half_life_s))


def add_priors(
    scores: np.ndarray,
    contributions: Mapping[str, np.ndarray],
    priors: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Add each prior (e.g. POPULARITY, RECENCY), times its weight, to scores and contributions."""
    out = dict(contributions)
    total = np.asarray(scores, dtype=np.float64).copy()
    for name, prior in priors.items():
        out[name] = float(weights.get(name, 0.0)) * np.asarray(prior, dtype=np.float64)
        total += out[name]
    return total, out


def top_k(scores: np.ndarray, ids: list[str], k: int) -> list[int]:
    """Indices of the k best scores, ties broken by id so answers are reproducible."""
    return sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
