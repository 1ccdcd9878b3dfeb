"""`orchestratord auth new-key`: make an API key and the entry that configures it;
`orchestratord auth dev-certs`: certificates to try TLS with.

The key is printed once (or written to a new 0600 file with --key-file); the entry
for `auth.keys` or the keys file holds only its SHA-256 (SECURITY.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.credentials import credentials_from, new_token, token_hash
from orchestrator.config.settings import ApiKey
from orchestrator.domain.errors import ConfigError, UsageError
from orchestrator.domain.identity import Role
from orchestrator.support.files import write_secret


def add_commands(commands: Any) -> None:
    auth = commands.add_parser("auth", help="API keys for tenants, operators and pools")
    sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    new = sub.add_parser(
        "new-key",
        help="make an API key; print it once, and the keys-file entry that holds its hash",
    )
    new.add_argument("--name", required=True, help="who holds it (audit lines name it)")
    new.add_argument("--role", required=True, choices=[r.value for r in Role])
    new.add_argument("--tenant", help="role tenant: the tenant it acts for")
    new.add_argument("--pool", action="append", default=[], help="role pool: a pool id (repeat)")
    new.add_argument("--key-file", help="write the key to this new file (mode 0600) instead")
    certs = sub.add_parser(
        "dev-certs",
        help="a throwaway CA, server and client certificates in DIR, to try (mutual) TLS",
    )
    certs.add_argument("directory", type=Path)
    certs.add_argument("--host", action="append", default=[],
                       help="a name or address clients use for the core (repeat)")  # fmt: skip
    certs.add_argument("--client", action="append", default=[],
                       help="a client certificate for this common name (repeat)")  # fmt: skip


def auth_command(args: argparse.Namespace) -> int:
    if args.auth_command == "dev-certs":
        return _dev_certs(args)
    token = new_token()
    entry = ApiKey(
        name=args.name, role=args.role, sha256=token_hash(token), tenant=args.tenant or None,
        pools=tuple(args.pool),
    )  # fmt: skip
    try:
        credentials_from((entry,), "the new key")  # the same checks the service makes
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.key_file:
        try:
            write_secret(Path(args.key_file), (token + "\n").encode())
        except OSError as exc:
            raise UsageError(f"--key-file {args.key_file}: {exc.strerror}") from None
        print(f"# the key is in {args.key_file}", file=sys.stderr)
    else:
        print(f"# the API key, shown once: give it to {args.name}\n{token}", file=sys.stderr)
    # Who the key stands for first, the hash last: a line cut short while the file is
    # written then breaks the entry instead of naming another tenant or pool.
    row: dict[str, object] = {"name": entry.name, "role": entry.role}
    if entry.tenant:
        row["tenant"] = entry.tenant
    if entry.pools:
        row["pools"] = list(entry.pools)
    row["sha256"] = entry.sha256
    print("# add to auth.keys, or to the `keys:` list of auth.keys_file:")
    print(yaml.safe_dump([row], sort_keys=False), end="")
    return 0


def _dev_certs(args: argparse.Namespace) -> int:
    from orchestrator.cli.certs import make_pki  # noqa: PLC0415 - cryptography is slow to import

    if args.directory.exists() and any(args.directory.iterdir()):
        raise UsageError(f"{args.directory}: not empty; give a new directory")
    pki = make_pki(args.directory, tuple(args.host))
    clients = [pki.client(name) for name in args.client]
    print(f"tls:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}")
    if clients:
        print(f"  client_ca_file: {pki.ca}")
    print(f"# clients: --tls-ca {pki.ca}", file=sys.stderr)
    for cert, key in clients:
        print(f"#   --tls-cert {cert} --tls-key {key}", file=sys.stderr)
    return 0
