"""One DTLS certificate (and one OpenSSL context per SRTP profile list) per process, instead of
a new key pair, certificate and context for every peer connection.

aiortc 1.16's RTCPeerConnection generates an ECDSA key and a self-signed certificate in its
constructor, and each DTLS transport builds an SSL.Context from them (the key and certificate
are converted to OpenSSL's form each time): about 0.5 ms of CPU per peer on this machine, on
both sides, paid 200 times when 200 tunnels start at once. DTLS peers are authenticated by the
certificate fingerprint carried in the (signed-in, TLS-protected) SDP, not by a CA, and session
keys come from the ECDHE exchange of each handshake, so one certificate per process
authenticates every peer as well as one per peer does (docs/SECURITY.md says what it changes).
The certificate is renewed after RENEW_AFTER_S (aiortc's are valid 30 days).

A guarded override: installed only when aiortc's RTCPeerConnection.__init__,
RTCCertificate.generateCertificate and RTCCertificate._create_ssl_context are the sources it
was written against, and PAM_SHARED_CERT is not "0"; otherwise every peer gets its own, as stock.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import threading
import time
from typing import Any

import aiortc.rtcpeerconnection as pc_module
from aiortc.rtcdtlstransport import RTCCertificate

ENV = "PAM_SHARED_CERT"
RENEW_AFTER_S = 24 * 3600.0
_KNOWN_SOURCES = {
    "RTCPeerConnection.__init__": "f5388aea637f0f219ec897d874278ee1022d345954807cbb550a71ed9919e0b8",
    "RTCCertificate.generateCertificate": "14257a6fb4dbd438f4283aceddccda3f04ad11bfc83a1fbb94f3d0b1dfb5a275",
    "RTCCertificate._create_ssl_context": "aac625bdc264f0a6d4aebcb325a45941aaf753b6b4d33934d311e34344abad77",
}
_STOCK = RTCCertificate


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """True when the installed aiortc is the one this override was written for."""
    targets = {"RTCPeerConnection.__init__": pc_module.RTCPeerConnection.__init__,
               "RTCCertificate.generateCertificate": _STOCK.generateCertificate,
               "RTCCertificate._create_ssl_context": _STOCK._create_ssl_context}
    for name, target in targets.items():
        try:
            source = inspect.getsource(target)
        except (OSError, TypeError):
            return False
        if hashlib.sha256(source.encode()).hexdigest() != _KNOWN_SOURCES[name]:
            return False
    return True


def enabled() -> bool:
    return os.environ.get(ENV, "").strip() != "0"


class SharedCertificate(RTCCertificate):
    """An RTCCertificate whose SSL.Context is built once per SRTP profile list and then reused
    (OpenSSL creates each connection's own state from it; nothing is written to it afterwards)."""

    def __init__(self, key: Any, cert: Any) -> None:
        super().__init__(key=key, cert=cert)
        self.created = time.monotonic()
        self._contexts: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()  # several loops (threads) of one process may share it

    def _create_ssl_context(self, srtp_profiles: list[Any]) -> Any:
        key = tuple(profile.openssl_profile for profile in srtp_profiles)
        with self._lock:
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = super()._create_ssl_context(srtp_profiles)
            return context


class _CertificateFactory:
    """What RTCPeerConnection's constructor calls as RTCCertificate.generateCertificate()."""

    _lock = threading.Lock()
    _shared: SharedCertificate | None = None

    @classmethod
    def generateCertificate(cls) -> RTCCertificate:
        if not enabled():
            return _STOCK.generateCertificate()
        with cls._lock:
            shared = cls._shared
            if shared is None or time.monotonic() - shared.created > RENEW_AFTER_S:
                shared = cls._shared = SharedCertificate.generateCertificate()
            return shared


def install() -> None:
    """Make RTCPeerConnection take the process's certificate (where the guard allows)."""
    if pc_module.RTCCertificate is _STOCK and supported():
        pc_module.RTCCertificate = _CertificateFactory  # type: ignore[misc,assignment]
