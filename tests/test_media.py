"""load_media: paths stay under the root, URLs are checked and capped, inline data is capped."""

from __future__ import annotations

import base64
import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusionrec.settings import MediaSettings
from streams.media import MediaError, load_media


@dataclass
class Ref:
    path: str | None = None
    url: str | None = None
    data: bytes | str | None = None


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    (media / "posters").mkdir(parents=True)
    (media / "posters" / "1.jpg").write_bytes(b"poster-bytes")
    (tmp_path / "secret.txt").write_text("outside the root")
    return media


def test_path_under_root_loads(root: Path) -> None:
    assert load_media(Ref(path="posters/1.jpg"), MediaSettings(root=root)) == b"poster-bytes"
    absolute = str(root / "posters" / "1.jpg")
    assert load_media(Ref(path=absolute), MediaSettings(root=root)) == b"poster-bytes"


@pytest.mark.parametrize("path", ["../secret.txt", "posters/../../secret.txt", "/etc/passwd"])
def test_path_traversal_refused(root: Path, path: str) -> None:
    with pytest.raises(MediaError, match="outside the media root"):
        load_media(Ref(path=path), MediaSettings(root=root))


def test_symlink_out_of_root_refused(root: Path) -> None:
    (root / "link.txt").symlink_to(root.parent / "secret.txt")
    with pytest.raises(MediaError, match="outside the media root"):
        load_media(Ref(path="link.txt"), MediaSettings(root=root))


def test_missing_and_oversized_files_refused(root: Path) -> None:
    with pytest.raises(MediaError, match="not a file"):
        load_media(Ref(path="posters/2.jpg"), MediaSettings(root=root))
    with pytest.raises(MediaError, match="cap"):
        load_media(Ref(path="posters/1.jpg"), MediaSettings(root=root, max_bytes=5))


def test_inline_data_bytes_and_base64() -> None:
    settings = MediaSettings()
    assert load_media(Ref(data=b"\x89PNG"), settings) == b"\x89PNG"
    assert load_media(Ref(data=base64.b64encode(b"\x89PNG").decode()), settings) == b"\x89PNG"
    with pytest.raises(MediaError, match="base64"):
        load_media(Ref(data="not base64!"), settings)
    with pytest.raises(MediaError, match="cap"):
        load_media(Ref(data=b"x" * 11), MediaSettings(max_bytes=10))
    with pytest.raises(MediaError, match="cap"):
        load_media(Ref(data=base64.b64encode(b"x" * 100).decode()), MediaSettings(max_bytes=10))


def test_exactly_one_source() -> None:
    with pytest.raises(MediaError, match="exactly one"):
        load_media(Ref(), MediaSettings())
    with pytest.raises(MediaError, match="exactly one"):
        load_media(Ref(path="a.jpg", data=b"x"), MediaSettings())


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(2.0)
        if self.path == "/redirect-out":
            self.send_response(302)
            self.send_header("Location", "ftp://example.com/x")
            self.end_headers()
            return
        body = b"x" * (5000 if self.path == "/big" else 100)
        self.send_response(200)
        if self.path != "/big":  # /big streams until close: only counting bytes can cap it
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the cap hung up
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def local(**overrides: object) -> MediaSettings:
    base = {"fetch_remote": True, "allowed_schemes": ["http"], "allow_private_addresses": True}
    return MediaSettings(**{**base, **overrides})


def test_fetch_from_local_server(server: str) -> None:
    assert load_media(Ref(url=f"{server}/ok"), local()) == b"x" * 100


def test_fetch_size_cap_while_streaming(server: str) -> None:
    with pytest.raises(MediaError, match="cap"):
        load_media(Ref(url=f"{server}/big"), local(max_bytes=1000))


def test_fetch_timeout(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        load_media(Ref(url=f"{server}/slow"), local(fetch_timeout_s=0.3))
    assert time.monotonic() - started < 1.5


def test_redirect_is_checked_again(server: str) -> None:
    with pytest.raises(MediaError, match="scheme 'ftp'"):
        load_media(Ref(url=f"{server}/redirect-out"), local())


def test_loopback_refused_by_default(server: str) -> None:
    settings = MediaSettings(fetch_remote=True, allowed_schemes=["http", "https"])
    with pytest.raises(MediaError, match="non-public address"):
        load_media(Ref(url=f"{server}/ok"), settings)
    with pytest.raises(MediaError, match="non-public address"):
        load_media(Ref(url="http://localhost/x"), settings)


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/x", "http://169.254.169.254/latest", "http://[::1]/x", "http://0.0.0.0/"],
)
def test_private_addresses_refused(url: str) -> None:
    settings = MediaSettings(fetch_remote=True, allowed_schemes=["http"])
    with pytest.raises(MediaError, match="non-public address"):
        load_media(Ref(url=url), settings)


def test_scheme_host_and_switch_refused(server: str) -> None:
    with pytest.raises(MediaError, match="fetch_remote"):
        load_media(Ref(url=f"{server}/ok"), MediaSettings())
    with pytest.raises(MediaError, match="scheme 'file'"):
        load_media(Ref(url="file:///etc/passwd"), local())
    with pytest.raises(MediaError, match="scheme 'http'"):
        load_media(Ref(url=f"{server}/ok"), local(allowed_schemes=["https"]))
    with pytest.raises(MediaError, match="allowed hosts"):
        load_media(Ref(url=f"{server}/ok"), local(allowed_hosts=["images.example.com"]))
