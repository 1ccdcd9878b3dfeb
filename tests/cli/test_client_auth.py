"""The CLI as a client of a secured core: keys from a file or the environment, TLS to
a CA, and no key sent in the clear off loopback. Also `auth new-key`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.certs import make_pki
from orchestrator.config.credentials import credentials_from, token_hash
from orchestrator.config.settings import ApiKey
from orchestrator.domain.identity import Role
from orchestrator.wire.channel import ClientAuth
from tests.service_helpers import running_service, write_config

TOKEN = "orch_cli-test-operator"


async def orchestratord(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.slow
async def test_the_cli_reaches_a_tls_core_with_a_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    key_file = tmp_path / "operator.key"
    key_file.write_text(TOKEN + "\n")
    config = write_config(
        tmp_path,
        tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
        auth={"keys": [{"name": "ops", "role": "operator", "sha256": token_hash(TOKEN)}]},
    )
    auth = ClientAuth(token=TOKEN, tls_ca=pki.ca.read_bytes())
    async with running_service(config, auth=auth) as svc:
        job = await svc.submit()
        address = f"127.0.0.1:{svc.server.grpc_port}"
        tls = ["--tls-ca", str(pki.ca)]
        rc, out, err = await orchestratord("job", "--address", address, "--token-file",
                                           str(key_file), *tls, "list")  # fmt: skip
        assert rc == 0, err
        assert [j["id"] for j in json.loads(out)["jobs"]] == [job.id]
        rc, _, err = await orchestratord("job", "--address", address, *tls, "list",
                                         env={"ORCHESTRATOR_TOKEN": TOKEN})  # fmt: skip
        assert rc == 0, err
        rc, _, err = await orchestratord("job", "--address", address, *tls, "list")
        assert rc == 2 and "UNAUTHENTICATED" in err
        rc, _, err = await orchestratord("scheduler", "versions", "--address", address,
                                         "--token-file", str(key_file))  # fmt: skip
        assert rc == 2 and "UNAVAILABLE" in err  # plaintext against a TLS listener


async def test_a_key_is_not_sent_in_the_clear_off_loopback(tmp_path: Path) -> None:
    rc, _, err = await orchestratord("job", "--address", "192.0.2.1:50051", "list",
                                     env={"ORCHESTRATOR_TOKEN": TOKEN})  # fmt: skip
    assert rc == 2 and "only over TLS" in err and "--tls-ca" in err


async def test_new_key_prints_a_working_key_and_only_its_hash(tmp_path: Path) -> None:
    key_file = tmp_path / "acme.key"
    rc, out, err = await orchestratord("auth", "new-key", "--name", "acme-batch", "--role",
                                       "tenant", "--tenant", "acme", "--key-file", str(key_file))  # fmt: skip
    assert rc == 0, err
    token = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600 and token.startswith("orch_")
    assert token not in out and token not in err
    (entry,) = yaml.safe_load(out)
    credentials = credentials_from((ApiKey(**entry),), "printed")
    identity = credentials.for_token(token)
    assert identity is not None and (identity.role, identity.tenant_id) == (Role.TENANT, "acme")
    assert entry["sha256"] == token_hash(token)
    rc, _, err = await orchestratord("auth", "new-key", "--name", "x", "--role", "tenant")
    assert rc == 2 and "names its tenant" in err
