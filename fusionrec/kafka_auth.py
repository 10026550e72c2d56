"""Kafka security settings turned into what each client takes: Faust's credentials (the
worker) and kafka-python's options (the publisher), from one SSL context."""

from __future__ import annotations

import ssl
from typing import Any

import faust
from faust.types.auth import CredentialsT

from fusionrec.settings import KafkaSettings


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """For security_protocol SSL or SASL_SSL: verify the brokers against ssl_cafile (default:
    the system roots); present ssl_certfile/ssl_keyfile when set (mutual TLS)."""
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=k.ssl_cafile)
    if k.ssl_certfile:
        context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
    return context


def faust_credentials(k: KafkaSettings) -> CredentialsT | None:
    context = ssl_context(k)
    if k.security_protocol.startswith("SASL"):
        # An SSL context makes Faust speak SASL_SSL, none SASL_PLAINTEXT.
        return faust.SASLCredentials(
            username=k.sasl_username,
            password=k.sasl_password.get_secret_value() if k.sasl_password else None,
            mechanism=k.sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context else None


def kafka_python_options(k: KafkaSettings) -> dict[str, Any]:
    return {
        "security_protocol": k.security_protocol,
        "ssl_context": ssl_context(k),
        "sasl_mechanism": k.sasl_mechanism,
        "sasl_plain_username": k.sasl_username,
        "sasl_plain_password": k.sasl_password.get_secret_value() if k.sasl_password else None,
    }
