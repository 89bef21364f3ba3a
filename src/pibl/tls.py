"""TLS: the listeners' certificates (chosen by SNI) and the client side of upstream pools.

Defaults are Mozilla's "intermediate" profile as far as the standard library expresses it: TLS 1.2
and 1.3 only (RFC 8996 deprecates 1.0 and 1.1), OpenSSL's default cipher list (forward-secret AEAD
suites), no compression (CRIME), the server's cipher order, and ALPN ``http/1.1`` — PIBL speaks
nothing else, and saying so keeps an ALPN-only client from guessing (nginx and HAProxy announce it
the same way).

A listener may hold several certificates: each gets its own ``SSLContext``, and the listener's
``sni_callback`` switches the handshake to the one whose names match the client's SNI (exact
names first, then ``*.example.com`` for one more label, as RFC 6125 §6.4.3 allows); the first
certificate is the default. Names come from the certificate itself (DNS subjectAltNames, else
the subject CN) unless the configuration lists them.

Loading problems are :class:`CertificateError`s that say which configuration key is at fault
(``cert``, ``key``, ``tls_ca``), so the config loader can name it.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "ALPN_PROTOCOLS",
    "MINIMUM_VERSION",
    "CertificateError",
    "ServerCertificate",
    "ServerCertificates",
    "TlsTermination",
    "UpstreamTLS",
    "client_context",
    "load_certificate",
    "server_context",
    "upstream_tls",
]

ALPN_PROTOCOLS: Final = ["http/1.1"]
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2  # RFC 8996; Mozilla "intermediate"


class CertificateError(ValueError):
    """A certificate, key or CA file that cannot be used; ``key`` is the configuration key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _show(path: str) -> str:
    return json.dumps(path, ensure_ascii=False)


def server_context() -> ssl.SSLContext:
    """An SSLContext for a listener, without a certificate yet."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def client_context(*, verify: bool = True, ca: str | None = None) -> ssl.SSLContext:
    """An SSLContext for connections to upstream servers.

    ``verify`` checks the server's certificate chain and name (against ``ca``, or the system's
    trust store when ``ca`` is None); without it any certificate is accepted.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise CertificateError("tls_ca", f"file not found: {_show(ca)}") from None
        except ssl.SSLError as exc:
            raise CertificateError(
                "tls_ca", f"{_show(ca)} holds no PEM CA certificate ({exc.reason or exc})"
            ) from None
        except OSError as exc:
            raise CertificateError(
                "tls_ca", f"cannot read {_show(ca)}: {exc.strerror or exc}"
            ) from None
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """One loaded certificate: its files, the names it answers for, its own context."""

    cert: str
    key: str
    names: tuple[str, ...]
    context: ssl.SSLContext = field(compare=False, repr=False)


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise CertificateError(key, f"file not found: {_show(path)}") from None
    except OSError as exc:
        raise CertificateError(key, f"cannot read {_show(path)}: {exc.strerror or exc}") from None


def _decode_cert(path: str) -> dict[str, Any] | None:
    """The first certificate in the PEM file at ``path``, as ``SSLSocket.getpeercert()`` gives
    it; None when this Python lacks the (private but long-standing) decoder."""
    decode: Callable[[str], dict[str, Any]] | None = getattr(
        getattr(ssl, "_ssl", None), "_test_decode_cert", None
    )
    if decode is None:
        return None
    try:
        return decode(path)
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateError(
            "cert", f"{_show(path)} holds no PEM certificate ({exc.args[-1] if exc.args else exc})"
        ) from None


def certificate_names(decoded: dict[str, Any]) -> tuple[str, ...]:
    """DNS subjectAltNames (lower-cased), else the subject's common name (RFC 6125 §6.4.4)."""
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            names += [value.lower() for attr, value in rdn if attr == "commonName"]
    return tuple(dict.fromkeys(names))


def load_certificate(cert: str, key: str, names: Sequence[str] = ()) -> ServerCertificate:
    """Load ``cert`` (a PEM chain, leaf first) and ``key``; raises :class:`CertificateError`."""
    _read("cert", cert)
    key_pem = _read("key", key)
    decoded = _decode_cert(cert)

    def no_password() -> bytes:
        raise CertificateError(
            "key", f"{_show(key)} is encrypted; PIBL needs a key without a passphrase"
        )

    context = server_context()
    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{_show(key)} is not the private key of the certificate in {_show(cert)}"
        elif b"PRIVATE KEY-----" not in key_pem:
            message = f"{_show(key)} holds no PEM private key"
        else:
            message = f"cannot load {_show(key)} with {_show(cert)} ({exc.reason or exc})"
        raise CertificateError("key", message) from None
    except OSError as exc:
        raise CertificateError(
            "cert", f"cannot read {_show(cert)}: {exc.strerror or exc}"
        ) from None
    chosen = tuple(n.lower() for n in names) or (
        certificate_names(decoded) if decoded is not None else ()
    )
    return ServerCertificate(cert, key, chosen, context)


class ServerCertificates:
    """The certificates of the TLS listeners; the first is the default."""

    def __init__(self, certificates: Sequence[ServerCertificate]) -> None:
        if not certificates:
            raise ValueError("at least one certificate is needed")
        self.all = tuple(certificates)
        self.default = certificates[0]
        self._exact: dict[str, ServerCertificate] = {}
        self._wildcard: dict[str, ServerCertificate] = {}  # "*.example.com" under "example.com"
        for certificate in certificates:  # the first certificate listed wins a shared name
            for name in certificate.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], certificate)
                else:
                    self._exact.setdefault(name, certificate)

    def select(self, server_name: str | None) -> ServerCertificate:
        """The certificate for an SNI ``server_name``; the default for none or no match."""
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self._exact.get(name)
            if found is not None:
                return found
            _, dot, parent = name.partition(".")
            if dot:
                found = self._wildcard.get(parent)
                if found is not None:
                    return found
        return self.default


class TlsTermination:
    """The TLS side of the listeners: one listening context whose SNI callback picks the
    certificate. ``replace`` swaps the certificates (a reload) for handshakes from then on."""

    def __init__(self, certificates: ServerCertificates) -> None:
        self.certificates = certificates
        # The default certificate's context doubles as the listening one; OpenSSL calls back
        # for every ClientHello (server_name None when the client sent no SNI).
        self.context = certificates.default.context
        self.context.sni_callback = self._on_server_name

    def replace(self, certificates: ServerCertificates) -> None:
        self.certificates = certificates

    def _on_server_name(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any
    ) -> None:
        chosen = self.certificates.select(server_name).context
        if connection.context is not chosen:
            connection.context = chosen


# --------------------------------------------------------------------------- upstream side


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """How a pool speaks TLS to its servers. ``server_name`` (SNI and the name verified) is the
    server's host when None. Equal settings compare equal, whatever their context object."""

    verify: bool = True
    ca: str | None = None
    server_name: str | None = None
    context: ssl.SSLContext = field(default_factory=client_context, compare=False, repr=False)


def upstream_tls(
    *, verify: bool = True, ca: str | None = None, server_name: str | None = None
) -> UpstreamTLS:
    """Settings plus their context; raises :class:`CertificateError` (key ``tls_ca``)."""
    return UpstreamTLS(verify, ca, server_name, client_context(verify=verify, ca=ca))
