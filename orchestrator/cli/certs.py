"""`orchestratord auth dev-certs`: a throwaway CA, a server certificate and client
certificates, as PEM files, to try TLS and mutual TLS without a PKI (and for the tests
and the benchmark). Production certificates come from your own CA (SECURITY.md)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.support.files import write_secret

VALID_DAYS = 30


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def client(self, common_name: str) -> tuple[Path, Path]:
        """A client certificate (and key) for `common_name`, signed by the CA."""
        return _issue(self.directory, common_name, self._ca_key(), self._ca_cert(), server=None)

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def _ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca.read_bytes())


def make_pki(directory: Path, hosts: tuple[str, ...] = ()) -> Pki:
    """A CA and a server certificate for localhost, 127.0.0.1 and `hosts`, valid 30 days."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orchestratord test CA")])
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_secret(directory / "ca.key", _key_pem(key))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _issue(directory, "localhost", key, cert, server=hosts)
    return Pki(directory, directory / "ca.pem", server_cert, server_key)


def _issue(
    directory: Path,
    common_name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: tuple[str, ...] | None,
) -> tuple[Path, Path]:
    """Signed by the CA; a server certificate (`server` not None) names its hosts."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _builder(subject, ca_cert.subject, key.public_key())
    if server is not None:
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        for host in ("127.0.0.1", *server):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = directory / common_name.replace("/", "_")
    (stem.with_suffix(".pem")).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_secret(stem.with_suffix(".key"), _key_pem(key))
    return stem.with_suffix(".pem"), stem.with_suffix(".key")


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
