"""Secrets: a recorded session and its failures, grepped for every secret."""
from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Any

from commander_pam_plugin import protocol
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.embedded import EmbeddedGateway, LoopThread
from commander_pam_plugin.runtime import PamRuntime, ResourceRef
from gateway_support import demo_ssh_server, make_config, ssh_resource
from .stack import Row, WAIT, captured_logs, runtime, token


class Tap:
    """A TCP relay in front of the router that keeps every byte, each way, for the secrets grep."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = bytearray()  # client -> router
        self.downstream = bytearray()  # router -> client
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> Tap:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, kept: bytearray) -> None:
            while data := await source.read(65536):
                kept += data
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(copy(reader, target_writer, self.upstream), copy(target_reader, writer, self.downstream),
                             return_exceptions=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


def _terminal_session(client: PamRuntime, gateway: str, resource: str, keys: bytes) -> tuple[str, str | None]:
    """A whole `pam launch`-style session through the plugin runtime: (output, in-band error or None)."""
    import queue

    inbox: queue.Queue[Any] = queue.Queue()

    def attach(peer: Any) -> None:
        peer.terminal.on("message", inbox.put)

    request = protocol.SessionRequest(mode="terminal", cols=100, rows=30, pty=True)
    session = client.connect(None, ResourceRef(resource, gateway, "ssh"), request, trickle=True, on_peer=attach)
    try:
        client.loop.call_soon(session.peer.terminal.send, keys)
        output = bytearray()
        while True:
            item = inbox.get(timeout=WAIT)
            if isinstance(item, bytes):
                output += item
                continue
            message = protocol.parse_control_message(item)
            if message["op"] in ("exit", "error"):
                return output.decode("utf-8", "replace"), message.get("reason")
    finally:
        session.close()


def find_secrets(sources: dict[str, list[str]], secrets: dict[str, str]) -> list[str]:
    """'LABEL appears in SOURCE' for every secret found in any text of any source."""
    return [f"{label} appears in {source}" for source, texts in sources.items() for label, secret in secrets.items()
            if any(secret in text for text in texts)]


def secrets_scan(folder: Path) -> Row:
    """A full recorded SSH session (password and key), then failures; grep everything for every secret."""
    import asyncssh

    row = Row("secrets: logs, recordings, replies, errors", "", 0, "")
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_text = key.export_private_key().decode()
    recordings = folder / "recordings"
    sources: dict[str, list[str]] = {"error messages": [], "terminal output": []}
    with demo_ssh_server(authorized_keys=[key]) as ssh:
        resources = [ssh_resource(ssh, "by-password", record=True),
                     ssh_resource(ssh, "by-key", private_key=key_text, record=True),
                     ssh_resource(ssh, "wrong-password", password="wrong-" + os.urandom(12).hex(), record=True),
                     {**ssh_resource(ssh, "bob-only"), "users": ["bob"]}]
        config = make_config(resources, recordings_dir=str(recordings))
        loggers = ("commander_pam_plugin", "aiohttp", "aiortc", "aioice", "asyncssh", "urllib3", "websocket", "asyncio")
        with captured_logs(logging.DEBUG, loggers) as records, EmbeddedGateway(config) as gw:
            frames: list[str] = []
            gw.router.observe(lambda _gateway, _direction, frame: frames.append(frame))
            tap_thread = LoopThread("tap").start()
            tap = tap_thread.run(Tap(int(gw.router_url.rsplit(":", 1)[1])).start(), WAIT)
            client = runtime(f"http://127.0.0.1:{tap.port}", token(config, "alice"))
            try:
                for resource in ("by-password", "by-key"):
                    output, error = _terminal_session(client, gw.gateway_name, resource,
                                                      b"echo session-$((6*7)); stty size\nexit 3\n")
                    sources["terminal output"].append(output)
                    row.times += 1
                    if error is not None or "session-42" not in output:
                        row.fail(f"the {resource} session did not run: {error or output[-200:]!r}")
                for resource in ("wrong-password", "bob-only", "no-such"):
                    try:
                        output, error = _terminal_session(client, gw.gateway_name, resource, b"exit\n")
                        sources["error messages"].append(error or f"{resource}: no error")
                    except PamError as exc:
                        sources["error messages"].append(exc.message)
                    row.times += 1
                stranger = runtime(f"http://127.0.0.1:{tap.port}", "wrong-token-" + os.urandom(16).hex())
                try:
                    stranger.resolve(None, "by-password")
                except PamError as exc:
                    sources["error messages"].append(exc.message)
                finally:
                    stranger.shutdown()
            finally:
                client.shutdown()
                tap_thread.run(tap.close(), WAIT)
                tap_thread.stop()
        casts = sorted(recordings.glob("*.cast"))
        if len(casts) < 2:
            row.fail(f"expected the two sessions to be recorded, found {len(casts)} files")
        sources["log records (root logger at DEBUG)"] = list(records)
        sources["recording files"] = [p.read_text() for p in casts]
        sources["HTTP replies and stream frames (router -> client bytes)"] = [tap.downstream.decode("latin-1")]
        sources["client requests, Authorization header aside"] = [re.sub(
            r"(?im)^Authorization: Bearer \S+\r?$", "", tap.upstream.decode("latin-1"))]
        sources["gateway link frames"] = frames
        secrets = {f"{u['name']}'s token": u["token"] for u in config["users"]}
        secrets.update({f"{g['name']} token": g["token"] for g in config["gateways"]},
                       **{"gateway token": config["gateway"]["token"], "ssh password": ssh.password,
                          "wrong ssh password": resources[2]["password"], "private key": key_text})
        for number, line in enumerate(l for l in key_text.splitlines() if len(l) >= 16 and "-----" not in l):
            secrets[f"private key line {number + 1}"] = line
    for leak in find_secrets(sources, secrets):
        row.fail(leak)
    row.times = sum(len(texts) for texts in sources.values())
    sizes = {source: sum(len(t) for t in texts) for source, texts in sources.items()}
    row.tried = ("two full recorded SSH sessions (password, private key) and four failures (wrong password, "
                 "forbidden and unknown resource, wrong token), then a grep for every token, password and key line")
    row.survived = (f"no secret in {len(records)} log records, {len(casts)} recordings, "
                    f"{sizes['HTTP replies and stream frames (router -> client bytes)']:,} bytes of replies and "
                    f"stream frames, {len(frames)} gateway-link frames, {len(sources['error messages'])} error "
                    f"messages: {'; '.join(sources['error messages'])}")
    row.figures = {"bytes_scanned": sizes, "secrets": sorted(secrets)}
    return row
