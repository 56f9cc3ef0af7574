"""Test helpers for the reference router and gateway: real HTTP, WebSocket and aiortc parts.

Nothing here is a mock. `RouterClient` speaks HTTP and WebSocket to a real router with
aiohttp; `ClientPeer` is a real aiortc offerer built with the project's address policy
(rtc.py); `EchoServer` is a real TCP server in a thread. Tests run their client side with
`run(coro)` on a fresh loop while the gateway runs in `EmbeddedGateway`'s own thread.
Other test files may import these.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import socketserver
import threading
from typing import Any, Iterator, Sequence

import aiohttp
from aiortc import RTCSessionDescription

from commander_pam_plugin import rtc
from commander_pam_plugin.gateway.demo_ssh import DemoSSHServer
from commander_pam_plugin.gateway.embedded import LoopThread
from commander_pam_plugin.protocol import (CONTROL_CHANNEL_ID, TERMINAL_CHANNEL_ID, control_message,
                                           split_sdp_candidates)

WAIT = 10.0  # safety net for every wait; never a timing claim
USERS = ("alice", "bob", "carol")
OFFLINE_GATEWAY = "offline-gw"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def new_conversation_id() -> str:
    return "conv-" + secrets.token_hex(8)


def make_config(resources: Sequence[dict[str, Any]] = (), *, gateway: str = "gw-test", legacy: bool = False,
                capabilities: Sequence[str] | None = None, users: Sequence[str] = USERS,
                router: dict[str, Any] | None = None, **gateway_extra: Any) -> dict[str, Any]:
    """A config dict with fresh tokens, a known-but-never-connected gateway, and the given resources."""
    gateway_table: dict[str, Any] = {"name": gateway, "token": new_token(), "legacy": legacy, **gateway_extra}
    if capabilities is not None:
        gateway_table["capabilities"] = list(capabilities)
    return {"router": dict(router or {}),
            "users": [{"name": u, "token": new_token()} for u in users],
            "gateways": [{"name": OFFLINE_GATEWAY, "token": new_token()}],
            "gateway": gateway_table, "resources": list(resources)}


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a test's async client side on a fresh loop, with a generous safety timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- TCP echo target ----------------------------------------------------------------------------

class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)  # echo the half-close too


class EchoServer(socketserver.ThreadingTCPServer):
    """TCP echo on 127.0.0.1:random in a daemon thread; echoes EOF as a half-close."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.connections = 0
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    """A port nothing listens on (for a target that refuses connections)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- SSH target ---------------------------------------------------------------------------------

@contextlib.contextmanager
def demo_ssh_server(authorized_keys: Sequence[Any] = ()) -> Iterator[DemoSSHServer]:
    """A DemoSSHServer on its own loop thread (apart from the gateway's), closed afterwards."""
    thread = LoopThread("demo-ssh").start()
    server = thread.run(DemoSSHServer(authorized_keys=authorized_keys).start(), WAIT)

    async def close() -> None:
        server.close()
    try:
        yield server
    finally:
        thread.run(close(), WAIT)
        thread.stop()


def ssh_resource(server: DemoSSHServer, name: str = "ssh", **extra: Any) -> dict[str, Any]:
    """An ssh resource for the demo server: its password unless a private_key is given."""
    resource = {"name": name, "kind": "ssh", "host": "127.0.0.1", "port": server.port,
                "username": server.username, "insecure_skip_host_key_check": True, **extra}
    if "private_key" not in extra:
        resource.setdefault("password", server.password)
    if "known_hosts" in extra:
        resource.pop("insecure_skip_host_key_check")
    return resource


# --- signaling client ---------------------------------------------------------------------------

class ConversationStream:
    """The client side of GET /api/v1/conversations/{id}/stream."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, transcript: list[str]) -> None:
        self.ws, self._transcript = ws, transcript
        self.events: list[dict[str, Any]] = []

    async def next(self, timeout: float = WAIT) -> dict[str, Any] | None:
        """The next event, or None once the router closed the stream."""
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            return None
        self._transcript.append(message.data)
        event = json.loads(message.data)
        self.events.append(event)
        return event

    async def wait_for(self, event_type: str, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """Skip events until one of this type (and these field values) arrives."""
        async def scan() -> dict[str, Any]:
            while True:
                event = await self.next(timeout)
                if event is None:
                    raise AssertionError(f"stream closed before a {event_type!r} event; saw {self.events}")
                if event.get("type") == event_type and all(event.get(k) == v for k, v in fields.items()):
                    return event
        return await asyncio.wait_for(scan(), timeout)

    async def close(self) -> None:
        await self.ws.close()


class RouterClient:
    """HTTP + WebSocket client of one user; keeps every reply body and stream frame it saw."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url, self.token = base_url.rstrip("/"), token
        self.transcript: list[str] = []
        self.http = aiohttp.ClientSession()

    def _headers(self, token: str | None = None) -> dict[str, str]:
        token = token if token is not None else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        all_headers = {**self._headers(), **(headers or {})}
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.base_url + path, data=body, headers=all_headers) as response:
            text = await response.text()
            self.transcript.append(text)
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = text
            return response.status, payload, dict(response.headers)

    async def get(self, path: str) -> tuple[int, Any]:
        status, payload, _ = await self.request("GET", path)
        return status, payload

    async def action(self, gateway: str, conversation_id: str | None, kind: str, data: Any = None,
                     trickle: bool = False) -> tuple[int, Any]:
        body: dict[str, Any] = {"kind": kind, "data": {} if data is None else data, "trickle_ice": trickle}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        status, payload, _ = await self.request("POST", f"/api/v1/gateways/{gateway}/actions",
                                                body=json.dumps(body).encode())
        return status, payload

    async def stream(self, conversation_id: str) -> ConversationStream:
        """Open the conversation stream and wait for its 'ready'."""
        ws = await self.http.ws_connect(f"{self.base_url}/api/v1/conversations/{conversation_id}/stream",
                                        headers=self._headers())
        stream = ConversationStream(ws, self.transcript)
        await stream.wait_for("ready")
        return stream

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- aiortc client peer -------------------------------------------------------------------------

class ChannelReader:
    """Ordered messages of one data channel, as bytes or parsed in-band control dicts."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.opened = asyncio.Event()
        channel.on("message", self.queue.put_nowait)
        channel.on("close", self._on_close)
        channel.on("open", self.opened.set)
        if channel.readyState == "open":
            self.opened.set()

    async def wait_open(self, timeout: float = WAIT) -> None:
        await asyncio.wait_for(self.opened.wait(), timeout)

    def _on_close(self) -> None:
        self.closed.set()
        self.queue.put_nowait(None)

    async def receive(self, timeout: float = WAIT) -> bytes | dict[str, Any] | None:
        """Next message; None once the channel closed."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if item is None:
            self.queue.put_nowait(None)
            return None
        return item if isinstance(item, bytes) else json.loads(item)

    def send(self, data: bytes | str) -> None:
        self.channel.send(data)

    def send_control(self, op: str, **fields: Any) -> None:
        self.channel.send(control_message(op, **fields))

    async def read_until(self, op: str, timeout: float = WAIT) -> tuple[bytes, dict[str, Any] | None]:
        """All payload bytes until an in-band message with this op (or the close): (bytes, message)."""
        async def collect() -> tuple[bytes, dict[str, Any] | None]:
            data = bytearray()
            while True:
                item = await self.receive(timeout)
                if item is None:
                    return bytes(data), None
                if isinstance(item, bytes):
                    data += item
                elif item.get("op") == op or item.get("op") == "error":
                    return bytes(data), item
        return await asyncio.wait_for(collect(), timeout)


class ClientPeer:
    """The offering side, as the plugin would build it: negotiated channels 0 (and 1)."""

    def __init__(self, mode: str = "tunnel", host_addresses: Sequence[str] = ("127.0.0.1",)) -> None:
        self.host_addresses = tuple(host_addresses)
        self.pc = rtc.new_peer_connection([])
        self.control = ChannelReader(self.pc.createDataChannel("control", negotiated=True, id=CONTROL_CHANNEL_ID))
        self.terminal = (ChannelReader(self.pc.createDataChannel("terminal", negotiated=True, id=TERMINAL_CHANNEL_ID))
                         if mode == "terminal" else None)
        self._connected = asyncio.Event()
        self._open_replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.control.channel.on("message", self._on_control)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_control(self, message: Any) -> None:
        """Hand each 'opened'/'refused' to the open_stream() waiting for that id (many wait at once)."""
        reply = json.loads(message) if isinstance(message, str) else None
        if isinstance(reply, dict) and reply.get("op") in ("opened", "refused"):
            future = self._open_replies.get(reply.get("id"))
            if future is not None and not future.done():
                future.set_result(reply)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    async def offer(self) -> str:
        offer = await self.pc.createOffer()
        await rtc.set_local_description(self.pc, offer, self.host_addresses)
        return self.pc.localDescription.sdp

    async def accept(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def connected(self, timeout: float = WAIT) -> None:
        """ICE and DTLS up, and the control channel open (SCTP associated)."""
        await asyncio.wait_for(self._connected.wait(), timeout)
        await self.control.wait_open(timeout)

    async def open_stream(self, stream_id: int) -> tuple[ChannelReader, dict[str, Any]]:
        """Tunnel connection: channel N, then 'open' N; returns it with the 'opened'/'refused' reply."""
        reader = ChannelReader(self.pc.createDataChannel(f"stream-{stream_id}", negotiated=True, id=stream_id))
        future = self._open_replies[stream_id] = asyncio.get_running_loop().create_future()
        self.control.send_control("open", id=stream_id)
        try:
            return reader, await asyncio.wait_for(future, WAIT)
        finally:
            del self._open_replies[stream_id]

    async def close(self) -> None:
        await self.pc.close()


class Session:
    """A negotiated conversation: its id, client peer and stream."""

    def __init__(self, conversation_id: str, peer: ClientPeer, stream: ConversationStream) -> None:
        self.conversation_id, self.peer, self.stream = conversation_id, peer, stream

    async def close(self, client: RouterClient, gateway: str) -> None:
        await client.action(gateway, self.conversation_id, "close")
        await self.peer.close()
        await self.stream.close()


async def connect(client: RouterClient, gateway: str, resource: str, *, session: dict[str, Any] | None = None,
                  trickle: bool = False, candidates: str = "sdp",
                  host_addresses: Sequence[str] = ("127.0.0.1",)) -> Session:
    """Offer, answer, candidates and ICE, the way a client does; asserts each step succeeds.

    candidates: "sdp" (inside the offer), "batch" (one {"candidates": [...]} action),
    "single" (one {"candidate": c} action each), or "batch+single" (first via batch, rest singly).
    """
    session = session or {"mode": "tunnel"}
    conversation_id = new_conversation_id()
    stream = await client.stream(conversation_id)
    peer = ClientPeer(session.get("mode", "tunnel"), host_addresses)
    full = await peer.offer()
    bare, wire, _ = split_sdp_candidates(full)
    offer = {"type": "offer", "sdp": full if candidates == "sdp" else bare, "resource": resource, "session": session}
    status, reply = await client.action(gateway, conversation_id, "offer", offer, trickle)
    assert status == 200, reply
    if candidates != "sdp":
        batch = wire[:1] if candidates == "batch+single" else (wire if candidates == "batch" else [])
        singles = [c for c in wire if c not in batch]
        if batch:
            status, body = await client.action(gateway, conversation_id, "icecandidate",
                                               {"candidates": batch, "end_of_candidates": False})
            assert status == 200 and body["data"]["applied"] == len(batch), body
        for candidate in singles:
            status, body = await client.action(gateway, conversation_id, "icecandidate", {"candidate": candidate})
            assert status == 200 and body["data"]["applied"] == 1, body
        status, body = await client.action(gateway, conversation_id, "icecandidate", {"candidate": None})
        assert status == 200, body
    if reply["data"].get("accepted"):
        answer = (await stream.wait_for("answer"))["sdp"]
    else:
        answer = reply["data"]["sdp"]
    await peer.accept(answer)
    await peer.connected()
    await stream.wait_for("state", state="connected")
    return Session(conversation_id, peer, stream)
