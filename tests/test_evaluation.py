"""The evaluator: metrics against hand-computed values, protocol splits against the data README,
and `fusionrec eval` end to end on a tiny data set through its own embedded stack."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fusionrec import protocols as p

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"


def test_metrics_by_hand() -> None:
    ranked = ["a", "b", "c", "d"]
    rel = {"b", "d", "z"}
    assert p.recall_at_k(ranked, rel, 3) == pytest.approx(1 / 3)
    assert p.recall_at_k(ranked, rel, 4) == pytest.approx(2 / 3)
    # hits at ranks 2 and 4; ideal: 3 hits on top within k=4
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert p.ndcg_at_k(ranked, rel, 4) == pytest.approx(dcg / idcg)
    assert p.rr_at_k(ranked, rel, 4) == pytest.approx(0.5)
    assert p.rr_at_k(ranked, rel, 1) == 0.0
    assert p.ndcg_at_k(["b"], {"b"}, 20) == pytest.approx(1.0)
    assert p.rank_of(ranked, "c") == 3 and p.rank_of(ranked, "z") is None


def test_score_users_and_events() -> None:
    rankings = {"u1": ["a", "b"], "u2": ["c", "d"], "u3": ["e"]}
    positives = {"u1": {"a"}, "u2": {"d", "x"}, "u4": {"a"}}  # u4 was never ranked
    s = p.score_users(rankings, positives, k=2)
    assert s["users"] == 2 and s["items"] == 3
    assert s["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert s["mrr@2"] == pytest.approx((1 + 0.5) / 2)
    only_x = p.score_users(rankings, positives, keep={"x"}, k=2)
    assert only_x["users"] == 1 and only_x["recall@2"] == 0.0
    e = p.score_events([1, 2, None, 30], k=20)
    assert e["hit@20"] == pytest.approx(0.5) and e["events"] == 4
    assert e["mrr@20"] == pytest.approx((1 + 0.5) / 4)
    assert e["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert p.coverage([["a", "b"], ["b", "c"]], {"a", "b", "c", "d"}, k=1) == pytest.approx(0.5)


def test_buckets() -> None:
    assert p.bucket(0, p.POPULARITY_EDGES) == "0"
    assert p.bucket(10, p.POPULARITY_EDGES) == "1-10"
    assert p.bucket(500, p.POPULARITY_EDGES) == "151+"
    assert p.age_bucket("i", 100 * 86400.0, {"i": 0.0}) == "90-179 d"
    assert p.age_bucket("j", 0.0, {}) == "new"
    assert p.sample_indices(5, None) == [0, 1, 2, 3, 4]
    s = p.sample_indices(100, 10, seed=0)
    assert len(s) == 10 and s == sorted(s) and s == p.sample_indices(100, 10, seed=0)


def _tiny() -> list[p.Rating]:
    # u1 likes early, u2 later; 10 positives: the last 2 (by time) open the test period.
    rows = [("u1", f"i{k}", 5.0, float(k)) for k in range(8)]
    rows += [("u2", "i1", 2.0, 7.5), ("u2", "i8", 4.0, 9.0), ("u3", "i9", 5.0, 10.0)]
    return [p.Rating(*r) for r in rows]


def test_protocol_a_on_tiny_data() -> None:
    split = p.protocol_a(_tiny())
    assert [r.item for r in split.test] == ["i8", "i9"]
    assert len(split.history) == 9  # the negative at 7.5 precedes the test period
    assert split.positives == {"u2": {"i8"}, "u3": {"i9"}}
    with pytest.raises(ValueError, match="timestamps"):
        p.protocol_a([p.Rating("u", "1", 5.0, None)])


def test_protocol_b_on_tiny_data() -> None:
    ratings = [p.Rating("u", str(i), 5.0, None) for i in range(1, 11)]
    split = p.protocol_b(ratings)
    want = {str(i) for i in np.random.default_rng(0).choice(list(range(1, 11)), 2, replace=False)}
    assert split.cold_items == want
    assert not {r.item for r in split.history} & want
    assert split.positives == {"u": want}


@pytest.mark.skipif(
    not (ML100K / "ratings.tsv").is_file(), reason=f"MovieLens-100K not found at {ML100K}"
)
def test_protocols_match_the_data_readme() -> None:
    ratings = p.read_ratings(ML100K / "ratings.tsv")
    b = p.protocol_b(ratings)
    assert len(b.cold_items) == 289
    assert len({r.item for r in ratings if r.positive}) == 1447
    a = p.protocol_a(ratings)
    assert len(a.positives) == 280
    assert len(set(a.positives) - p.history_users(a, positive_only=False)) == 188
    assert sum(r.positive for r in a.test) == int(0.2 * sum(r.positive for r in ratings))


def _tiny_dataset(root: Path) -> Path:
    """30 items in 3 themes with drawn posters; 20 users who each like one theme."""
    from fusionrec.demo import THEMES, draw

    rng = np.random.default_rng(0)
    themes = list(THEMES)[:3]
    (root / "posters").mkdir(parents=True)
    lines = ["item_id,title,genres,description,poster"]
    for i in range(30):
        theme = themes[i % 3]
        draw(theme, rng).resize((64, 64)).save(root / "posters" / f"{i + 1}.png")
        text = THEMES[theme]["text"]
        lines.append(f'{i + 1},{theme} {i},{theme.title()},"A film of {text}.",posters/{i + 1}.png')
    (root / "items.csv").write_text("\n".join(lines) + "\n")
    rows = ["user_id\titem_id\trating\ttimestamp"]
    t = 880_000_000
    for u in range(20):
        liked = [i for i in range(30) if i % 3 == u % 3]
        for i in rng.permutation(liked)[:7]:
            t += 3600
            rows.append(f"{u + 1}\t{i + 1}\t{int(rng.integers(4, 6))}\t{t}")
        t += 3600
        rows.append(f"{u + 1}\t{(u % 3 + 1) % 3 + 1}\t1\t{t}")
    (root / "ratings.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.integration
def test_fusionrec_eval_end_to_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fusionrec.cli import app

    data = _tiny_dataset(tmp_path / "data")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data",
            str(data),
            "--out",
            str(out),
            "--protocols",
            "A,B,C",
            "--peers",
            "most-popular,content",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for key in ("protocol_a", "protocol_b_cold_only", "protocol_b_all_items", "protocol_c"):
        assert "fusionrec" in report["summary"][key], key
    a = report["protocols"]["A"]["models"]["fusionrec"]["all"]
    assert a["users"] > 0 and 0.0 <= a["ndcg@20"] <= 1.0
    assert (out / "report.md").is_file() and list(out.glob("*.png"))
    assert "most-popular (daily)" in report["summary"]["protocol_c"]
    assert "protocol_c_daily" in report["bars"]
    # Each stack ran with weights fitted on its own protocol's history.
    assert set(report["fitted"]) == {"A", "B"}, report["notes"]
    assert "fitted: all parts" in report["fitted"]["A"]["ablation_ndcg@20"]
