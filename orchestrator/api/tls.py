"""TLS for the listeners, from the `tls` section (PEM files): gRPC credentials and the
HTTP server's SSL context, built from the same files so both doors present one
certificate and, with `client_ca_file`, require client certificates from one CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from orchestrator.config.settings import ServiceConfig
from orchestrator.domain.errors import ConfigError


def _read(config: ServiceConfig, setting: str, value: str) -> bytes:
    path = config.path(value)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{setting} {str(path)!r}: {exc.strerror}") from None


def grpc_credentials(config: ServiceConfig) -> grpc.ServerCredentials:
    tls = config.tls
    assert tls.cert_file and tls.key_file
    pair = (_read(config, "key_file", tls.key_file), _read(config, "cert_file", tls.cert_file))
    ca = _read(config, "client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    try:
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"tls: the certificate or key is not usable: {exc}") from None


def http_context(config: ServiceConfig) -> ssl.SSLContext:
    tls = config.tls
    assert tls.cert_file and tls.key_file
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.path(tls.cert_file), config.path(tls.key_file))
        if tls.client_ca_file:
            context.load_verify_locations(config.path(tls.client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: the certificate, key or CA is not usable: {exc}") from None
    return context


def http_common_name(peercert: object) -> str:
    """The common name of a verified peer certificate as `SSLObject.getpeercert()` gives it."""
    if not isinstance(peercert, dict):
        return ""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
