"""Logging for every role: text or one JSON object per line, secrets masked in either."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, SecretStr

from fusionrec.settings import Settings

MASK = "***"


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message"[, "exc"]}: what a log shipper indexes."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class MaskSecrets(logging.Formatter):
    """Wraps a formatter and replaces every known secret in its output (message, arguments,
    traceback), whoever logged it: a library that prints a connection string included."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


def secrets_of(model: BaseModel) -> Iterator[str]:
    """Every SecretStr value in a settings tree."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield value.get_secret_value()
        elif isinstance(value, BaseModel):
            yield from secrets_of(value)


def configure(settings: Settings) -> None:
    """Set the root logger up once for this process, per log_level and log_format."""
    inner = (
        JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler = logging.StreamHandler()
    handler.setFormatter(MaskSecrets(inner, secrets_of(settings)))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
