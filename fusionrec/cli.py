"""`fusionrec`: run the stack, publish, ask for recommendations, run the demo."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fusionrec.settings import Settings, load_settings

if TYPE_CHECKING:
    from serving.client import RankerClient

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()

Config = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file (flags > env > file).")
]
DataDir = Annotated[Path | None, typer.Option(help="State folder (Qdrant local mode lives here).")]
Kafka = Annotated[
    str | None, typer.Option("--kafka", help="Kafka bootstrap servers; default: embedded broker.")
]
QdrantUrl = Annotated[
    str | None, typer.Option("--qdrant-url", help="Qdrant server URL; default: local mode.")
]
Host = Annotated[str | None, typer.Option("--host", help="gRPC ranker host.")]
Port = Annotated[int | None, typer.Option("--port", help="gRPC ranker port.")]
LogLevel = Annotated[str | None, typer.Option("--log-level")]
TlsCa = Annotated[
    Path | None,
    typer.Option("--tls-ca", help="Talk TLS to the ranker, trusting this root certificate (PEM)."),
]
TokenFile = Annotated[
    Path | None,
    typer.Option("--token-file", help="File holding the ranker's bearer token (sent over TLS)."),
]


def _settings(
    config: Path | None = None,
    data_dir: Path | None = None,
    kafka: str | None = None,
    qdrant_url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str | None = None,
    security: dict[str, Any] | None = None,
) -> Settings:
    nested: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap": kafka},
        "qdrant": {"url": qdrant_url},
        "ranker": {"host": host, "port": port},
        "security": security or {},
    }
    flags = {k: {f: v for f, v in d.items() if v is not None} for k, d in nested.items()}
    try:
        return load_settings(
            config, data_dir=data_dir, log_level=log_level, **{k: v for k, v in flags.items() if v}
        )
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def up(
    config: Config = None,
    data_dir: DataDir = None,
    kafka: Kafka = None,
    qdrant_url: QdrantUrl = None,
    host: Host = None,
    port: Port = None,
    log_level: LogLevel = None,
) -> None:
    """Embedded stack: broker (unless --kafka), Qdrant local mode, worker + ranker, one process."""
    from fusionrec.stack import up as run_up

    run_up(_observable(_settings(config, data_dir, kafka, qdrant_url, host, port, log_level)))


@app.command()
def worker(
    config: Config = None,
    data_dir: DataDir = None,
    kafka: Kafka = None,
    qdrant_url: QdrantUrl = None,
    log_level: LogLevel = None,
) -> None:
    """A stream worker alone (distributed topology: scale by partitions)."""
    from fusionrec.stack import run_worker

    settings = _settings(config, data_dir, kafka, qdrant_url, log_level=log_level)
    if settings.kafka.bootstrap is None:
        raise typer.BadParameter("a worker needs --kafka (the embedded broker runs with `up`)")
    run_worker(_observable(settings), serve=False)


@app.command()
def serve(
    config: Config = None,
    data_dir: DataDir = None,
    qdrant_url: QdrantUrl = None,
    host: Host = None,
    port: Port = None,
    log_level: LogLevel = None,
) -> None:
    """A gRPC ranker alone (distributed topology: stateless, behind a load balancer)."""
    from fusionrec.stack import serve as run_serve

    run_serve(_observable(_settings(config, data_dir, None, qdrant_url, host, port, log_level)))


def _observable(settings: Settings) -> Settings:
    """Logs per log_format (secrets masked) and the metrics endpoint, before a role starts."""
    from fusionrec import logs, metrics

    logs.configure(settings)
    metrics.serve(settings.metrics)
    return settings


@app.command()
def publish(
    kind: Annotated[str, typer.Argument(help="items or events")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV")],
    config: Config = None,
    kafka: Kafka = None,
) -> None:
    """Validate and publish a JSONL or CSV file of items or events (acks=all)."""
    from fusionrec.publisher import Publisher, read_records

    if kind not in ("items", "events"):
        raise typer.BadParameter("KIND is items or events")
    docs = list(read_records(file))
    publisher = Publisher(_settings(config, kafka=kafka))
    refused = 0
    with Progress(console=console) as progress:
        task = progress.add_task(f"publishing {kind}", total=len(docs))
        for row, reason in publisher.publish(kind, docs):  # type: ignore[arg-type]
            if reason:
                refused += 1
                console.print(f"[red]row {row} refused[/red]: {reason}")
            progress.advance(task)
    publisher.close()
    console.print(f"published {len(docs) - refused} {kind}, refused {refused}")
    if refused:
        raise typer.Exit(1)


def print_ranking(title: str, items: list[Any]) -> None:
    table = Table(title=title)
    for col in ("#", "item", "title", "score", "why (contributions)", "found by"):
        table.add_column(col)
    for rank, it in enumerate(items, 1):
        why = " ".join(f"{k} {v:+.2f}" for k, v in sorted(it.contributions.items()) if v)
        table.add_row(
            str(rank), it.item_id, it.title[:28], f"{it.score:.3f}", why, ",".join(it.sources)
        )
    console.print(table)


def _client(
    config: Path | None,
    host: str | None,
    port: int | None,
    tls_ca: Path | None,
    token_file: Path | None,
) -> RankerClient:
    from serving.client import RankerClient

    security = {"ca_file": tls_ca, "token_file": token_file}
    settings = _settings(
        config, host=host, port=port, security={k: v for k, v in security.items() if v}
    )
    return RankerClient.from_settings(settings)


@app.command()
def recommend(
    user: str,
    limit: Annotated[int, typer.Option(min=1)] = 10,
    category: Annotated[list[str] | None, typer.Option(help="Any of these categories.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Any of these tags.")] = None,
    config: Config = None,
    host: Host = None,
    port: Port = None,
    tls_ca: TlsCa = None,
    token_file: TokenFile = None,
) -> None:
    """Ask the ranker what USER should see now."""
    with _client(config, host, port, tls_ca, token_file) as client:
        ranking = client.recommend(user, limit, categories=category or (), tags=tag or ())
    cold = " (no history yet: popular and fresh)" if ranking.cold_start else ""
    print_ranking(f"recommendations for {user}{cold}", ranking.items)


@app.command()
def similar(
    item: str,
    limit: Annotated[int, typer.Option(min=1)] = 10,
    config: Config = None,
    host: Host = None,
    port: Port = None,
    tls_ca: TlsCa = None,
    token_file: TokenFile = None,
) -> None:
    """Items like ITEM, by late fusion over its modalities."""
    with _client(config, host, port, tls_ca, token_file) as client:
        ranking = client.similar(item, limit)
    print_ranking(f"items similar to {item}", ranking.items)


@app.command()
def demo(
    data: Annotated[
        Path | None,
        typer.Option(help="A MovieLens-style folder (items.csv, ratings.tsv, posters/)."),
    ] = None,
) -> None:
    """Start the embedded stack, stream a catalog and events, show recommendations, a cold start."""
    from fusionrec.demo import run_demo

    run_demo(data)


@app.command("eval")
def eval_(
    data: Annotated[
        Path,
        typer.Option(
            exists=True, file_okay=False, help="A MovieLens-style folder (items.csv, ratings.tsv)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md, plots.")] = Path(
        "eval-report"
    ),
    protocols: Annotated[str, typer.Option(help="Comma-separated, among A, B, C.")] = "A,B,C",
    peers: Annotated[
        str, typer.Option(help="Comma-separated peers: most-popular, bpr, vbpr, content.")
    ] = "",
    max_test_events: Annotated[
        int | None, typer.Option(min=1, help="Protocol C: ask this many test positives (sample).")
    ] = None,
    limit_users: Annotated[int | None, typer.Option(min=1, help="Development subset.")] = None,
    limit_items: Annotated[int | None, typer.Option(min=1, help="Development subset.")] = None,
    seed: int = 0,
    fit: Annotated[
        bool, typer.Option(help="Fit the ranker's weights on each protocol's history first.")
    ] = True,
    config: Config = None,
) -> None:
    """Replay a data set through the real path (topics, agents, ranker) and score the rankings."""
    from fusionrec.evaluation import evaluate, last_line, table

    wanted = [x.strip().upper() for x in protocols.split(",") if x.strip()]
    if not wanted or set(wanted) - {"A", "B", "C"}:
        raise typer.BadParameter("--protocols is a comma-separated list among A, B, C")
    try:
        doc = evaluate(
            data,
            out,
            protocols=wanted,
            peers=[x.strip() for x in peers.split(",") if x.strip()],
            config=config,
            max_test_events=max_test_events,
            limit_users=limit_users,
            limit_items=limit_items,
            seed=seed,
            fit_weights=fit,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(table(doc["summary"]))
    console.print(f"report: {out / 'report.md'}")
    print(last_line(doc["summary"]))


@app.command()
def fit(
    data: Annotated[
        Path,
        typer.Option(
            exists=True, file_okay=False, help="A MovieLens-style folder (items.csv, ratings.tsv)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Settings file (TOML) to write.")] = Path("fitted.toml"),
    protocol: Annotated[
        str, typer.Option(help="Hold out like A (the latest positives) or B (cold items).")
    ] = "A",
    seed: int = 0,
    config: Config = None,
) -> None:
    """Fit the ranker's popularity half-life and weight, modality and tag weights on history."""
    from fusionrec.evaluation import Dataset, encode_items, fit_weights, item_docs

    if protocol.upper() not in ("A", "B"):
        raise typer.BadParameter("--protocol is A or B")
    settings = load_settings(config, media={"root": data.resolve()})
    ds = Dataset.load(data.resolve())
    v = encode_items(item_docs(ds), settings, settings.data_dir / "fit-cache" / "items.npz")
    try:
        result = fit_weights(ds, ds.ratings, v, settings, protocol.upper(), seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    out.write_text(result.toml())
    for label, ndcg in result.ablation():
        console.print(f"{label:<50} held-out NDCG@20 {ndcg:.4f}")
    console.print(f"wrote {out}: run with --config {out} (or merge it into yours)")


@app.command("export-encoders")
def export_encoders(
    out: Annotated[Path, typer.Option(help="Folder for the ONNX models.")] = Path("models/onnx"),
    config: Config = None,
) -> None:
    """Export the configured torch encoders to ONNX, checking onnxruntime agrees with torch;
    fails if an encoder could not be exported (an int8 twin that fails is only reported)."""
    from encoders.onnx import export_all

    report = export_all(_settings(config).encoders, out)
    console.print(report)
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    app()
