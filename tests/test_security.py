"""TLS, mTLS and the bearer token against a real grpc.aio server on 127.0.0.1, with certificates
made here; secrets from files, masked in logs; Kafka TLS settings as the clients take them."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError
from qdrant_client import QdrantClient
from typer.testing import CliRunner

from fusionrec import logs
from fusionrec.cli import app as cli
from fusionrec.kafka_auth import faust_credentials, kafka_python_options
from fusionrec.settings import KafkaSettings, Settings, load_settings
from serving.client import RankerClient
from serving.server import start_server
from tests.test_ranker import BackgroundServer, _fill

TOKEN = "s3cret-token-for-tests"


class Pki:
    """A CA, and certificates it signed, as PEM files in a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = self._builder(self.name, self.key).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        self.ca = self._write(f"{name}-ca", cert.sign(self.key, hashes.SHA256()))

    def issue(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) for 127.0.0.1 signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            self._builder(subject, key)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_path = self.folder / f"{name}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return self._write(name, cert), key_path

    def _builder(
        self, subject: x509.Name, key: ec.EllipticCurvePrivateKey
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def _write(self, name: str, cert: x509.Certificate) -> Path:
        path = self.folder / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"), "fusionrec-test")


def _serve(tmp: Path, **security: object) -> Iterator[BackgroundServer]:
    settings = Settings(
        data_dir=tmp, ranker={"modality_weights": {"text": 1.0, "image": 1.0}}, security=security
    )
    store = QdrantClient(":memory:")
    _fill(store, settings)
    running = BackgroundServer(settings, store)
    yield running
    running.close()
    store.close()


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    cert, key = pki.issue("ranker")
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN + "\n")
    yield from _serve(
        tmp_path_factory.mktemp("tls"), cert_file=cert, key_file=key, token_file=token_file
    )


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    cert, key = pki.issue("ranker-m")
    yield from _serve(
        tmp_path_factory.mktemp("mtls"), cert_file=cert, key_file=key, client_auth_ca_file=pki.ca
    )


def _target(server: BackgroundServer) -> str:
    return f"127.0.0.1:{server.ranker.port}"


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_tls_with_the_token_is_served(pki: Pki, tls_server: BackgroundServer) -> None:
    with RankerClient(_target(tls_server), root_certificates=pki.ca.read_bytes(), token=TOKEN) as c:
        assert [i.item_id for i in c.recommend("u-image", 2).items] == ["i1", "i2"]
        assert c.health() == "SERVING"


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1]])
def test_calls_without_the_right_token_are_unauthenticated(
    pki: Pki, tls_server: BackgroundServer, token: str | None
) -> None:
    with RankerClient(_target(tls_server), root_certificates=pki.ca.read_bytes(), token=token) as c:
        assert _code(lambda: c.recommend("u-image")) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: c.similar("i1")) == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open to probes and load balancers.
        assert c.health() == "SERVING"
        reflection = reflection_pb2_grpc.ServerReflectionStub(c._channel)
        listing = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        assert _code(lambda: list(listing)) == grpc.StatusCode.UNAUTHENTICATED
    # The server goes on serving those who have it.
    with RankerClient(_target(tls_server), root_certificates=pki.ca.read_bytes(), token=TOKEN) as c:
        assert c.recommend("u-image", 1).items


def test_plaintext_and_untrusted_clients_cannot_connect(
    tls_server: BackgroundServer, tmp_path: Path
) -> None:
    with RankerClient(_target(tls_server), timeout=3) as plain:
        assert _code(plain.health) == grpc.StatusCode.UNAVAILABLE
    stranger = Pki(tmp_path, "someone-else")
    with RankerClient(
        _target(tls_server), root_certificates=stranger.ca.read_bytes(), token=TOKEN, timeout=3
    ) as c:
        assert _code(c.health) == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_from_the_ca(
    pki: Pki, mtls_server: BackgroundServer, tmp_path: Path
) -> None:
    ca = pki.ca.read_bytes()
    with RankerClient(_target(mtls_server), root_certificates=ca, timeout=3) as anonymous:
        assert _code(anonymous.health) == grpc.StatusCode.UNAVAILABLE
    cert, key = Pki(tmp_path, "other").issue("intruder")
    with RankerClient(
        _target(mtls_server),
        root_certificates=ca,
        certificate_chain=cert.read_bytes(),
        private_key=key.read_bytes(),
        timeout=3,
    ) as intruder:
        assert _code(intruder.health) == grpc.StatusCode.UNAVAILABLE
    cert, key = pki.issue("good-client")
    settings = Settings(
        ranker={"port": mtls_server.ranker.port},
        security={"ca_file": pki.ca, "client_cert_file": cert, "client_key_file": key},
    )
    with RankerClient.from_settings(settings) as c:
        assert c.recommend("u-image", 1).items[0].item_id == "i1"


def test_cli_recommend_takes_the_root_certificate_and_token_file(
    pki: Pki, tls_server: BackgroundServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    where = ["--host", "127.0.0.1", "--port", str(tls_server.ranker.port), "--tls-ca", str(pki.ca)]
    ok = CliRunner().invoke(
        cli, ["recommend", "u-image", "--limit", "2", *where, "--token-file", str(token_file)]
    )
    assert ok.exit_code == 0, ok.output
    assert "Red Sunset" in ok.output
    refused = CliRunner().invoke(cli, ["similar", "i1", *where])
    assert refused.exit_code != 0
    assert refused.exception.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[union-attr]


def test_a_token_never_travels_in_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TLS"):
        RankerClient("127.0.0.1:1", token=TOKEN)
    settings = Settings(data_dir=tmp_path, security={"token": TOKEN})
    with pytest.raises(ValueError, match="TLS"):
        asyncio.run(start_server(settings, QdrantClient(":memory:"), port=0))


def test_secrets_come_from_files_and_stay_hidden(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("qdrant-key\n")
    (tmp_path / "pw").write_text("kafka-pw")
    s = load_settings(
        qdrant={"api_key_file": tmp_path / "key"}, kafka={"sasl_password_file": tmp_path / "pw"}
    )
    assert s.qdrant.api_key and s.qdrant.api_key.get_secret_value() == "qdrant-key"
    assert s.kafka.sasl_password and s.kafka.sasl_password.get_secret_value() == "kafka-pw"
    assert "qdrant-key" not in repr(s) and "kafka-pw" not in s.model_dump_json()
    # Read once: the settings validate again from their own dump.
    assert Settings.model_validate(s.model_dump()).qdrant.api_key == s.qdrant.api_key
    with pytest.raises(ValidationError, match="not both"):
        load_settings(qdrant={"api_key": "a", "api_key_file": tmp_path / "key"})


def test_json_logs_mask_every_secret(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    try:
        logs.configure(
            Settings(log_format="json", security={"token": TOKEN}, qdrant={"api_key": "qk-123"})
        )
        logging.getLogger("somelib").warning("connecting with %s and key=qk-123", TOKEN)
        try:
            raise RuntimeError(f"auth failed for {TOKEN}")
        except RuntimeError:
            logging.getLogger("somelib").exception("boom")
    finally:
        root.handlers[:], _ = before
        root.setLevel(before[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "connecting with *** and key=***"
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "somelib"
    assert "RuntimeError: auth failed for ***" in lines[1]["exc"]
    assert TOKEN not in json.dumps(lines)


def test_kafka_tls_settings_reach_both_clients(pki: Pki) -> None:
    cert, key = pki.issue("kafka-client")
    k = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="fr",
        sasl_password="pw",
        ssl_cafile=pki.ca,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    faust_creds = faust_credentials(k)
    options = kafka_python_options(k)
    for context in (faust_creds.ssl_context, options["ssl_context"]):  # type: ignore[union-attr]
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert any("fusionrec-test" in str(c["subject"]) for c in context.get_ca_certs())
    assert faust_creds.protocol.value == "SASL_SSL" and faust_creds.password == "pw"  # type: ignore[union-attr]
    assert options["sasl_plain_password"] == "pw" and options["security_protocol"] == "SASL_SSL"
    plain = KafkaSettings(ssl_cafile=pki.ca)
    assert faust_credentials(plain) is None and kafka_python_options(plain)["ssl_context"] is None
    assert faust_credentials(KafkaSettings(security_protocol="SSL")).protocol.value == "SSL"  # type: ignore[union-attr]
