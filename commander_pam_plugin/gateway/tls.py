"""TLS for signaling: the router serves HTTPS/WSS from a certificate and key in its config, and
the gateway's link verifies the router with a CA file of its choice (else the system's CAs).

The token crosses this link in an Authorization header on every request, so nothing here
turns verification off: a router with a certificate nobody can check is refused.
"""
from __future__ import annotations

import ssl
from pathlib import Path

from .config import ConfigError


class TlsConfigError(ConfigError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The router's TLS context (TLS 1.2 or later) from PEM files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise TlsConfigError(f"{exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{cert} / {key}: not a usable certificate and key ({exc.__class__.__name__})") from None
    return context


def client_context(ca_file: Path | str | None) -> ssl.SSLContext:
    """A verifying client context: the given CA bundle, or the system's when None."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except FileNotFoundError:
            raise TlsConfigError(f"{ca_file}: no such file") from None
        except ssl.SSLError as exc:
            raise TlsConfigError(f"{ca_file}: not a PEM CA bundle ({exc.__class__.__name__})") from None
    return context
