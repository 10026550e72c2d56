"""What the int8 text twin costs in quality: exact vs int8 MiniLM vectors on MovieLens.

    python benchmarks/int8_quality.py [--data ../shared/data/movielens-100k] [--limit-items N]

Exports the text encoder (and its int8 twin), encodes every item's "title. plot" with each, and
reports how far the vectors moved (cosine to the exact vector, overlap of each item's 10
nearest neighbours) and the text-only content baseline (fusionrec.evaluation.ContentBaseline)
on protocols A and B as ../shared/data/movielens-100k/README.md defines them. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository, not this folder (whose encoders.py shadows the package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "../shared/data/movielens-100k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-items", type=int, help="the first N items (keeps it working)")
    args = parser.parse_args()

    from encoders.onnx import export_all
    from fusionrec import protocols as p
    from fusionrec.evaluation import (
        ContentBaseline,
        Dataset,
        allowed_items,
        encode_items,
        item_docs,
        top_ids,
    )
    from fusionrec.settings import Settings

    ds = Dataset.load(args.data.resolve(), limit_items=args.limit_items)
    docs = [{k: v for k, v in d.items() if k != "image"} for d in item_docs(ds)]
    ids = ds.item_ids
    tiebreak = np.random.default_rng(0).permutation(len(ids))
    splits = {"A": p.protocol_a(ds.ratings), "B cold items": p.protocol_b(ds.ratings, 0)}
    vectors, ndcg = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        exact_dir, int8_dir = Path(tmp, "exact"), Path(tmp, "int8")
        encoders = {"enabled": ["text"], "threads": args.threads, "device": "cpu"}
        print(export_all(Settings(encoders=encoders).encoders, exact_dir, data_dir=args.data))
        int8_dir.mkdir()
        for model in exact_dir.glob("*.int8.onnx"):  # the twin, under the exact model's name
            shutil.copy(model, int8_dir / model.name.replace(".int8", ""))
        for label, folder in (("exact", exact_dir), ("int8", int8_dir)):
            settings = Settings(encoders={**encoders, "onnx_dir": folder})
            items = encode_items(docs, settings, folder / "vectors.npz")
            vectors[label] = items.vectors["text"]
            for name, split in splits.items():
                peer = ContentBaseline(items, {"text": 1.0}).fit(split.history)
                only = set(split.cold_items) if split.cold_items else set(ids)
                allowed = allowed_items(split, ids, only)
                rankings = {
                    u: top_ids(peer.scores(u), ids, allowed[u], tiebreak) for u in split.positives
                }
                ndcg[(label, name)] = p.score_users(rankings, split.positives)["ndcg@20"]

    a, b = vectors["exact"], vectors["int8"]
    cosines = np.sum(a * b, axis=1)
    near_a = np.argsort(-(a @ a.T), axis=1)[:, 1:11]
    near_b = np.argsort(-(b @ b.T), axis=1)[:, 1:11]
    shared = [len(set(x) & set(y)) / 10 for x, y in zip(near_a, near_b, strict=True)]
    overlap = float(np.mean(shared))
    print(f"\n{len(ids)} MovieLens items, title + plot")
    print(f"cosine int8 to exact: min {cosines.min():.4f}, median {np.median(cosines):.4f}")
    print(f"10 nearest neighbours shared: {overlap:.1%}")
    print(f"{'content baseline NDCG@20':<28} {'exact':>8} {'int8':>8}")
    for name in splits:
        exact, int8 = ndcg[("exact", name)], ndcg[("int8", name)]
        print(f"{'protocol ' + name:<28} {exact:>8.4f} {int8:>8.4f}")
    print(
        json.dumps(
            {
                "items": len(ids),
                "cosine_min": round(float(cosines.min()), 4),
                "cosine_median": round(float(np.median(cosines)), 4),
                "neighbours_shared": round(overlap, 3),
                "ndcg_a_exact": round(ndcg[("exact", "A")], 4),
                "ndcg_a_int8": round(ndcg[("int8", "A")], 4),
                "ndcg_b_cold_exact": round(ndcg[("exact", "B cold items")], 4),
                "ndcg_b_cold_int8": round(ndcg[("int8", "B cold items")], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
