"""Load an item's media bytes from a path under the media root, a URL, or inline data.

Every refusal is a MediaError (a ValueError) whose message says why; the caller dead-letters it.
- path: resolved (symlinks followed) under `media.root`; anything resolving outside is refused;
- url: only with `fetch_remote`, an allowed scheme and (when listed) an allowed host; every
  address the host resolves to must be public unless `allow_private_addresses`. The connection
  goes to the checked address (TLS still verifies the host name), so a DNS answer cannot change
  between check and fetch; redirects are followed by hand and checked the same way;
- data: bytes as given, or a base64 string;
- all three are capped at `max_bytes`; a download is streamed and cut at the cap and at the
  total deadline `fetch_timeout_s`, whatever Content-Length says.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from fusionrec.settings import MediaSettings

MAX_REDIRECTS = 3


class MediaError(ValueError):
    """Media that may not or cannot be loaded; the message is the dead-letter reason."""


def load_media(ref: Any, settings: MediaSettings) -> bytes:
    """`ref` has attributes path, url, data, exactly one of them not None."""
    given = [k for k in ("path", "url", "data") if getattr(ref, k, None) is not None]
    if len(given) != 1:
        raise MediaError(f"media needs exactly one of path, url, data; got {given or 'none'}")
    if given[0] == "path":
        return _read_path(ref.path, settings)
    if given[0] == "url":
        return _fetch(ref.url, settings)
    return _inline(ref.data, settings.max_bytes)


def _inline(data: bytes | str, max_bytes: int) -> bytes:
    if isinstance(data, str):
        if len(data) > 4 * (max_bytes // 3 + 1):  # refuse before decoding a huge string
            raise MediaError(f"inline media is over the {max_bytes}-byte cap")
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"inline media is not valid base64: {exc}") from exc
    data = bytes(data)
    if len(data) > max_bytes:
        raise MediaError(f"inline media is {len(data)} bytes, over the {max_bytes}-byte cap")
    return data


def _read_path(path: str, settings: MediaSettings) -> bytes:
    root = Path(settings.root).resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root, then is checked
    except (OSError, ValueError) as exc:
        raise MediaError(f"media path {path!r} is invalid: {exc}") from exc
    if not resolved.is_relative_to(root):
        raise MediaError(f"media path {path!r} resolves outside the media root")
    if not resolved.is_file():
        raise MediaError(f"media path {path!r} is not a file under the media root")
    with resolved.open("rb") as f:
        data = f.read(settings.max_bytes + 1)  # never trust a size read before the read
    if len(data) > settings.max_bytes:
        raise MediaError(f"media file {path!r} is over the {settings.max_bytes}-byte cap")
    return data


def _fetch(url: str, settings: MediaSettings) -> bytes:
    if not settings.fetch_remote:
        raise MediaError("fetching remote media is off (media.fetch_remote)")
    deadline = time.monotonic() + settings.fetch_timeout_s
    with httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target, host = _checked_target(url, settings)
            request = client.build_request(
                "GET",
                target,
                headers={"Host": _host_header(url)},
                extensions={"sni_hostname": host},
            )
            try:
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = str(httpx.URL(url).join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"fetching {url} gave HTTP {response.status_code}")
                    return _read_capped(response, settings.max_bytes, deadline, url)
                finally:
                    response.close()
            except httpx.TimeoutException as exc:
                raise MediaError(f"fetching {url} timed out") from exc
            except httpx.HTTPError as exc:
                raise MediaError(f"fetching {url} failed: {exc}") from exc
    raise MediaError(f"fetching {url}: more than {MAX_REDIRECTS} redirects")


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, url: str) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise MediaError(f"media at {url} is over the {max_bytes}-byte cap")
        if time.monotonic() > deadline:
            raise MediaError(f"fetching {url} timed out")
    return bytes(body)


def _host_header(url: str) -> str:
    parsed = httpx.URL(url)
    return parsed.netloc.decode("ascii").rsplit("@", 1)[-1]


def _checked_target(url: str, settings: MediaSettings) -> tuple[httpx.URL, str]:
    """Validate scheme, host and addresses; returns the URL pinned to a checked address."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise MediaError(f"media URL {url!r} is invalid: {exc}") from exc
    scheme, host = parsed.scheme.lower(), (parsed.host or "").lower()
    if scheme not in [s.lower() for s in settings.allowed_schemes]:
        raise MediaError(f"media URL scheme {scheme!r} is not allowed")
    if not host:
        raise MediaError(f"media URL {url!r} has no host")
    if settings.allowed_hosts and host not in [h.lower() for h in settings.allowed_hosts]:
        raise MediaError(f"media host {host!r} is not in the allowed hosts")
    port = parsed.port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MediaError(f"media host {host!r} does not resolve: {exc}") from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not settings.allow_private_addresses:
        for address in addresses:
            if not _is_public(address):
                raise MediaError(f"media host {host!r} resolves to non-public address {address}")
    return parsed.copy_with(host=str(addresses[0])), host


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
