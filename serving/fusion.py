"""Late fusion as pure numpy functions: the ranker and the offline evaluator both score with these.

Everything is keyed by modality ("text", "image", "audio"), never by vector name, and
vectorised over all n candidates at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Contribution keys of the priors, beside the modality names.
POPULARITY = "popularity"
RECENCY = "recency"


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
    where the contributions sum to the scores.
    """
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"modality weights must be >= 0, got {dict(weights)}")
    n = _count(items, present)
    # Dividing by the largest weight keeps tiny (even subnormal) weights from underflowing.
    top = max(weights.values(), default=0.0)
    total = np.zeros(n)
    parts: dict[str, np.ndarray] = {}
    for m, u in user.items():
        w = float(weights.get(m, 0.0)) / top if top > 0 else 0.0
        if w == 0.0 or m not in items:
            continue
        u_hat = _unit_rows(np.asarray(u, dtype=np.float64))
        if not u_hat.any():
            continue
        vecs = np.asarray(items[m], dtype=np.float64)
        has = np.asarray(present[m], dtype=bool) & (np.linalg.norm(vecs, axis=1) > 0)
        parts[m] = np.where(has, w * (_unit_rows(vecs) @ u_hat), 0.0)
        total += np.where(has, w, 0.0)
    covered = total > 0
    contributions = {
        m: np.divide(p, total, out=np.zeros(n), where=covered) for m, p in parts.items()
    }
    scores = np.sum(list(contributions.values()), axis=0) if contributions else np.zeros(n)
    return scores, contributions


def _count(items: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray]) -> int:
    sizes = {len(v) for v in items.values()} | {len(v) for v in present.values()}
    if len(sizes) > 1:
        raise ValueError(f"items and present disagree on the number of candidates: {sizes}")
    return sizes.pop() if sizes else 0


def popularity_prior(
    popularity: np.ndarray, at: np.ndarray | None = None, half_life_s: float = np.inf
) -> np.ndarray:
    """log1p(popularity) scaled to [0, 1] by the most popular candidate; 0 when none has any.

    Each popularity is a decayed sum as of its time `at`: it is first decayed to the newest of
    those times, so candidates compare as of one moment (the latest activity among them) and
    the answer does not depend on the ranker's clock.
    """
    pop = np.clip(np.nan_to_num(np.asarray(popularity, dtype=np.float64)), 0.0, None)
    if at is not None and np.isfinite(half_life_s) and pop.any():
        t = np.nan_to_num(np.asarray(at, dtype=np.float64))
        pop = pop * np.exp2(-(t[pop > 0].max() - t) / half_life_s)
    logs = np.log1p(pop)
    top = logs.max(initial=0.0)
    return logs / top if top > 0 else np.zeros_like(logs)


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
