"""Fitting the ranker's weights on held-out history: pure replay, no stack."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fusionrec import protocols as p
from fusionrec.fitting import fit, ndcg_matrix
from fusionrec.settings import Settings, load_settings

DAY = 86_400.0


def test_ndcg_matrix_is_the_mean_of_ndcg_at_k() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6, 40))
    excluded = rng.random((6, 40)) < 0.2
    relevant = (rng.random((6, 40)) < 0.15) & ~excluded
    relevant[0] = False  # a user with no hit left counts as 0
    want = []
    for s, ex, rel in zip(scores, excluded, relevant, strict=True):
        ranked = [str(j) for j in np.argsort(-np.where(ex, -np.inf, s), kind="stable")]
        want.append(p.ndcg_at_k(ranked, {str(j) for j in np.flatnonzero(rel)}))
    assert ndcg_matrix(scores, excluded, relevant) == pytest.approx(np.mean(want))


def _trending_history() -> list[p.Rating]:
    """Items 0-9 were the hits of long ago; items 10-19 are what everyone likes lately."""
    rng = np.random.default_rng(0)
    out = []
    t = 1000 * DAY
    for u in range(60):
        for i in rng.choice(10, 4, replace=False):
            out.append(p.Rating(f"u{u}", str(i), 5.0, t))
            t += 60
    t += 200 * DAY
    for u in range(60, 160):
        for i in rng.choice(np.arange(10, 20), 3, replace=False):
            out.append(p.Rating(f"u{u}", str(i), 5.0, t))
            t += 3600
    return out


def test_fit_finds_that_recent_popularity_predicts() -> None:
    ids = [str(i) for i in range(30)]
    rng = np.random.default_rng(2)
    vectors = {"text": rng.normal(size=(30, 8)).astype(np.float32)}
    present = {"text": np.ones(30, bool)}
    result = fit(_trending_history(), ids, vectors, present, Settings(), "A")
    chosen = result.settings
    assert chosen["ranker"]["popularity_weight"] > 0
    assert math.isfinite(chosen["profiles"]["popularity_half_life_days"])
    ablation = dict(result.ablation())
    assert ablation["fitted: all parts"] > ablation["without popularity (weight 0)"]
    assert ablation["fitted: all parts"] > ablation["without trending popularity (all-time sum)"]


def test_fitted_settings_load(tmp_path: Path) -> None:
    ids = [str(i) for i in range(30)]
    vectors = {"text": np.eye(30, 8, dtype=np.float32), "image": np.eye(30, 4, dtype=np.float32)}
    present = {m: np.ones(30, bool) for m in vectors}
    result = fit(_trending_history(), ids, vectors, present, Settings(), "A")
    path = tmp_path / "fitted.toml"
    path.write_text(result.toml())
    tomllib.loads(path.read_text())
    settings = load_settings(path)
    assert settings.ranker.popularity_weight == result.settings["ranker"]["popularity_weight"]
    assert settings.ranker.modality_weights == result.settings["ranker"]["modality_weights"]
    env = result.env()
    assert env["FUSIONREC_RANKER__POPULARITY_WEIGHT"] == repr(settings.ranker.popularity_weight)


def test_fit_finds_that_tags_predict() -> None:
    """Each user likes one theme; the held-out likes are items no one liked before, findable
    only by their tags (the vectors are noise)."""
    rng = np.random.default_rng(4)
    ids = [str(i) for i in range(60)]
    history = []
    t = 1000 * DAY
    for u in range(90):
        theme = [i for i in range(30) if i % 3 == u % 3]
        for i in rng.choice(theme, 4, replace=False):
            history.append(p.Rating(f"u{u}", str(i), 5.0, t))
            t += 60
    for u in range(90):
        for i in rng.choice([i for i in range(30, 60) if i % 3 == u % 3], 2, replace=False):
            history.append(p.Rating(f"u{u}", str(i), 5.0, t))
            t += 60
    vectors = {"text": rng.normal(size=(60, 8)).astype(np.float32)}
    present = {"text": np.ones(60, bool)}
    tags = [[f"theme{i % 3}"] for i in range(60)]
    result = fit(history, ids, vectors, present, Settings(), "A", item_tags=tags)
    assert result.settings["ranker"]["tag_weight"] > 0
    ablation = dict(result.ablation())
    assert ablation["fitted: all parts"] > ablation["without tag affinity (weight 0)"] + 0.1


def test_co_engagement_is_fitted_on_a_prequential_replay() -> None:
    """Users walk a chain of items (k, k+1, k+2, ...): what others liked next predicts the next
    positive, while content (random vectors) and popularity (uniform) do not."""
    rng = np.random.default_rng(3)
    n = 40
    ratings, t = [], 0.0
    for u in range(200):
        start = int(rng.integers(n))
        for step in range(6):
            t += 60
            ratings.append(p.Rating(f"u{u}", str((start + step) % n), 5.0, t))
    ids = [str(i) for i in range(n)]
    vectors = {"text": rng.normal(size=(n, 8)).astype(np.float32)}
    result = fit(ratings, ids, vectors, {"text": np.ones(n, bool)}, Settings(), "A")
    assert result.settings["ranker"]["co_weight"] > 0
    assert result.co_asked > 50
    fitted, without = (v for _, v in result.co_ablation())
    assert fitted > without + 0.2
    assert "co_weight = " in result.toml()
