"""One settings object for every role: flags > environment (FUSIONREC_*) > TOML file > defaults.

Nested fields use `__` in the environment, e.g. `FUSIONREC_RANKER__PORT=50061`.
The config file is named by `--config` or `FUSIONREC_CONFIG`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MODALITIES = ("text", "image", "audio")


class _Section(BaseModel):
    # A misspelt setting is an error, not a silent default.
    model_config = ConfigDict(extra="forbid")


def _read_secret_files(section: BaseModel, *names: str) -> None:
    """Fill each SecretStr `name` from `name_file` (a mounted secret), so secrets never need to
    be flags or plain config; giving both is an error. The file setting is cleared once read,
    so the section validates again from its own dump."""
    for name in names:
        path = getattr(section, f"{name}_file")
        if path is None:
            continue
        if getattr(section, name) is not None:
            raise ValueError(f"set {name} or {name}_file, not both")
        setattr(section, name, SecretStr(Path(path).read_text().strip()))
        setattr(section, f"{name}_file", None)


class KafkaSettings(_Section):
    # None means the embedded Tansu broker (started by `fusionrec up` on embedded_port);
    # a real cluster is "host:port[,host:port]".
    bootstrap: str | None = None
    embedded_port: int = 19092
    # Set by `fusionrec up` when it runs the embedded broker: turns on the Tansu workarounds.
    embedded: bool = False
    # The embedded consumer's fetch wait (Tansu holds a fetch for about half of it, data or not):
    # receive latency against the idle cost of polling (streams/app.py `_shorten_fetch_wait`).
    embedded_fetch_wait_ms: int = Field(20, ge=1, le=1500)
    items_topic: str = "items"
    events_topic: str = "events"
    dead_letters_topic: str = "dead-letters"
    partitions: int = 1
    # Messages above this size are dead-lettered instead of decoded.
    max_message_bytes: int = 4 * 1024 * 1024
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    # TLS to the brokers (security_protocol SSL or SASL_SSL), PEM files; no cafile = system roots.
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _secrets(self) -> KafkaSettings:
        _read_secret_files(self, "sasl_password")
        return self


class QdrantSettings(_Section):
    # None means local mode on `<data_dir>/qdrant`.
    url: str | None = None
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    items_collection: str = "items"
    users_collection: str = "users"
    # Bookkeeping without vectors (the popularity delivery ledger).
    meta_collection: str = "fusionrec_meta"

    @model_validator(mode="after")
    def _secrets(self) -> QdrantSettings:
        _read_secret_files(self, "api_key")
        return self


class EncoderSettings(_Section):
    # Which modalities this deployment encodes; an item's other modalities are ignored.
    enabled: list[str] = Field(default_factory=lambda: ["text", "image", "audio"])
    # sentence-transformers name or local path; "minilm-l6-v2" is the packaged offline default.
    text_model: str = "minilm-l6-v2"
    # "mobilenet_v2" (torchvision, packaged weights) or "open_clip:<arch>" with image_checkpoint.
    image_model: str = "mobilenet_v2"
    image_checkpoint: str | None = None
    audio_model: str = "aisfx"
    batch_size: int = 32
    # "auto" picks CUDA when present.
    device: str = "auto"
    # Threads each encoder runs on; modalities may run at once (worker.encode_threads), so up to
    # their product are busy while a batch encodes.
    threads: int = 1
    # Folder holding exported ONNX models; the onnxruntime path is used where one is present.
    onnx_dir: Path | None = None
    # Run the int8 twin of an export where there is one (transformers: text 2.3x faster on 2
    # cores, vectors within a cosine of ~0.01 of the exact ones; see the README).
    int8: bool = False


class MediaSettings(_Section):
    # Item media given as file paths resolve under this folder and never outside it.
    root: Path = Path(".")
    fetch_remote: bool = False
    allowed_schemes: list[str] = Field(default_factory=lambda: ["https"])
    # Empty means any public host; private, loopback and link-local addresses stay refused.
    allowed_hosts: list[str] = Field(default_factory=list)
    allow_private_addresses: bool = False
    fetch_timeout_s: float = 5.0
    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    # Key frames of a video (evenly spread) whose image vectors are averaged into the item's.
    video_frames: int = Field(8, ge=1, le=64)


class ProfileSettings(_Section):
    half_life_days: float = 30.0
    # An item's popularity is its sum of positive event weights decayed with this half-life
    # ("trending"); `inf` keeps the plain all-time sum. 7 days was fitted on MovieLens history
    # (`fusionrec fit`): all-time counts rank last season's hits above this week's.
    popularity_half_life_days: float = Field(7.0, gt=0)
    # Signed weight of each event type; negative types pull the profile away from the item.
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "view": 0.1,
            "click": 0.3,
            "like": 1.0,
            "add_to_cart": 1.5,
            "purchase": 2.0,
            "dislike": -1.0,
            "skip": -0.3,
        }
    )
    # A "rating" event's weight is (value - rating_midpoint) / rating_scale.
    rating_midpoint: float = 3.0
    rating_scale: float = 2.0
    seen_cap: int = 5000
    # The strongest tags a profile keeps an affinity for.
    tag_cap: int = Field(200, ge=1)
    # A positive is co-engaged with the user's previous `co_window` positives; an item keeps
    # counts for its `co_cap` most co-engaged partners. 10 was best on MovieLens history.
    co_window: int = Field(10, ge=1)
    co_cap: int = Field(100, ge=1)
    dedupe_window: int = 2000
    # Events whose item has not arrived are held this long, then dead-lettered.
    pending_ttl_s: float = 7 * 24 * 3600.0
    pending_retry_s: float = 1.0


class RankerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 50051
    modality_weights: dict[str, float] = Field(
        default_factory=lambda: {"text": 1.0, "image": 1.0, "audio": 1.0}
    )
    candidates_per_modality: int = 100
    fresh_candidates: int = 50
    popular_candidates: int = 50
    # How long the fresh and popular lists (the same for every user) are reused: a new item
    # joins the fresh list at most this late (vector search finds it at once). Computing them is
    # two scans of the catalog in Qdrant local mode (~105 ms at 10k items, ~230 ms at 20k): at
    # 0.5 s nearly every Recommend paid for them; at 5 s, at 20k items and one request at a
    # time, about one in 125 did, which set the p99 (300 ms; 74 ms at 15 s, same run).
    prior_cache_ttl_s: float = 15.0
    # Candidates' vectors and content kept in the ranker, so each Recommend reads only the
    # items it lacks (about 7 KB an item with the default encoders: 20,000 is about 140 MB).
    item_cache_size: int = Field(20_000, ge=0)
    popularity_weight: float = 0.05
    recency_weight: float = 0.05
    # Weight of the user's tag affinity (cosine to the item's tags) beside the modalities.
    tag_weight: float = Field(0.5, ge=0)
    recency_half_life_days: float = 7.0
    # Co-engagement: items others engaged next to the user's `co_recent` latest positives
    # join the candidates (up to `co_candidates`) and score log-scaled counts times `co_weight`.
    co_weight: float = Field(1.0, ge=0)
    co_recent: int = Field(3, ge=0)
    co_candidates: int = Field(100, ge=0)
    # Co-engagement counts for a user by this half-life of the time since their last positive,
    # measured on the stream's clock (the newest event among the candidates): it predicts the
    # next positive within a session and hurt long-range rankings after (MovieLens history).
    co_session_half_life_hours: float = Field(24.0, gt=0)
    max_limit: int = 200
    max_id_length: int = 256
    # Ranker calls admitted at once (running or queued); more are refused with
    # RESOURCE_EXHAUSTED at once. Health checks are not counted, so they stay answerable.
    max_in_flight: int = 16
    max_request_bytes: int = 64 * 1024


class WorkerSettings(_Section):
    batch_size: int = 32
    batch_within_s: float = 0.05
    # Threads the modalities of a batch encode on, side by side (1: one after another). Text
    # beside image on 2 cores: MovieLens plot + poster 51 -> 85 items/s in-process (ONNX).
    encode_threads: int = Field(2, ge=1)
    # From SIGTERM/SIGINT to a hard exit (code 70), whatever still waits on the broker.
    stop_deadline_s: float = Field(10.0, gt=0)
    # At a stop, the last offset commit is given up after this long (a replay, not a loss).
    final_commit_s: float = Field(3.0, gt=0)


class SecuritySettings(_Section):
    """gRPC transport security and caller authentication (both ends read this section).

    Health checks need no token (probes and load balancers; they reveal only serving status);
    every other call, reflection included, does when a token is set. A token travels only over
    TLS. Secrets come from the environment or `*_file` settings, never flags.
    """

    # Server: its certificate chain and key (PEM); both set turns TLS on.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Server: clients must present a certificate signed by this CA (mTLS).
    client_auth_ca_file: Path | None = None
    # Server: the bearer token every non-health call must carry. Client: the token it sends.
    token: SecretStr | None = None
    token_file: Path | None = None
    # Client: use TLS, trusting ca_file (default: the system roots); ca_file alone implies TLS.
    tls: bool = False
    ca_file: Path | None = None
    # Client: its own certificate and key for mTLS.
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> SecuritySettings:
        _read_secret_files(self, "token")
        for a, b in (("cert_file", "key_file"), ("client_cert_file", "client_key_file")):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                raise ValueError(f"security.{a} and security.{b} go together")
        if self.client_auth_ca_file and not self.cert_file:
            raise ValueError("security.client_auth_ca_file needs the server's cert_file/key_file")
        return self


class MetricsSettings(_Section):
    # Prometheus text format on http://host:port/metrics; None = no endpoint.
    port: int | None = None
    host: str = "127.0.0.1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FUSIONREC_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Path(".fusionrec")
    log_level: str = "INFO"
    # "json": one JSON object per log line (for log shippers); "text": human-readable.
    log_format: Literal["text", "json"] = "text"
    # BLAS threads of the long-running roles (fusionrec.stack.settle). OpenBLAS's extra threads
    # spin a core each between calls: 2 made an idle embedded ranker ~20% faster at 10k items
    # (local mode scores with numpy) but took a core from the encoder and the fold whenever
    # they ran too.
    blas_threads: int = Field(1, ge=1)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings)
    encoders: EncoderSettings = Field(default_factory=EncoderSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    profiles: ProfileSettings = Field(default_factory=ProfileSettings)
    ranker: RankerSettings = Field(default_factory=RankerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap or f"127.0.0.1:{self.kafka.embedded_port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = _config_file or os.environ.get("FUSIONREC_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)


# The file named by --config for the Settings being built (pydantic-settings sources take no
# arguments); set only inside load_settings, so the process environment is never changed.
_config_file: Path | None = None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; `overrides` are the flags (nested as dicts), highest precedence."""
    global _config_file
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    _config_file = config
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _config_file = None
