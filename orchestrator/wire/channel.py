"""Client channels to the core, with the caller's credentials (SECURITY.md).

The CLI and `orchestratord pool-manager` connect through `open_channel`. The API key
comes from `--token-file`, else the file named by ORCHESTRATOR_TOKEN_FILE, else the
key itself in ORCHESTRATOR_TOKEN; it is sent as `authorization: Bearer <key>` on
every call. `--tls-ca` turns on TLS and verifies the core against that CA;
`--tls-cert`/`--tls-key` add a client certificate (mutual TLS). A key is never sent
in the clear to anything but a loopback address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from orchestrator.config.settings import LOOPBACK_HOSTS, listen_host
from orchestrator.domain.errors import UsageError

TOKEN_ENV = "ORCHESTRATOR_TOKEN"
TOKEN_FILE_ENV = "ORCHESTRATOR_TOKEN_FILE"
TLS_CA_ENV = "ORCHESTRATOR_TLS_CA"


@dataclass(frozen=True)
class ClientAuth:
    token: str = ""
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    server_name: str = ""  # the name to check in the core's certificate, if not the address's

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    @classmethod
    def resolve(
        cls,
        *,
        token_file: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        server_name: str = "",
        env: Mapping[str, str] = os.environ,
    ) -> ClientAuth:
        """From command-line values, falling back to the environment."""
        token_file = token_file or env.get(TOKEN_FILE_ENV) or None
        token = _read(token_file, "--token-file").decode().strip() if token_file else ""
        token = token or env.get(TOKEN_ENV, "").strip()
        tls_ca = tls_ca or env.get(TLS_CA_ENV) or None
        if bool(tls_cert) != bool(tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        return cls(
            token=token,
            tls_ca=_read(tls_ca, "--tls-ca") if tls_ca else None,
            tls_cert=_read(tls_cert, "--tls-cert") if tls_cert else None,
            tls_key=_read(tls_key, "--tls-key") if tls_key else None,
            server_name=server_name,
        )


def add_client_arguments(parser: Any) -> None:
    """The connection options every command that talks to the core takes."""
    parser.add_argument("--token-file", help=f"a file holding the API key (or ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", help=f"TLS: the CA that signed the core's certificate "
                        f"(or ${TLS_CA_ENV})")  # fmt: skip
    parser.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    parser.add_argument("--tls-key", help="mutual TLS: this client's private key (PEM)")
    parser.add_argument("--tls-server-name", default="",
                        help="the name to expect in the core's certificate")  # fmt: skip


def auth_from_arguments(args: Any) -> ClientAuth:
    return ClientAuth.resolve(
        token_file=args.token_file, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, server_name=args.tls_server_name,
    )  # fmt: skip


def open_channel(address: str, auth: ClientAuth) -> aio.Channel:
    interceptors = [_UnaryKey(auth.token), _StreamKey(auth.token)] if auth.token else []
    if auth.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=auth.tls_ca, private_key=auth.tls_key,
            certificate_chain=auth.tls_cert,
        )  # fmt: skip
        options = [("grpc.ssl_target_name_override", auth.server_name)] if auth.server_name else []
        return aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    if auth.token and listen_host(address) not in LOOPBACK_HOSTS:
        raise UsageError(
            f"{address}: an API key is sent only over TLS to a host that is not loopback "
            "(give --tls-ca)"
        )
    return aio.insecure_channel(address, interceptors=interceptors)


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}") from None


class _WithKey:
    """Adds `authorization: Bearer <key>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def with_key(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()), self.header)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready,
        )  # fmt: skip


# grpc.aio files each interceptor under the first kind it is, so one class per kind.
class _UnaryKey(_WithKey, aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.with_key(details), request)


class _StreamKey(_WithKey, aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.with_key(details), request)
