"""Input limits on the router, end to end: every refusal is a JSON 4xx that quotes nothing it
was sent, a client's mistake is one rate-limited WARNING line (never an ERROR, never a
traceback, never a token), and a bad WebSocket message is refused while the connection lives.
An honest user's tunnel carries data before, during and after."""
from __future__ import annotations

import asyncio
import gzip
import json
import logging

import aiohttp
from gateway_support import OFFLINE_GATEWAY, WAIT, EchoServer, RouterClient, connect, make_config, run
from tenancy_support import Records, echo_resource, echo_through, json_error, raw_http

from commander_pam_plugin.gateway import client_errors
from commander_pam_plugin.gateway.client_errors import MistakeLog
from commander_pam_plugin.gateway.embedded import EmbeddedGateway

ROUTER_LOG = "commander_pam_plugin.gateway.router"
HUGE_INTEGER = "9" * 5000  # Python refuses more than 4,300 digits with a ValueError


def _post(path: str, token: str, body: bytes, *extra: bytes) -> bytes:
    return b"\r\n".join([f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
                         f"Authorization: Bearer {token}".encode(), b"Content-Type: application/json",
                         f"Content-Length: {len(body)}".encode(), *extra, b"", body])


def _no_error_and_no_secret(logs: Records, secrets: list[str]) -> None:
    assert not [r for r in logs.records if r.levelno >= logging.ERROR], logs.text()
    assert not [r for r in logs.records if r.exc_info and r.name.startswith(("aiohttp", ROUTER_LOG))], logs.text()
    text = logs.text()
    for secret in secrets:
        assert secret not in text


def test_every_malformed_request_gets_a_json_4xx_that_echoes_nothing_and_logs_one_warning(monkeypatch):
    monkeypatch.setattr(client_errors, "mistakes", MistakeLog(client_errors.log, burst=1000))
    with EchoServer() as echo:
        data = make_config([echo_resource(echo)])
        tokens = {u["name"]: u["token"] for u in data["users"]}
        with EmbeddedGateway(data) as stack:
            url, gateway = stack.router_url, stack.gateway_name
            action_path = f"/api/v1/gateways/{gateway}/actions"

            async def main() -> None:
                async with RouterClient(url, tokens["alice"]) as alice, RouterClient(url, tokens["bob"]) as bob:
                    honest = await connect(alice, gateway, "echo")
                    await echo_through(honest, 2, b"before" * 1000)
                    with Records() as logs:
                        # A header over 8 KiB carrying bob's real token: 431, and neither reply nor log repeats it.
                        big = f"GET /api/v1/resources HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['bob']}" \
                              + "A" * 9000 + "\r\n\r\n"
                        status, headers, body = await raw_http(url, big.encode())
                        assert json_error(status, headers, body)["code"] == "header_too_large" and status == 431
                        assert tokens["bob"].encode() not in body and b"AAAA" not in body
                        # 32 bytes from anyone, no token: one WARNING line, no traceback.
                        malformed = b"GET / HTTP/1.1\r\nHost: \x00\x01\x02\x03\x04\x05\r\n\r\n"
                        assert len(malformed) == 32
                        status, headers, body = await raw_http(url, malformed)
                        assert json_error(status, headers, body)["message"] == "malformed HTTP request (BadHttpMessage)"
                        assert b"\\x00" not in body
                        status, headers, body = await raw_http(url, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                        assert json_error(status, headers, body)["message"] == "this is not an HTTP request"
                        # Bodies: a Content-Encoding that does not match, huge integers, deep nesting, size.
                        status, headers, body = await raw_http(url, _post(action_path, tokens["bob"], b"not gzip",
                                                                          b"Content-Encoding: gzip"))
                        assert "Content-Encoding" in json_error(status, headers, body)["message"]
                        packed = gzip.compress(b'{"kind": "ping"}')
                        status, headers, body = await raw_http(url, _post(action_path, tokens["bob"], packed,
                                                                          b"Content-Encoding: gzip"))
                        assert status == 200, body  # a real gzip body is fine
                        for path in (action_path, "/api/v1/resources/echo/actions"):
                            huge = f'{{"kind": "ping", "data": {{"n": {HUGE_INTEGER}}}}}'.encode()
                            status, headers, body = await raw_http(url, _post(path, tokens["bob"], huge))
                            assert json_error(status, headers, body)["message"] == \
                                "body holds an integer longer than 32 digits"
                        status, headers, body = await raw_http(url, _post(action_path, tokens["bob"],
                                                                          b"[" * 100 + b"]" * 100))
                        assert "nests deeper" in json_error(status, headers, body)["message"]
                        status, headers, body = await raw_http(url, _post(action_path, tokens["bob"],
                                                                          b" " * (65 * 1024)))
                        assert status == 413 and json_error(status, headers, body)["code"] == "too_large"
                        # Routes, methods, tokens and upgrades: JSON too.
                        for method, path, token, want in (("GET", "/nowhere", tokens["bob"], 404),
                                                          ("DELETE", action_path, tokens["bob"], 405),
                                                          ("GET", "/api/v1/resources", "", 401),
                                                          ("GET", "/api/v1/conversations/conv-12345678/stream",
                                                           tokens["bob"], 400)):
                            status, body, headers = await bob.request(method, path, headers={
                                "Authorization": f"Bearer {token}" if token else ""})
                            assert status == want and headers["Content-Type"].startswith("application/json") \
                                and body["ok"] is False, (method, path, status, body)
                        await echo_through(honest, 4, b"during" * 1000)
                    _no_error_and_no_secret(logs, list(tokens.values()))
                    warnings = [r.getMessage() for r in logs.at(logging.WARNING, ROUTER_LOG)]
                    assert sum("longer than the limit of 8190 bytes" in w for w in warnings) == 1, warnings
                    assert sum("malformed HTTP request (BadHttpMessage)" in w for w in warnings) == 1, warnings
                    assert all("\n" not in w for w in warnings)
                    fresh = await connect(bob, gateway, "echo")  # new sessions unaffected
                    await echo_through(fresh, 2, b"fresh" * 1000)
                    await fresh.close(bob, gateway)
                    await echo_through(honest, 6, b"after" * 1000)
                    await honest.close(alice, gateway)
            run(main(), 90)


def test_a_flood_of_malformed_requests_writes_at_most_the_burst_of_warning_lines(monkeypatch):
    monkeypatch.setattr(client_errors, "mistakes", MistakeLog(client_errors.log, burst=5, window=3600))
    with EmbeddedGateway(make_config()) as stack:
        async def main() -> None:
            with Records() as logs:
                for _ in range(30):
                    status, headers, body = await raw_http(stack.router_url, b"GET / HTTP/1.1\r\nHost: \x00\r\n\r\n")
                    json_error(status, headers, body)
            assert len(logs.at(logging.WARNING, ROUTER_LOG)) == 5
            assert not logs.at(logging.ERROR)
        run(main())
    mistakes = MistakeLog(logging.getLogger("test"), burst=2, window=3600)
    with Records() as logs:
        for _ in range(5):
            mistakes.warn("a mistake")
        mistakes.started -= 3600  # the window has passed
        mistakes.warn("a later mistake")
    assert [r.getMessage() for r in logs.at(logging.WARNING, "test")] == [
        "a mistake", "a mistake", "a later mistake (3 more client mistakes not logged)"]


def test_bad_websocket_messages_are_refused_and_both_sockets_live_on():
    with EchoServer() as echo:
        data = make_config([echo_resource(echo)])
        token = data["users"][0]["token"]
        gateway_token = next(g["token"] for g in data["gateways"] if g["name"] == OFFLINE_GATEWAY)
        with EmbeddedGateway(data) as stack:
            url, gateway = stack.router_url, stack.gateway_name

            async def main() -> None:
                async with RouterClient(url, token) as alice, aiohttp.ClientSession() as http:
                    with Records() as logs:
                        # The client conversation stream: whatever a client sends (up to 4 KiB) is ignored.
                        session = await connect(alice, gateway, "echo")
                        for junk in ("not json", '{"n": ' + "9" * 4000 + "}", "[" * 1000):
                            await session.stream.ws.send_str(junk)
                        await session.stream.ws.send_bytes(b"\x00\xff")
                        await echo_through(session, 2, b"stream junk" * 100)
                        stack.run(stack.agent.sessions[session.conversation_id].close("ended for the test"))
                        event = await session.stream.wait_for("state")  # the stream still carries events
                        assert event["state"] == "closed", event
                        await session.peer.close()
                        # Over 4 KiB the router closes that stream (1009); the tunnel does not depend on it.
                        session = await connect(alice, gateway, "echo")
                        await session.stream.ws.send_str(f'{{"n": {HUGE_INTEGER}}}')
                        assert await session.stream.next() is None
                        assert session.stream.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                        await echo_through(session, 2, b"no stream needed" * 100)
                        await alice.action(gateway, session.conversation_id, "close")
                        await session.peer.close()
                        # The gateway link: bad frames are refused one by one, the link keeps working.
                        async with http.ws_connect(f"{url}/api/v1/gateway/connect",
                                                   headers={"Authorization": f"Bearer {gateway_token}"}) as link:
                            await link.send_json({"type": "hello", "gateway": OFFLINE_GATEWAY, "version": "1.8.0",
                                                  "capabilities": [], "resources": []})
                            assert json.loads((await link.receive(timeout=WAIT)).data) == {"type": "welcome"}
                            for junk in (f'{{"type": "reply", "id": {HUGE_INTEGER}, "ok": true}}',
                                         f'{{"type": "event", "conversation_id": "x", "event": {HUGE_INTEGER}}}',
                                         "[" * 1000, "not json", '{"type": "reply", "id": [1], "ok": true}'):
                                await link.send_str(junk)
                            ping = asyncio.ensure_future(alice.action(OFFLINE_GATEWAY, None, "ping"))
                            action = json.loads((await link.receive(timeout=WAIT)).data)
                            assert action["kind"] == "ping"
                            await link.send_json({"type": "reply", "id": action["id"], "ok": True,
                                                  "data": {"pong": True}})
                            status, body = await ping
                            assert status == 200 and body["data"] == {"pong": True}, body
                    _no_error_and_no_secret(logs, [token, gateway_token])
                    assert any("sent a bad frame: frame holds an integer longer than 32 digits" in r.getMessage()
                               for r in logs.at(logging.WARNING, ROUTER_LOG))
            run(main(), 60)


def test_pam_gateway_serve_logs_a_strangers_garbage_as_one_warning_line_and_never_the_token(tmp_path):
    """The same through the real CLI and its default logging (INFO, aiohttp's loggers included)."""
    import socket
    import time

    from test_gateway_config import WAIT as CLI_WAIT
    from test_gateway_config import Process, write_toml

    token, gateway_token = "alice-" + "t" * 30, "gateway-" + "g" * 30
    path = write_toml(tmp_path / "gw.toml", f'[router]\nlisten = "127.0.0.1:0"\n\n[[users]]\nname = "alice"\n'
                                            f'token = "{token}"\n\n[gateway]\nname = "gw"\ntoken = "{gateway_token}"\n')
    serve = Process("serve", "--config", str(path))
    try:
        url = serve.wait_line(r"router listening on (http://\S+)").group(1)
        serve.wait_line(r"gateway gw online")
        host, port = url.rsplit("//", 1)[1].rsplit(":", 1)

        def send(data: bytes) -> bytes:
            with socket.create_connection((host, int(port)), timeout=CLI_WAIT) as sock:
                sock.sendall(data)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
                return reply

        big = send(f"GET /api/v1/resources HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}{'A' * 9000}\r\n\r\n"
                   .encode())
        assert big.startswith(b"HTTP/1.0 431") and token.encode() not in big
        assert send(b"GET / HTTP/1.1\r\nHost: \x00\x01\x02\x03\x04\x05\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert b'"ok": true' in send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        lines, deadline = [], time.monotonic() + CLI_WAIT
        while not any("GET /api/v1/health" in line for line in lines):  # logged after the two above
            assert time.monotonic() < deadline
            lines.append(serve.lines.get(timeout=CLI_WAIT))
    finally:
        assert serve.stop() == 0
    text = "".join(lines)
    assert " ERROR " not in text and "Traceback" not in text and token not in text and gateway_token not in text
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert "longer than the limit of 8190 bytes" in warnings[0] and "malformed HTTP request" in warnings[1]


def test_a_failure_of_the_router_itself_is_a_json_500_and_an_error_with_its_traceback(monkeypatch):
    """The one 5xx the router makes on its own: a bug (simulated by a handler that raises)."""
    from commander_pam_plugin.gateway.router import Router

    async def broken(self, request):
        raise RuntimeError("a bug")
    monkeypatch.setattr(Router, "_health", broken)
    with EmbeddedGateway(make_config()) as stack:
        async def main() -> None:
            with Records() as logs:
                async with RouterClient(stack.router_url, None) as anyone:
                    status, body, headers = await anyone.request("GET", "/api/v1/health")
            assert status == 500 and headers["Content-Type"].startswith("application/json")
            assert body["error"] == {"code": "internal", "message": "internal error in the router; see its log"}
            errors = logs.at(logging.ERROR, ROUTER_LOG)
            assert len(errors) == 1 and errors[0].exc_info is not None
        run(main())
