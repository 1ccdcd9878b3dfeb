"""Credentials to identities: the only way a caller gets one (SECURITY.md).

A bearer token is looked up by its SHA-256: the configuration holds only hashes, and
the lookup compares hashes, so neither a file nor a timing difference gives a token
away. Tokens are generated with 256 bits of entropy (`new_token`), which is why an
unsalted hash is enough: there is nothing to guess that a salt would slow down.

`Credentials` is an immutable snapshot; `CredentialStore` holds the current one and
replaces it when `auth.keys_file` changes (checked at most once a second) or on
`reload()` (SIGHUP). A file that no longer parses keeps the previous keys and says why;
so does one that changed while it was read (a writer not done yet could leave a line
cut short that still parses, `tenant: acme` of `tenant: acme-prod`): it is read again
at the next check. Replacing the file by a rename is the safe way to edit it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.records import build, convert, parse_yaml
from orchestrator.config.settings import ApiKey, ServiceConfig
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.identity import LOCAL_OPERATOR, Identity, Role
from orchestrator.support.log import get_logger

log = get_logger("auth")

TOKEN_PREFIX = "orch_"
MAX_TOKEN_CHARS = 256  # a longer Authorization value is refused before it is hashed
_HEX64 = re.compile(r"[0-9a-f]{64}")
RECHECK_S = 1.0
CERT = "cert:"  # an Identity.credential naming a client certificate's common name


def new_token() -> str:
    """A fresh API key: 256 random bits, prefixed so that leaked keys are easy to grep."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """The identities the configured keys and certificate names stand for."""

    by_hash: Mapping[str, Identity]
    by_cert_cn: Mapping[str, Identity]

    def holds(self, identity: Identity) -> bool:
        """Whether the credential `identity` was admitted by still stands for it
        (a removed key ends the streams it opened)."""
        credential = identity.credential
        if credential.startswith(CERT):
            return self.by_cert_cn.get(credential.removeprefix(CERT)) == identity
        return self.by_hash.get(credential) == identity

    def for_token(self, token: str) -> Identity | None:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        return self.by_hash.get(token_hash(token))

    def for_certificate(self, common_name: str) -> Identity | None:
        return self.by_cert_cn.get(common_name) if common_name else None


def credentials_from(keys: tuple[ApiKey, ...], where: str) -> Credentials:
    """Check every key and index it; ConfigError names the first bad entry."""
    by_hash: dict[str, Identity] = {}
    by_cn: dict[str, Identity] = {}
    names: set[str] = set()
    for i, key in enumerate(keys):
        at = f"{where}[{i}] ({key.name!r})"
        if key.name in names:
            raise ConfigError(f"{at}: the name is used twice")
        if key.name == LOCAL_OPERATOR.name:
            raise ConfigError(f"{at}: {key.name!r} is reserved for the caller when no keys are set")
        names.add(key.name)
        try:
            role = Role(key.role)
        except ValueError:
            raise ConfigError(f"{at}: role must be one of {[r.value for r in Role]}") from None
        if role == Role.TENANT and not key.tenant:
            raise ConfigError(f"{at}: a tenant key names its tenant (tenant: ...)")
        if role == Role.POOL and not key.pools:
            raise ConfigError(f"{at}: a pool key names the pool ids it speaks for (pools: [...])")
        if role != Role.TENANT and key.tenant:
            raise ConfigError(f"{at}: only a tenant key names a tenant")
        if role != Role.POOL and key.pools:
            raise ConfigError(f"{at}: only a pool key names pools")
        if not key.sha256 and not key.cert_cn:
            raise ConfigError(f"{at}: give sha256 (of the token) or cert_cn (mutual TLS)")
        identity = Identity(key.name, role, key.tenant, frozenset(key.pools))
        if key.sha256:
            digest = key.sha256.lower()
            if not _HEX64.fullmatch(digest):
                raise ConfigError(
                    f"{at}: sha256 must be 64 hex digits (the hash, never the token itself)"
                )
            if digest in by_hash:
                raise ConfigError(f"{at}: the same key is listed twice")
            by_hash[digest] = dataclasses.replace(identity, credential=digest)
        if key.cert_cn:
            if key.cert_cn in by_cn:
                raise ConfigError(f"{at}: cert_cn {key.cert_cn!r} is listed twice")
            by_cn[key.cert_cn] = dataclasses.replace(identity, credential=CERT + key.cert_cn)
    return Credentials(by_hash, by_cn)


def load_credentials(config: ServiceConfig) -> Credentials:
    """The inline `auth.keys` plus those of `auth.keys_file`."""
    keys = config.auth.keys
    where = "auth.keys"
    if config.auth.keys_file:
        path = config.path(config.auth.keys_file)
        keys = keys + _read_keys_file(path)
        where = f"auth.keys + {path}"
    return credentials_from(keys, where)


def _read_keys_file(path: Path) -> tuple[ApiKey, ...]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    data: Any = parse_yaml(text, str(path)) or {}
    if not isinstance(data, Mapping) or set(data) - {"keys"}:
        raise ConfigError(f"{path}: expected a mapping with one key, `keys:` (a list)")
    raw = convert(list[Any], data.get("keys") or [], f"{path}.keys")
    return tuple(build(ApiKey, item, f"{path}.keys[{i}]") for i, item in enumerate(raw))


class CredentialStore:
    """The current credentials; follows `auth.keys_file` without a restart."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._file = config.path(config.auth.keys_file) if config.auth.keys_file else None
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self.current = load_credentials(config)

    def get(self) -> Credentials:
        now = time.monotonic()
        if self._file is not None and now - self._checked >= RECHECK_S:
            self._checked = now
            if self._file_stamp() != self._stamp:
                self.reload()
        return self.current

    def reload(self) -> None:
        """Re-read the keys; on a bad file keep the current ones (and say so)."""
        stamp = self._file_stamp()
        try:
            fresh = load_credentials(self.config)
        except ConfigError as exc:
            self._stamp = stamp
            log.error("auth.keys_rejected", error=str(exc), kept=len(self.current.by_hash))
            return
        if self._file_stamp() != stamp:  # written to while read: maybe half of it
            log.info("auth.keys_changing", file=str(self._file))
            return  # the stamp stays old: the next check reads it again
        self._stamp = stamp
        if fresh != self.current:
            log.info("auth.keys_loaded", keys=len(fresh.by_hash), certs=len(fresh.by_cert_cn))
        self.current = fresh

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._file is None:
            return None
        try:
            st = os.stat(self._file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)
