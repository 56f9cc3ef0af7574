"""dtls_certificate: one DTLS certificate per process (guarded), a fresh one per peer otherwise."""
from __future__ import annotations

import asyncio

import aiortc.rtcpeerconnection
import pytest
from aiortc import RTCSessionDescription

from commander_pam_plugin import dtls_certificate, rtc


def _fingerprints(pc: aiortc.RTCPeerConnection) -> list[str]:
    return [f.value for f in pc._RTCPeerConnection__certificates[0].getFingerprints()]


async def _two_peers_connect() -> tuple[list[str], list[str]]:
    """Two real peers built by rtc, connected on loopback: their certificates' fingerprints."""
    offerer, answerer = rtc.new_peer_connection([]), rtc.new_peer_connection([])
    channel = offerer.createDataChannel("c", negotiated=True, id=0)
    answerer.createDataChannel("c", negotiated=True, id=0)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    try:
        await rtc.set_local_description(offerer, await offerer.createOffer(), ["127.0.0.1"])
        await answerer.setRemoteDescription(offerer.localDescription)
        await rtc.set_local_description(answerer, await answerer.createAnswer(), ["127.0.0.1"])
        await offerer.setRemoteDescription(RTCSessionDescription(answerer.localDescription.sdp, "answer"))
        await asyncio.wait_for(opened.wait(), 10)  # DTLS verified each side's fingerprint from the SDP
        return _fingerprints(offerer), _fingerprints(answerer)
    finally:
        await offerer.close()
        await answerer.close()


def test_peers_of_one_process_share_one_certificate_and_still_connect() -> None:
    rtc.install()
    assert aiortc.rtcpeerconnection.RTCCertificate is dtls_certificate._CertificateFactory
    first, second = asyncio.run(_two_peers_connect())
    assert first == second


def test_with_pam_shared_cert_0_each_peer_has_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dtls_certificate.ENV, "0")
    first, second = asyncio.run(_two_peers_connect())
    assert first != second


def test_the_shared_certificate_is_renewed_once_old(monkeypatch: pytest.MonkeyPatch) -> None:
    first = dtls_certificate._CertificateFactory.generateCertificate()
    monkeypatch.setattr(first, "created", first.created - dtls_certificate.RENEW_AFTER_S - 1)
    assert dtls_certificate._CertificateFactory.generateCertificate() is not first


def test_on_another_aiortc_the_override_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    dtls_certificate.supported.cache_clear()
    monkeypatch.setitem(dtls_certificate._KNOWN_SOURCES, "RTCPeerConnection.__init__", "0" * 64)
    monkeypatch.setattr(aiortc.rtcpeerconnection, "RTCCertificate", dtls_certificate._STOCK)
    try:
        dtls_certificate.install()
        assert aiortc.rtcpeerconnection.RTCCertificate is dtls_certificate._STOCK
        first, second = asyncio.run(_two_peers_connect())  # stock: one certificate per peer
        assert first != second
    finally:
        dtls_certificate.supported.cache_clear()
