"""The ranker's weights fitted on history: on a held-out slice of it, never the test period.

The history is split again the way the test was split from the data (protocol A: its last 20%
of positives by time; protocol B: a fifth of its items held out cold), the first part is
replayed through the same pure functions the worker and the ranker use (streams.profiles for
profiles and decayed popularity, serving.fusion for scores), and a small grid is searched for
the best NDCG@20 on the held-out part: the popularity half-life, the popularity weight, the
image-to-text weight and the weight of the tag affinity. Recency is left as set: the ranker
measures an item's age by its own clock, which a replay of old data cannot share. The winner
is written as settings (`fusionrec fit`) or handed to the evaluator's stack; every row of the
grid is kept, as the ablation behind the choice.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusionrec import protocols as p
from fusionrec.settings import Settings
from serving import fusion
from streams.profiles import DAY_S, accumulate, event_weight, fold, fold_tags

HALF_LIVES_DAYS = (1.0, 3.0, 7.0, 14.0, 30.0, 90.0, math.inf)
POPULARITY_WEIGHTS = (0.0, 0.05, 0.3, 1.0, 3.0, 10.0)
IMAGE_TO_TEXT = (0.3, 1.0, 3.0)
TAG_WEIGHTS = (0.0, 0.5, 1.0, 3.0)


@dataclass
class Fit:
    """The chosen values (as settings sections), the held-out NDCG@20 behind them, every row."""

    protocol: str
    settings: dict[str, dict[str, Any]]
    ndcg: float
    default_ndcg: float
    best: dict[str, Any] = field(default_factory=dict)  # the chosen row of the grid
    rows: list[dict[str, Any]] = field(default_factory=list)
    validation_users: int = 0

    def ablation(self) -> list[tuple[str, float]]:
        """Held-out NDCG@20 with each fitted part taken away, the rest kept as fitted except the
        parts named as re-fitted (taking popularity away leaves its half-life meaningless)."""

        def without(part: str, value: float, refit: tuple[str, ...] = ()) -> float:
            kept = {k: v for k, v in self.best.items() if k not in (part, "ndcg@20", *refit)}
            rows = [
                r for r in self.rows if r[part] == value and all(r[k] == v for k, v in kept.items())
            ]
            return max((r["ndcg@20"] for r in rows), default=math.nan)

        return [
            ("settings as given (not fitted)", self.default_ndcg),
            ("fitted: all parts", self.ndcg),
            (
                "without trending popularity (all-time sum)",
                without("popularity_half_life_days", math.inf, refit=("popularity_weight",)),
            ),
            (
                "without popularity (weight 0)",
                without("popularity_weight", 0.0, refit=("popularity_half_life_days",)),
            ),
            ("without fitted modality weights (image = text)", without("image_to_text", 1.0)),
            (
                "without tag affinity (weight 0)",
                without("tag_weight", 0.0, refit=("image_to_text",)),
            ),
        ]

    def env(self) -> dict[str, str]:
        """The same as FUSIONREC_* variables, for a stack started as a child process."""
        out = {}
        for section, values in self.settings.items():
            for key, value in values.items():
                name = f"FUSIONREC_{section}__{key}".upper()
                out[name] = _json(value)
        return out

    def toml(self) -> str:
        lines = [
            "# fitted by `fusionrec fit` on a held-out slice of history "
            f"(protocol {self.protocol}):",
            f"# NDCG@20 {self.ndcg:.4f} on {self.validation_users} users, "
            f"against {self.default_ndcg:.4f} with the default settings",
        ]
        for section, values in self.settings.items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _json(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}": {_json(v)}' for k, v in value.items()) + "}"
    return "inf" if value == math.inf else repr(float(value))


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return "inf" if value == math.inf else repr(float(value))


def validation_split(history: Sequence[p.Rating], protocol: str, seed: int = 0) -> p.Split:
    """The history split as the test was split from the data."""
    return p.protocol_b(history, seed) if protocol == "B" else p.protocol_a(history)


def fit(
    history: Sequence[p.Rating],
    item_ids: list[str],
    vectors: dict[str, np.ndarray],
    present: dict[str, np.ndarray],
    settings: Settings,
    protocol: str = "A",
    seed: int = 0,
    item_tags: Sequence[Sequence[str]] | None = None,
) -> Fit:
    """Grid search on the held-out slice; ties go to the earlier (simpler) row of the grid."""
    item_tags = item_tags if item_tags is not None else [()] * len(item_ids)
    split = validation_split(history, protocol, seed)
    index = {i: j for j, i in enumerate(item_ids)}
    cfg = settings.profiles
    half_life_s = cfg.half_life_days * DAY_S
    profiles: dict[str, dict[str, np.ndarray]] = {}
    affinity: dict[str, dict[str, float]] = {}
    t_ref: dict[str, float] = defaultdict(float)
    rated: dict[str, set[int]] = defaultdict(set)
    gains: list[tuple[int, float, float]] = []
    for r in split.history:
        j = index.get(r.item)
        if j is None:
            continue
        rated[r.user].add(j)
        w = event_weight("rating", r.value, cfg)
        item = {m: v[j] for m, v in vectors.items() if present[m][j]}
        affinity[r.user] = fold_tags(
            affinity.get(r.user, {}),
            t_ref[r.user],
            item_tags[j],
            w,
            r.ts or 0.0,
            half_life_s,
            cfg.tag_cap,
        )
        profiles[r.user], t_ref[r.user] = fold(
            profiles.get(r.user, {}), t_ref[r.user], item, w, r.ts or 0.0, half_life_s
        )
        if w > 0:
            gains.append((j, w, r.ts or 0.0))
    priors = {hl: _popularity(gains, len(item_ids), hl) for hl in HALF_LIVES_DAYS}
    base = settings.ranker.modality_weights
    ratios = IMAGE_TO_TEXT if {"text", "image"} <= set(vectors) else (1.0,)
    users = sorted(split.positives)
    excluded = np.zeros((len(users), len(item_ids)), dtype=bool)
    relevant = np.zeros_like(excluded)
    for row, u in enumerate(users):
        excluded[row, list(rated[u])] = True
        relevant[row, [index[i] for i in split.positives[u] if i in index]] = True
    tag_weights = TAG_WEIGHTS if any(item_tags) else (0.0,)
    state = (users, profiles, affinity, vectors, present, item_tags)
    content = {
        (ratio, w_tags): _content(*state, _weights(base, ratio, w_tags))
        for ratio, w_tags in itertools.product(ratios, tag_weights)
    }
    rows = []
    for hl, w_pop, ratio, w_tags in itertools.product(
        HALF_LIVES_DAYS, POPULARITY_WEIGHTS, ratios, tag_weights
    ):
        scores = content[ratio, w_tags] + w_pop * priors[hl][None, :]
        rows.append(
            {
                "popularity_half_life_days": hl,
                "popularity_weight": w_pop,
                "image_to_text": ratio,
                "tag_weight": w_tags,
                "ndcg@20": ndcg_matrix(scores, excluded, relevant),
            }
        )
    # Ties (a half-life under weight 0 changes nothing) keep the current setting.
    best = max(
        rows,
        key=lambda row: (
            row["ndcg@20"],
            row["popularity_half_life_days"] == cfg.popularity_half_life_days,
        ),
    )
    default = ndcg_matrix(
        _content(*state, _weights(base, 1.0, settings.ranker.tag_weight, image_to_text=False))
        + settings.ranker.popularity_weight
        * _popularity(gains, len(item_ids), cfg.popularity_half_life_days)[None, :],
        excluded,
        relevant,
    )
    chosen = {
        "profiles": {"popularity_half_life_days": best["popularity_half_life_days"]},
        "ranker": {
            "popularity_weight": best["popularity_weight"],
            "modality_weights": _modality_weights(base, best["image_to_text"]),
            "tag_weight": best["tag_weight"],
        },
    }
    return Fit(protocol, chosen, best["ndcg@20"], default, best, rows, len(users))


def _modality_weights(base: dict[str, float], image_to_text: float) -> dict[str, float]:
    out = dict(base)
    if "image" in out and "text" in out:
        out["image"] = out["text"] * image_to_text
    return out


def _popularity(gains: list[tuple[int, float, float]], n: int, half_life_days: float) -> np.ndarray:
    """The popularity prior every user sees, as the ranker computes it at the end of history."""
    value, at = np.zeros(n), np.zeros(n)
    for j, w, t in sorted(gains, key=lambda g: g[2]):
        value[j], at[j] = accumulate(value[j], at[j], w, t, half_life_days * DAY_S)
    return fusion.popularity_prior(value, at, half_life_days * DAY_S)


def _weights(
    base: dict[str, float], ratio: float, w_tags: float, image_to_text: bool = True
) -> dict[str, float]:
    return {**(_modality_weights(base, ratio) if image_to_text else base), fusion.TAGS: w_tags}


def _content(
    users: list[str],
    profiles: dict[str, dict[str, np.ndarray]],
    affinity: dict[str, dict[str, float]],
    vectors: dict[str, np.ndarray],
    present: dict[str, np.ndarray],
    item_tags: Sequence[Sequence[str]],
    weights: dict[str, float],
) -> np.ndarray:
    """What the ranker's `fuse` gives each user for every item (modalities and tag affinity),
    all users at once: one row each, zero where a user lacks a modality."""
    stacked = {
        m: np.stack([profiles.get(u, {}).get(m, np.zeros(v.shape[1])) for u in users])
        for m, v in vectors.items()
    }
    items, has = dict(vectors), dict(present)
    vocabulary = sorted({t for tags in item_tags for t in tags})
    if vocabulary:
        rows = [fusion.tag_vectors(affinity.get(u, {}), item_tags, vocabulary) for u in users]
        stacked[fusion.TAGS] = np.stack([row[0] for row in rows])
        _, items[fusion.TAGS], has[fusion.TAGS] = fusion.tag_vectors({}, item_tags, vocabulary)
    scores, _ = fusion.fuse(stacked, items, has, weights)
    return scores


def ndcg_matrix(scores: np.ndarray, excluded: np.ndarray, relevant: np.ndarray) -> float:
    """Mean of protocols.ndcg_at_k over the rows of a (users, items) score matrix, at once:
    `excluded` (bool) items are never ranked, `relevant` (bool) ones are hits."""
    k = min(p.K, scores.shape[1])
    s = np.where(excluded, -np.inf, scores)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    discount = 1.0 / np.log2(np.arange(k) + 2)
    dcg = (np.take_along_axis(relevant, top, axis=1) * discount).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(relevant.sum(axis=1), k) - 1]
    return float(np.mean(np.where(relevant.any(axis=1), dcg / ideal, 0.0))) if len(s) else 0.0
