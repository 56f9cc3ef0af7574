"""Target faults (refused, reset) and connect timeouts at each negotiation phase."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import socketserver
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import RTCSessionDescription

from client_support import echo_roundtrip, payload, sha256
from commander_pam_plugin import protocol, rtc
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.embedded import EmbeddedGateway, LoopThread
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient as PluginRouterClient, open_session
from gateway_support import EchoServer, free_port, make_config
from .stack import Row, WAIT, echo_resource, ended, shell_for, token


class FlakyTarget(socketserver.ThreadingTCPServer):
    """Odd-numbered connections are reset (RST, after reading what came), even ones echoed."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.count = 0
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _FlakyHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.count += 1  # type: ignore[attr-defined]
        if self.server.count % 2:  # type: ignore[attr-defined]
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # closing with linger 0 sends a reset
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


def target_faults(tries: int, folder: Path) -> Row:
    """A target that refuses, one that resets: that connection ends with a reason, the tunnel stays up."""
    row = Row("fault: target refusing or resetting", "", tries * 2, "")
    with EchoServer() as echo:
        flaky = FlakyTarget()
        resources = [echo_resource(echo), {"name": "refusing", "kind": "tcp", "host": "127.0.0.1", "port": free_port()},
                     {"name": "flaky", "kind": "tcp", "host": "127.0.0.1", "port": flaky.port}]
        config = make_config(resources)
        try:
            with EmbeddedGateway(config) as gw, shell_for(gw.router_url, token(config, "alice"), folder) as shell:
                ports = {name: json.loads(shell.run(f"pam tunnel start {name} --json")[1])["port"]
                         for name in ("echo", "refusing", "flaky")}
                big = payload(4 * 1024 * 1024, 3)
                with ThreadPoolExecutor(1) as pool:
                    transfer = pool.submit(echo_roundtrip, ports["echo"], big)
                    for attempt in range(tries):
                        if ended(ports["refusing"]) != b"":
                            row.fail(f"try {attempt}: the refusing target passed bytes")
                        if ended(ports["flaky"]) != b"":
                            row.fail(f"try {attempt}: the resetting target passed bytes")
                        if echo_roundtrip(ports["flaky"], b"next one") != b"next one":
                            row.fail(f"try {attempt}: the tunnel to the flaky target did not carry the next connection")
                    intact = sha256(transfer.result(WAIT * 3)) == sha256(big)
                rows = {r["resource"]: r for r in json.loads(shell.run("pam tunnel list --json")[1])}
        finally:
            flaky.close()
    if not intact:
        row.fail("a transfer on another tunnel was damaged meanwhile")
    for name in ("refusing", "flaky"):
        if rows[name]["state"] != "up":
            row.fail(f"the {name} tunnel is {rows[name]['state']}, not up")
    if rows["refusing"]["refused"] != tries or "refused" not in rows["refusing"]["last_error"]:
        row.fail(f"refusals not reported: {rows['refusing']}")
    if not re.search(r"\((ConnectionResetError|BrokenPipeError)\)$", rows["flaky"]["last_error"]):
        row.fail(f"the reset was not reported: {rows['flaky']['last_error']!r}")
    row.tried = "connections through tunnels to a target that refuses and to one that resets (RST) every other connection"
    row.survived = (f"each ended alone with a reason in `pam tunnel list` ({rows['refusing']['last_error']!r}; "
                    f"{rows['flaky']['last_error']!r}); both tunnels stayed up and carried the next connection; "
                    f"a 4 MiB transfer on a third tunnel arrived intact")
    row.figures = {"tunnels": rows}
    return row


class _StallingGateway:
    """A gateway link that stalls one phase per resource: no reply, no answer, or an answer ICE cannot reach."""

    def __init__(self, url: str, name: str, gateway_token: str) -> None:
        self.url, self.name, self.token = url, name, gateway_token

    async def run(self, online: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{self.url}/api/v1/gateway/connect", headers={"Authorization": f"Bearer {self.token}"}) as ws:
            await ws.send_json({"type": "hello", "gateway": self.name, "version": protocol.GATEWAY_VERSION,
                                "capabilities": list(protocol.ALL_CAPABILITIES)})
            await ws.receive()  # welcome
            online.set()
            async for message in ws:
                action = json.loads(message.data)
                data = await self._reply(action)
                if data is not None:
                    await ws.send_json({"type": "reply", "id": action["id"], "ok": True, "data": data})

    async def _reply(self, action: dict[str, Any]) -> dict[str, Any] | None:
        if action["kind"] != "offer":
            return {"closed": True} if action["kind"] == "close" else {}
        stall = action["data"]["resource"]
        if stall == "stall-reply":
            return None
        if stall == "stall-answer":
            return {"accepted": True}
        pc = rtc.new_peer_connection([])  # answers, then goes away: ICE has nobody to reach
        await pc.setRemoteDescription(RTCSessionDescription(action["data"]["sdp"], "offer"))
        await rtc.set_local_description(pc, await pc.createAnswer(), ["127.0.0.1"])
        sdp = pc.localDescription.sdp
        await pc.close()
        return {"type": "answer", "sdp": sdp}


PHASES = {"stall-reply": "the offer's reply", "stall-answer": "the answer on the conversation stream",
          "stall-ice": "the ICE connection"}


def connect_timeouts(timeout_s: float = 2.0) -> Row:
    """A gateway that stalls each phase in turn; the connect timeout names the phase that stalled."""
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.router import Router

    row = Row("fault: connect timeout", "", len(PHASES), "")
    config = make_config(router={"reply_timeout": timeout_s * 3})
    thread, messages = LoopThread("stalling-gateway").start(), {}
    try:
        router = Router(config_from_dict(config).router)
        url = thread.run(router.start("127.0.0.1", 0), WAIT)
        online = asyncio.Event()
        stalling = _StallingGateway(url, config["gateway"]["name"], config["gateway"]["token"])
        link = asyncio.run_coroutine_threadsafe(stalling.run(online), thread.loop)
        thread.run(asyncio.wait_for(online.wait(), WAIT), WAIT)
        loop, client = BackgroundLoop(), PluginRouterClient(url, token(config, "alice"))

        def attempt(resource: str) -> str:
            try:
                session = open_session(loop, client, config["gateway"]["name"], resource, protocol.SessionRequest(),
                                       ice_servers=[], host_addresses=["127.0.0.1"],
                                       options=ConnectOptions(trickle=True, timeout_s=timeout_s))
            except PamError as exc:
                return exc.message
            session.close()
            return "connected"

        with ThreadPoolExecutor(len(PHASES)) as pool:
            messages = dict(zip(PHASES, pool.map(attempt, PHASES)))
        client.close()
        loop.stop()
        link.cancel()
        thread.run(router.stop(), WAIT)
    finally:
        thread.stop()
    for resource, phase in PHASES.items():
        expected = f"connecting to {resource} timed out after {timeout_s:g} s waiting for {phase}"
        if messages.get(resource) != expected:
            row.fail(f"{resource}: {messages.get(resource)!r}, expected {expected!r}")
    row.tried = "a gateway that never replies to the offer, never sends the answer, or answers unreachably"
    row.survived = "; ".join(f"“…waiting for {PHASES[r]}”" for r in PHASES if messages.get(r, "").endswith(PHASES[r]))
    row.figures = {"messages": messages}
    return row
