"""The ranker's weights fitted on history: on a held-out slice of it, never the test period.

The history is split again the way the test was split from the data (protocol A: its last 20%
of positives by time; protocol B: a fifth of its items held out cold), the first part is
replayed through the same pure functions the worker and the ranker use (streams.profiles for
profiles and decayed popularity, serving.fusion for scores), and a small grid is searched for
the best NDCG@20 on the held-out part: the popularity half-life, the popularity weight, the
image-to-text weight and the weight of the tag affinity. The co-engagement weight is then
fitted the way the stream uses it: the held-out part (by time) replayed event by event, each
sampled positive asked about before it is applied (as protocol C). Recency is left as set: the
ranker measures an item's age by its own clock, which a replay of old data cannot share. The
winner
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
from fusionrec.settings import ProfileSettings, Settings
from serving import fusion
from streams.profiles import (
    DAY_S,
    accumulate,
    count_co_engagement,
    event_weight,
    fold,
    fold_tags,
)

HALF_LIVES_DAYS = (1.0, 3.0, 7.0, 14.0, 30.0, 90.0, math.inf)
POPULARITY_WEIGHTS = (0.0, 0.05, 0.3, 1.0, 3.0, 10.0)
IMAGE_TO_TEXT = (0.3, 1.0, 3.0)
TAG_WEIGHTS = (0.0, 0.5, 1.0, 3.0)
CO_WEIGHTS = (0.0, 0.3, 1.0, 3.0, 10.0)
# Positives asked about in the prequential replay that fits the co-engagement weight.
MAX_ASKED = 1000


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
    co_rows: list[dict[str, Any]] = field(default_factory=list)  # prequential: weight, NDCG@20
    co_asked: int = 0

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
            *self.co_ablation(),
        ]

    def co_ablation(self) -> list[tuple[str, float]]:
        """The prequential replay's NDCG@20 (a different figure from the rows above) with the
        fitted co-engagement weight and without co-engagement."""
        if not self.co_rows:
            return []
        weight = self.settings["ranker"]["co_weight"]
        ndcg = {row["co_weight"]: row["ndcg@20"] for row in self.co_rows}
        return [
            (f"prequential replay ({self.co_asked} asked): fitted co-engagement", ndcg[weight]),
            ("prequential replay: without co-engagement (weight 0)", ndcg[0.0]),
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


class Replay:
    """The worker's state rebuilt in-process by its own pure functions (streams.profiles):
    profiles, tag affinity, what each user rated, decayed popularity (at every half-life of the
    grid) and co-engagement."""

    def __init__(
        self,
        item_ids: list[str],
        vectors: dict[str, np.ndarray],
        present: dict[str, np.ndarray],
        item_tags: Sequence[Sequence[str]],
        cfg: ProfileSettings,
    ) -> None:
        self.index = {i: j for j, i in enumerate(item_ids)}
        self.vectors, self.present, self.item_tags, self.cfg = vectors, present, item_tags, cfg
        self.half_life_s = cfg.half_life_days * DAY_S
        self.profiles: dict[str, dict[str, np.ndarray]] = {}
        self.affinity: dict[str, dict[str, float]] = {}
        self.t_ref: dict[str, float] = defaultdict(float)
        self.rated: dict[str, set[int]] = defaultdict(set)
        self.positives: dict[str, list[str]] = defaultdict(list)
        self.co: dict[str, dict[str, float]] = defaultdict(dict)
        self.last_positive: dict[str, float] = {}
        self.now = 0.0  # the newest event time applied: the stream's clock
        self.popularity = {
            hl: (np.zeros(len(item_ids)), np.zeros(len(item_ids)))
            for hl in {*HALF_LIVES_DAYS, cfg.popularity_half_life_days}
        }

    def apply(self, r: p.Rating) -> None:
        j = self.index.get(r.item)
        if j is None:
            return
        u, t, cfg = r.user, r.ts or 0.0, self.cfg
        self.now = max(self.now, t)
        self.rated[u].add(j)
        w = event_weight("rating", r.value, cfg)
        item = {m: v[j] for m, v in self.vectors.items() if self.present[m][j]}
        self.affinity[u] = fold_tags(
            self.affinity.get(u, {}), self.t_ref[u], self.item_tags[j], w, t,
            self.half_life_s, cfg.tag_cap,
        )  # fmt: skip
        self.profiles[u], self.t_ref[u] = fold(
            self.profiles.get(u, {}), self.t_ref[u], item, w, t, self.half_life_s
        )
        if w <= 0:
            return
        self.last_positive[u] = max(t, self.last_positive.get(u, t))
        for hl, (value, at) in self.popularity.items():
            value[j], at[j] = accumulate(value[j], at[j], w, t, hl * DAY_S)
        count_co_engagement(self.co, self.positives[u], r.item, cfg.co_window, cfg.co_cap)

    def popularity_prior(self, half_life_days: float) -> np.ndarray:
        """The popularity prior every user sees now, as the ranker computes it."""
        value, at = self.popularity[half_life_days]
        return fusion.popularity_prior(value, at, half_life_days * DAY_S)

    def co_prior(self, user: str, recent: int, n: int, session_s: float) -> np.ndarray:
        """The ranker's co-engagement prior for every item: with the user's latest positives."""
        counts = fusion.co_counts(
            [self.co[i] for i in self.positives[user][-recent:]] if recent else []
        )
        out = np.zeros(n)
        for item, c in counts.items():
            out[self.index[item]] = c
        gate = fusion.session_gate(self.last_positive.get(user, self.now), self.now, session_s)
        return gate * fusion.count_prior(out)


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
    """Grid search on the held-out slice; ties go to the earlier (simpler) row of the grid.
    Then the co-engagement weight, on a prequential replay (`_fit_co`)."""
    item_tags = item_tags if item_tags is not None else [()] * len(item_ids)
    split = validation_split(history, protocol, seed)
    cfg = settings.profiles
    replay = Replay(item_ids, vectors, present, item_tags, cfg)
    for r in split.history:
        replay.apply(r)
    index, rated = replay.index, replay.rated
    base = settings.ranker.modality_weights
    ratios = IMAGE_TO_TEXT if {"text", "image"} <= set(vectors) else (1.0,)
    users = sorted(split.positives)
    excluded = np.zeros((len(users), len(item_ids)), dtype=bool)
    relevant = np.zeros_like(excluded)
    for row, u in enumerate(users):
        excluded[row, list(rated[u])] = True
        relevant[row, [index[i] for i in split.positives[u] if i in index]] = True
    tag_weights = TAG_WEIGHTS if any(item_tags) else (0.0,)
    content = {
        (ratio, w_tags): _content(replay, users, _weights(base, ratio, w_tags))
        for ratio, w_tags in itertools.product(ratios, tag_weights)
    }
    rows = []
    for hl, w_pop, ratio, w_tags in itertools.product(
        HALF_LIVES_DAYS, POPULARITY_WEIGHTS, ratios, tag_weights
    ):
        scores = content[ratio, w_tags] + w_pop * replay.popularity_prior(hl)[None, :]
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
        _content(replay, users, _weights(base, 1.0, settings.ranker.tag_weight, False))
        + settings.ranker.popularity_weight
        * replay.popularity_prior(cfg.popularity_half_life_days)[None, :],
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
    result = Fit(protocol, chosen, best["ndcg@20"], default, best, rows, len(users))
    if protocol == "B":  # co-engagement is fitted on time, which B's split does not follow
        split = p.protocol_a(history)
        replay = Replay(item_ids, vectors, present, item_tags, cfg)
        for r in split.history:
            replay.apply(r)
    _fit_co(result, replay, split.test, settings, seed)
    return result


def _fit_co(
    result: Fit, replay: Replay, test: Sequence[p.Rating], settings: Settings, seed: int
) -> None:
    """The co-engagement weight, fitted as the stream uses it (as protocol C): the held-out
    events are replayed in order, and before each sampled positive the user's ranking is scored
    with each weight (the rest as fitted), then the event is applied."""
    ranker = {**settings.ranker.model_dump(), **result.settings["ranker"]}
    best = result.best
    weights = _weights(ranker["modality_weights"], 1.0, best["tag_weight"], False)
    where = [k for k, r in enumerate(test) if r.positive and r.item in replay.index]
    chosen = {where[s] for s in p.sample_indices(len(where), MAX_ASKED, seed)}
    n = len(replay.index)
    gains = {w: [] for w in CO_WEIGHTS}
    for k, r in enumerate(test):
        if k in chosen:
            j = replay.index[r.item]
            base = _content(replay, [r.user], weights)[0] + best[
                "popularity_weight"
            ] * replay.popularity_prior(best["popularity_half_life_days"])
            co = replay.co_prior(
                r.user, settings.ranker.co_recent, n, ranker["co_session_half_life_hours"] * 3600
            )
            blocked = np.zeros(n, bool)
            blocked[list(replay.rated[r.user])] = True
            for w, got in gains.items():
                s = np.where(blocked, -np.inf, base + w * co)
                rank = int((s > s[j]).sum())
                got.append(1.0 / math.log2(rank + 2) if rank < p.K else 0.0)
        replay.apply(r)
    result.co_rows = [
        {"co_weight": w, "ndcg@20": float(np.mean(g)) if g else 0.0} for w, g in gains.items()
    ]
    result.co_asked = len(chosen)
    top = max(result.co_rows, key=lambda row: row["ndcg@20"])
    result.settings["ranker"]["co_weight"] = top["co_weight"]


def _modality_weights(base: dict[str, float], image_to_text: float) -> dict[str, float]:
    out = dict(base)
    if "image" in out and "text" in out:
        out["image"] = out["text"] * image_to_text
    return out


def _weights(
    base: dict[str, float], ratio: float, w_tags: float, image_to_text: bool = True
) -> dict[str, float]:
    return {**(_modality_weights(base, ratio) if image_to_text else base), fusion.TAGS: w_tags}


def _content(replay: Replay, users: list[str], weights: dict[str, float]) -> np.ndarray:
    """What the ranker's `fuse` gives each user for every item (modalities and tag affinity),
    all users at once: one row each, zero where a user lacks a modality."""
    vectors, present, item_tags = replay.vectors, replay.present, replay.item_tags
    stacked = {
        m: np.stack([replay.profiles.get(u, {}).get(m, np.zeros(v.shape[1])) for u in users])
        for m, v in vectors.items()
    }
    items, has = dict(vectors), dict(present)
    vocabulary = sorted({t for tags in item_tags for t in tags})
    if vocabulary:
        rows = [
            fusion.tag_vectors(replay.affinity.get(u, {}), item_tags, vocabulary) for u in users
        ]
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
