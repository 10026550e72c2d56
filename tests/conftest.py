"""One embedded stack for all integration tests: `fusionrec up` as a real process (Tansu broker
subprocess, Qdrant local mode, Faust worker, gRPC ranker), started once per session."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fusionrec.broker import free_port
from fusionrec.demo import make_item
from fusionrec.launcher import spawn_stack
from fusionrec.publisher import Publisher
from fusionrec.settings import Settings, load_settings
from serving.client import RankerClient

# Small enough that an oversized-payload test stays cheap.
MAX_MESSAGE_BYTES = 256 * 1024


@dataclass
class Stack:
    process: subprocess.Popen
    bootstrap: str
    target: str
    media: Path
    settings: Settings
    client: RankerClient
    publisher: Publisher
    rng: np.random.Generator
    metrics_url: str = ""  # the stack's Prometheus endpoint

    def item(self, theme: str, item_id: str, **overrides) -> dict:
        """A catalog item with a drawn image in `theme` (see fusionrec.demo)."""
        return {**make_item(self.media, theme, item_id, self.rng), **overrides}

    def wait(self, what: str, check, timeout: float = 60.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.process.poll() is None, "the stack died"
            if check():
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def known(self, item_id: str) -> bool:
        try:
            self.client.similar(item_id, 1)
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return False


@pytest.fixture(scope="session")
def kcat(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The kcat command line, run with a librdkafka that speaks to the embedded broker.

    Debian bookworm's librdkafka 2.0.2 misreads Tansu's ApiVersion v3 reply (its tagged
    fields) and gives up; kcat itself is fine with the newer librdkafka that the
    confluent-kafka wheel bundles, so it is loaded in its place.
    """
    exe = shutil.which("kcat")
    if exe is None:
        pytest.skip("kcat is not installed (apt-get install kcat)")
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    bundled = next(libs.glob("librdkafka*.so*"), None)
    if bundled is None:
        return [exe]
    libdir = tmp_path_factory.mktemp("librdkafka")
    (libdir / "librdkafka.so.1").symlink_to(bundled)
    return ["env", f"LD_LIBRARY_PATH={libdir}", exe]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    media = root / "media"
    media.mkdir()
    metrics_port = free_port()
    child = spawn_stack(
        root,
        {
            "FUSIONREC_KAFKA__MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
            "FUSIONREC_MEDIA__ROOT": str(media),
            # Audio has its own tests; the pipeline tests need text and image.
            "FUSIONREC_ENCODERS__ENABLED": '["text", "image"]',
            "FUSIONREC_METRICS__PORT": str(metrics_port),
        },
    )
    client = RankerClient(child.target, timeout=10)
    settings = load_settings(
        kafka={"bootstrap": child.bootstrap, "max_message_bytes": MAX_MESSAGE_BYTES}
    )
    stack = Stack(
        child.process,
        child.bootstrap,
        child.target,
        media,
        settings,
        client,
        None,  # type: ignore[arg-type]
        np.random.default_rng(0),
    )
    stack.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    try:
        stack.wait("the stack to serve", client.serving, timeout=300)
        stack.publisher = Publisher(settings)
        yield stack
    finally:
        client.close()
        if stack.publisher is not None:
            stack.publisher.close()
        child.stop()
        print(child.log_tail(3000))
