"""Recommendation quality: fusionrec against its peers, side by side in one run.

Calls the evaluator (`fusionrec.evaluation`, the same as `fusionrec eval`) with every peer:
most-popular, BPR and VBPR (Cornac), and the content-only baseline. Same history, candidates and
test positives for every model. Prints the table, then one JSON line (the last line).

    python benchmarks/quality.py --data ../shared/data/movielens-100k --out quality-report \
        --max-test-events 1500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, this folder leads sys.path, and benchmarks/encoders.py would shadow the
# encoders package: the repository root goes first instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from fusionrec.evaluation import PEERS, evaluate, last_line, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", type=Path, default=here.parent / "shared/data/movielens-100k")
    ap.add_argument("--out", type=Path, default=Path("quality-report"))
    ap.add_argument("--protocols", default="A,B,C")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--max-test-events", type=int, default=None)
    ap.add_argument("--limit-users", type=int, default=None)
    ap.add_argument("--limit-items", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--no-fit", action="store_true", help="run the stack with settings as given")
    args = ap.parse_args()
    doc = evaluate(
        args.data,
        args.out,
        protocols=[x.strip().upper() for x in args.protocols.split(",") if x.strip()],
        peers=[x.strip() for x in args.peers.split(",") if x.strip()],
        config=args.config,
        max_test_events=args.max_test_events,
        limit_users=args.limit_users,
        limit_items=args.limit_items,
        seed=args.seed,
        fit_weights=not args.no_fit,
    )
    print(table(doc["summary"]))
    for key, bar in doc["bars"].items():
        print(f"{key}: fusionrec / {bar['best_peer']} NDCG@20 = {bar['ratio']}")
    for note in doc["notes"]:
        print(f"note: {note}")
    print(last_line(doc["summary"]))


if __name__ == "__main__":
    main()
