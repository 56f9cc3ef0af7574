"""Signaling over TLS: the router serves HTTPS/WSS from its config, the gateway's link and the
client verify it against a CA made for this test run, and a client never sends its token in
clear to a router that is not on loopback. Real router, gateway, aiortc peers and TLS on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from commander_pam_plugin import protocol
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.config import ConfigError, config_from_dict
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.gateway.router import Router
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import RouterClient, open_session
from gateway_support import EchoServer, make_config
from netlab.certs import TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def _tls_config(ca: TestCA, echo: EchoServer, gateway_ca: bool = True) -> dict:
    server = ca.issue("127.0.0.1")
    extra = {"router_ca_file": str(ca.ca_file)} if gateway_ca else {}
    return make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}],
                       router={"tls_cert": str(server.cert), "tls_key": str(server.key)}, **extra)


def test_https_router_wss_gateway_link_and_a_verifying_client_connect(ca: TestCA) -> None:
    with EchoServer() as echo, EmbeddedGateway(_tls_config(ca, echo)) as gw:
        assert gw.router_url.startswith("https://127.0.0.1:")
        loop = BackgroundLoop()
        router = RouterClient(gw.router_url, gw.user_token("alice"), ca_file=str(ca.ca_file))
        try:
            assert router.stream_url("c").startswith("wss://")
            session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                                   ice_servers=[], host_addresses=["127.0.0.1"])
            try:
                assert session.listener.failed is None  # the conversation stream came up over wss
                assert session.peer.ready.is_set()
            finally:
                session.close()
        finally:
            router.close()
            loop.stop()


def test_a_client_without_the_ca_refuses_the_router_with_one_line(ca: TestCA) -> None:
    with EchoServer() as echo, EmbeddedGateway(_tls_config(ca, echo)) as gw:
        router = RouterClient(gw.router_url, gw.user_token("alice"))  # system CAs only
        try:
            with pytest.raises(PamError) as caught:
                router.resources()
        finally:
            router.close()
    message = caught.value.message
    assert "failed TLS verification" in message and "ca_file" in message and "\n" not in message
    assert gw.user_token("alice") not in message


def test_the_gateway_link_refuses_a_router_it_cannot_verify(ca: TestCA, tmp_path: Path) -> None:
    with EchoServer() as echo:
        config = config_from_dict(_tls_config(ca, echo, gateway_ca=False))

        async def main() -> None:
            router = Router(config.router)
            url = await router.start("127.0.0.1", 0)
            try:
                agent = GatewayAgent(config.gateway, url)
                async with aiohttp.ClientSession() as http:
                    with pytest.raises(aiohttp.ClientConnectorCertificateError):
                        await agent._serve_link(http)
                assert not router.gateways  # it never said hello
            finally:
                await router.stop()
        asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("url", ["http://100.64.0.1:8470", "http://router.example:80", "http://10.1.2.3"])
def test_no_token_in_clear_to_a_router_that_is_not_on_loopback(url: str) -> None:
    with pytest.raises(PamError, match="refusing to send the token in clear .* use https://"):
        RouterClient(url, "secret-token")
    RouterClient(url, "secret-token", insecure_http=True).close()  # said explicitly: allowed


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "http://127.0.0.5:1", "http://localhost:1", "http://[::1]:1",
                                 "https://100.64.0.1:1"])
def test_loopback_http_and_any_https_are_allowed(url: str) -> None:
    RouterClient(url, "secret-token").close()


def test_router_tls_settings_are_checked_at_load(ca: TestCA, tmp_path: Path) -> None:
    server = ca.issue("127.0.0.1")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        config_from_dict(make_config(router={"tls_cert": str(server.cert)}))
    with pytest.raises(ConfigError, match="no such file"):
        config_from_dict(make_config(router={"tls_cert": str(tmp_path / "nope.pem"), "tls_key": str(server.key)}))
    with pytest.raises(ConfigError, match="router_ca_file: no such file"):
        config_from_dict(make_config(router_ca_file=str(tmp_path / "nope.pem")))


def test_a_file_that_is_not_a_certificate_and_key_is_one_config_error(tmp_path: Path) -> None:
    from commander_pam_plugin.gateway.tls import TlsConfigError, client_context, server_context

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="not a usable certificate and key"):
        server_context(junk, junk)
    with pytest.raises(TlsConfigError, match="not a PEM CA bundle"):
        client_context(junk)
