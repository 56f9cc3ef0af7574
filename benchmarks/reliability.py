"""Reliability and security checks; run in full, they produce the table in docs/RELIABILITY.md.

    python benchmarks/reliability.py                  # full size, a few minutes, prints the table
    python benchmarks/reliability.py --write-doc      # ... and puts it into docs/RELIABILITY.md
    python benchmarks/reliability.py --quick --only fuzz,cycles --json out.json

Each check is a function returning a Row: what was tried, how many times, what survived and
what was lost (which must be nothing). The tests (tests/test_fuzz_live.py, test_security_*.py,
test_reliability_*.py) call the same functions at small sizes, so the table and the tests
cannot drift apart. Everything is real and on 127.0.0.1: `pam-gateway serve/router/agent`
processes (or the embedded stack where the test needs to look inside), aiortc peers, TCP
targets, an asyncssh server, the plugin's own runtime and shell.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import aiohttp  # noqa: E402
import requests  # noqa: E402
import websocket  # noqa: E402
from aiortc import RTCSessionDescription  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import HypothesisWarning  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from client_support import ShellSession, echo_roundtrip, open_fds, payload, sha256, to_toml  # noqa: E402
from commander_pam_plugin import protocol, rtc  # noqa: E402
from commander_pam_plugin.config import PamConfig  # noqa: E402
from commander_pam_plugin.errors import PamError  # noqa: E402
from commander_pam_plugin.gateway.embedded import EmbeddedGateway, LoopThread  # noqa: E402
from commander_pam_plugin.loop import BackgroundLoop  # noqa: E402
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient as PluginRouterClient, open_session  # noqa: E402
from commander_pam_plugin.runtime import PamRuntime, ResourceRef  # noqa: E402
from gateway_support import (OFFLINE_GATEWAY, EchoServer, RouterClient, connect, demo_ssh_server, free_port,  # noqa: E402
                             make_config, ssh_resource)
from latency_proxy import LatencyProxy  # noqa: E402
from test_fuzz_validators import (action_bodies, any_text, control_messages, conversation_ids,  # noqa: E402
                                  json_scalars, json_values, names, real_offer_sdp, sessions)

WAIT = 20.0  # safety net for every wait; never a timing claim
RSS_BOUND_MB = 10.0
# The time bounds: checked by main() on the full run, never by the tests (timing claims
# do not belong in tests). Check name -> [(figure holding seconds, bound)].
TIME_BOUNDS = {"fault: gateway killed mid-session": [("tunnel_detect_s", 5.0), ("launch_detect_s", 5.0)],
               "fault: client killed": [("mid-session_freed_s", 10.0), ("mid-negotiation_freed_s", 10.0)]}
SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
SESSION_LINE = re.compile(r"conversation (\S+) \(([^,]*), ([^)]*)\) (opened|closed|failed): ")
LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Row:
    """One line of the RELIABILITY.md table; `failures` says what was lost, one line each."""

    check: str
    tried: str
    times: int
    survived: str
    lost: int = 0
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def fail(self, reason: str, count: int = 1) -> None:
        """Record a loss: `count` of the things tried (sessions, transfers...) did not survive."""
        self.lost += count
        self.failures.append(reason)


# --- processes ------------------------------------------------------------------------------------

class Proc:
    """A subprocess whose stdout/stderr lines can be awaited (a condition variable, never a sleep)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, stdin: bool = False) -> None:
        self.proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: list[tuple[float, str, str]] = []  # (monotonic arrival, "out"|"err", text)
        self._changed = threading.Condition()
        self._open = 2
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name: str, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append((time.monotonic(), name, line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def wait_for(self, pattern: str, since: int = 0, timeout: float = WAIT) -> tuple[int, re.Match[str], float]:
        """The first line from index `since` matching: (index, match, arrival time)."""
        regex, deadline, index = re.compile(pattern), time.monotonic() + timeout, since
        with self._changed:
            while True:
                for index in range(index, len(self.lines)):
                    match = regex.search(self.lines[index][2])
                    if match:
                        return index, match, self.lines[index][0]
                index = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._open:
                    tail = "\n".join(text for _, _, text in self.lines[-8:])
                    raise TimeoutError(f"no line matching {pattern!r} within {timeout:g} s; last lines:\n{tail}")
                self._changed.wait(left)

    def text(self, stream: str = "err") -> str:
        with self._changed:
            return "\n".join(text for _, name, text in self.lines if name == stream)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in kB (VmRSS...)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


class Gateway(Proc):
    """`pam-gateway COMMAND --config FILE` in its own process."""

    def __init__(self, command: str, config_path: Path, *extra: str) -> None:
        super().__init__([sys.executable, "-m", "commander_pam_plugin.gateway", command,
                          "--config", str(config_path), *extra])

    def sessions(self) -> dict[str, str]:
        """conversation id -> its last session log line state (opened, closed or failed)."""
        states: dict[str, str] = {}
        with self._changed:
            for _, _, text in self.lines:
                match = SESSION_LINE.search(text)
                if match:
                    states[match.group(1)] = match.group(4)
        return states

    def live_sessions(self) -> set[str]:
        return {cid for cid, state in self.sessions().items() if state == "opened"}

    def stamps(self, pattern: str, since: int = 0) -> list[float]:
        """The gateway's own log timestamps (seconds) of lines matching, for gaps between them."""
        regex, found = re.compile(pattern), []
        with self._changed:
            for _, _, text in self.lines[since:]:
                stamp = LOG_STAMP.match(text)
                if stamp and regex.search(text):
                    found.append(datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return found


def write_config(config: dict[str, Any], folder: Path, name: str) -> Path:
    """The TOML file, created 0600 (it holds tokens; pam-gateway refuses it otherwise)."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(to_toml(config))
    return path


def serve(config: dict[str, Any], folder: Path, port: int) -> Gateway:
    """Router and agent in one process on 127.0.0.1:port, returned once the gateway is online."""
    config = copy.deepcopy(config)
    config["router"]["listen"] = f"127.0.0.1:{port}"
    gateway = Gateway("serve", write_config(config, folder, f"serve-{port}.toml"))
    try:
        gateway.wait_for(f"gateway {config['gateway']['name']} online")
    except BaseException:
        gateway.kill()
        raise
    return gateway


def token(config: dict[str, Any], user: str) -> str:
    return next(u["token"] for u in config["users"] if u["name"] == user)


def echo_resource(echo: EchoServer, name: str = "echo") -> dict[str, Any]:
    return {"name": name, "kind": "tcp", "host": "127.0.0.1", "port": echo.port}


def client_env(url: str, user_token: str, folder: Path) -> dict[str, str]:
    """Environment for a plugin client of `url` with an empty config file."""
    config = folder / "client.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(PAM_ROUTER_URL=url, PAM_TOKEN=user_token, PAM_CONFIG=str(config))
    return env


@contextlib.contextmanager
def shell_for(url: str, user_token: str, folder: Path) -> Iterator[ShellSession]:
    """The real interactive shell in this process, pointed at `url` (environment restored after)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(client_env(url, user_token, folder))
    try:
        with ShellSession() as session:
            yield session
    finally:
        os.environ.clear()
        os.environ.update(saved)


def runtime(url: str, user_token: str) -> PamRuntime:
    return PamRuntime(PamConfig(router_url=url, token=user_token))


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, every: float = 0.02) -> float:
    """Poll what a user would poll (a command's output); returns when it held (monotonic time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)
    return time.monotonic()


@contextlib.contextmanager
def captured_logs(level: int, loggers: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Every log record at `level` or above, formatted with its traceback; `loggers` are opened up too."""
    records: list[str] = []
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(formatter.format(record))

    handler, root = Keep(level), logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", *loggers)}
    root.addHandler(handler)
    for name in ("", *loggers):
        logging.getLogger(name).setLevel(min(level, logging.getLogger(name).level or level))
    try:
        yield records
    finally:
        root.removeHandler(handler)
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def ended(port: int, data: bytes = b"hello") -> bytes:
    """Send through a tunnel port and read to the end; a connection the tunnel closed or reset gives b""."""
    try:
        return echo_roundtrip(port, data)
    except OSError:
        return b""


# --- input: the live fuzz ---------------------------------------------------------------------

FUZZ_CLIENT_LOGGERS = ("ERROR websocket:", "ERROR urllib3")
FUZZ = dict(database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))


class HonestTraffic:
    """A real tunnel session that streams seeded bytes through the echo target for the whole fuzz."""

    PACE_S = 0.005  # a pacer for the sender (not a wait for anything): leave CPU for the fuzz
    WINDOW = 1024 * 1024

    def __init__(self, url: str, user_token: str, gateway: str) -> None:
        self._thread = LoopThread("honest-traffic").start()
        self._ready = threading.Event()
        self.conversation_id = ""
        self.received = 0
        self.stream_events: list[dict[str, Any]] = []
        self._stop: asyncio.Event | None = None
        self._future = asyncio.run_coroutine_threadsafe(self._run(url, user_token, gateway), self._thread.loop)
        if not self._ready.wait(WAIT):
            raise TimeoutError("the honest session did not come up")

    async def _run(self, url: str, user_token: str, gateway: str) -> tuple[int, int, bool]:
        self._stop = asyncio.Event()
        async with RouterClient(url, user_token) as client:
            session = await connect(client, gateway, "echo")
            self.conversation_id = session.conversation_id
            channel, reply = await session.peer.open_stream(protocol.FIRST_STREAM_ID)
            assert reply["op"] == "opened", reply
            self._ready.set()
            rng, sent, sent_hash, got_hash = random.Random(7), 0, hashlib.sha256(), hashlib.sha256()
            progressed = asyncio.Event()

            async def receive() -> Any:
                while True:
                    item = await channel.receive(timeout=WAIT)
                    if not isinstance(item, bytes):
                        return item
                    got_hash.update(item)
                    self.received += len(item)
                    progressed.set()

            receiver = asyncio.ensure_future(receive())
            while not self._stop.is_set() and not receiver.done():
                chunk = rng.randbytes(16 * 1024)
                channel.send(chunk)
                sent_hash.update(chunk)
                sent += len(chunk)
                while sent - self.received > self.WINDOW and not receiver.done():
                    progressed.clear()
                    await asyncio.wait_for(progressed.wait(), WAIT)
                await asyncio.sleep(self.PACE_S)
            channel.send_control("eof")
            end = await receiver
            with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):  # what the router relayed
                while (event := await session.stream.next(timeout=0.2)) is not None:
                    self.stream_events.append(event)
            self.stream_events += session.stream.events
            await session.close(client, gateway)
            return sent, self.received, end == {"op": "eof"} and sent_hash.digest() == got_hash.digest()

    def finish(self) -> tuple[int, int, bool]:
        """(bytes sent, bytes echoed back, all intact and in order)."""
        assert self._stop is not None
        self._thread.loop.call_soon_threadsafe(self._stop.set)
        try:
            return self._future.result(WAIT * 3)
        finally:
            self._thread.stop()


def _quoted(value: Any, safe: str = "") -> str:
    """Any generated value as one URL path piece (lone surrogates kept as their raw bytes)."""
    return quote(str(value).encode("utf-8", "surrogatepass"), safe=safe)


def weighted(*choices: tuple[st.SearchStrategy[Any], int]) -> st.SearchStrategy[Any]:
    """A choice between strategies with integer weights (one_of's own choice is not uniform)."""
    return st.sampled_from([strategy for strategy, weight in choices for _ in range(weight)]).flatmap(lambda s: s)


def _http_requests(gateway: str) -> st.SearchStrategy[tuple[str, str, bytes | None]]:
    """Mostly POSTs of generated actions to the live gateway (they reach the validators), the rest anything."""
    actions = f"/api/v1/gateways/{gateway}/actions"
    reachable_names = names.filter(lambda n: n != OFFLINE_GATEWAY)  # a known offline gateway is 503 by design
    # Offers whose SDP parses, so the fuzz reaches what is checked after it (resource, session).
    near_valid_offer = st.builds(
        lambda cid, trickle, resource, session: {"conversation_id": cid, "kind": "offer", "trickle_ice": trickle,
                                                 "data": {"type": "offer", "sdp": real_offer_sdp(),
                                                          "resource": resource, "session": session}},
        st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True), st.booleans(),
        weighted((st.just("echo"), 3), (names, 1)), weighted((st.none(), 1), (sessions, 2)))
    paths = st.one_of(
        reachable_names.map(lambda n: f"/api/v1/gateways/{_quoted(n)}/actions"),
        reachable_names.map(lambda n: f"/api/v1/gateways/{_quoted(n)}"),
        conversation_ids.map(lambda c: f"/api/v1/conversations/{_quoted(c)}/stream"),
        st.sampled_from(["/", "/api/v1/health", "/api/v1/resources", "/api/v1/gateway/connect",
                         "/api/v1/gateways//actions", "/api/v1/gateways/%2e%2e/actions", "/api/v1/../../etc/passwd",
                         "/%00", "/api/v2/x"]),
        any_text.map(lambda text: "/" + _quoted(text, safe="/")))
    bodies = weighted(
        (action_bodies.map(lambda b: json.dumps(b).encode()), 6),
        (action_bodies.map(lambda b: json.dumps(b, ensure_ascii=False).encode("utf-8", "surrogatepass")), 1),
        (near_valid_offer.map(lambda b: json.dumps(b).encode()), 2),
        (json_values.map(lambda v: json.dumps(v).encode()), 1), (st.binary(max_size=512), 1),
        (st.sampled_from([40, 999, 1500, 4000]).map(lambda depth: b"[" * depth + b"]" * depth), 1),
        (st.just(protocol.MAX_BODY_BYTES + 10).map(lambda n: b"{" + b" " * n + b"}"), 1), (st.none(), 1))
    methods = st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    return weighted((st.tuples(st.just("POST"), st.just(actions), bodies), 7), (st.tuples(methods, paths, bodies), 3))


def _auth(tokens: list[str]) -> st.SearchStrategy[str | None]:
    """Mostly a valid user token; otherwise none, a wrong one, or a malformed header."""
    junk = st.one_of(st.none(), st.sampled_from(["Bearer", "Bearer ", "Basic YWxpY2U6eA==", "bearer x" * 40]),
                     st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(lambda t: "Bearer " + t))
    return weighted((st.sampled_from([f"Bearer {t}" for t in tokens]), 4), (junk, 1))


def fuzz_http(gw: EmbeddedGateway, examples: int, rng_seed: int, tokens: list[str], row: Row, counts: Counter) -> None:
    """Generated HTTP requests: every reply is JSON, never 5xx, and errors are one line."""
    http = requests.Session()

    @settings(max_examples=examples, **FUZZ)
    @seed(rng_seed)
    @given(_http_requests(gw.gateway_name), _auth(tokens), st.sampled_from(["application/json", "text/plain", ""]))
    def one(request: tuple[str, str, bytes | None], auth: str | None, content_type: str) -> None:
        method, path, body = request
        headers = {"Content-Type": content_type, **({"Authorization": auth} if auth else {})}
        try:
            reply = http.request(method, gw.router_url + path, data=body, headers=headers, timeout=WAIT)
        except requests.RequestException as exc:
            row.fail(f"HTTP {method} {path[:60]}: no reply ({exc.__class__.__name__})")
            return
        counts["http requests"] += 1
        counts[f"HTTP {reply.status_code}"] += 1
        shown = f"{method} {path[:60]} body {(body or b'')[:80]!r}"
        if reply.status_code >= 500:
            row.fail(f"HTTP {reply.status_code} for {shown}: {reply.text[:200]}")
        elif reply.status_code >= 400 and method != "HEAD":
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                row.fail(f"HTTP {reply.status_code} without a JSON error for {shown}")
                return
            if not message or "\n" in message:
                row.fail(f"HTTP {reply.status_code} error is not one line for {shown}")

    one()
    http.close()


def _stream_frames() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(st.tuples(st.just("text"), control_messages), st.tuples(st.just("text"), any_text),
                     st.tuples(st.just("binary"), st.binary(max_size=256)),
                     st.tuples(st.just("text"), st.just(5000).map(lambda n: "x" * n)))


def _send_frames(ws: websocket.WebSocket, frames: list[tuple[str, Any]], counts: Counter, what: str) -> None:
    """Send until done or the router closes the socket (which it may, e.g. for an oversize frame)."""
    for kind, data in frames:
        try:
            if kind == "binary":
                ws.send_binary(data)
            else:
                ws.send(data.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
        except (websocket.WebSocketException, OSError):
            counts[f"{what} closed by the router"] += 1
            return
        counts[f"{what} messages"] += 1


def fuzz_streams(gw: EmbeddedGateway, examples: int, rng_seed: int, tokens: list[str], row: Row,
                 counts: Counter) -> None:
    """Conversation streams opened with generated ids and tokens, then sent generated frames."""
    base = gw.router_url.replace("http://", "ws://")

    @settings(max_examples=examples, **FUZZ)
    @seed(rng_seed)
    @given(weighted((st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True), 4), (conversation_ids, 1)), _auth(tokens),
           st.lists(_stream_frames(), min_size=1, max_size=6))
    def one(cid: Any, auth: str | None, frames: list[tuple[str, Any]]) -> None:
        url = f"{base}/api/v1/conversations/{_quoted(cid)}/stream"
        try:
            ws = websocket.create_connection(url, header=[f"Authorization: {auth}"] if auth else [], timeout=WAIT)
        except websocket.WebSocketBadStatusException as exc:
            counts[f"stream handshake {exc.status_code}"] += 1
            if exc.status_code >= 500:
                row.fail(f"stream handshake {exc.status_code} for id {str(cid)[:40]!r}")
            return
        try:
            if json.loads(ws.recv()) != {"type": "ready"}:
                row.fail("an accepted stream did not start with ready")
            _send_frames(ws, frames, counts, "stream")
        finally:
            ws.close()

    one()


def _gateway_frames(honest_conversation: str) -> st.SearchStrategy[tuple[str, Any]]:
    conversations = st.just(honest_conversation) | conversation_ids
    reply = st.fixed_dictionaries({"type": st.just("reply")}, optional={
        "id": st.integers(-1, 10 ** 6) | json_scalars | json_values, "ok": json_scalars, "data": json_values,
        "status": json_scalars, "error": json_scalars})
    event = st.fixed_dictionaries({"type": st.just("event"), "conversation_id": conversations | json_scalars,
                                   "event": json_values | st.fixed_dictionaries(
                                       {"type": st.sampled_from(["answer", "candidates", "state", "error"]),
                                        "message": st.just("INJECTED"), "state": st.sampled_from(["closed", "failed"]),
                                        "reason": st.just("INJECTED")})})
    return st.one_of(st.tuples(st.just("text"), reply.map(json.dumps)), st.tuples(st.just("text"), event.map(json.dumps)),
                     st.tuples(st.just("text"), json_values.map(json.dumps)), _stream_frames())


def fuzz_gateway_link(gw: EmbeddedGateway, examples: int, rng_seed: int, config: dict[str, Any],
                      honest_conversation: str, row: Row, counts: Counter) -> None:
    """Gateway connections: wrong tokens, bad hellos, and junk frames from an authenticated gateway.

    A second known gateway (offline-gw) may say anything; it must never reach a conversation of
    another gateway, take over another gateway's name, or stop the router.
    """
    url = gw.router_url.replace("http://", "ws://") + "/api/v1/gateway/connect"
    offline_token = next(g["token"] for g in config["gateways"] if g["name"] == OFFLINE_GATEWAY)
    good_hello = {"type": "hello", "gateway": OFFLINE_GATEWAY, "version": "1.8.0", "capabilities": ["trickle"]}
    hellos = weighted((st.just(good_hello).map(json.dumps), 6),
                      (st.just({**good_hello, "gateway": gw.gateway_name}).map(json.dumps), 1),
                      (st.fixed_dictionaries({"type": st.just("hello")}, optional={
                          "gateway": names, "version": json_scalars, "capabilities": json_values}).map(json.dumps), 1),
                      (json_values.map(json.dumps) | st.just(3000).map(lambda n: "[" * n), 1))
    tokens = weighted((st.just(offline_token), 6),
                      (st.sampled_from([None, "wrong-token-wrong-token", config["gateway"]["token"][:-1]]), 1))

    @settings(max_examples=examples, **FUZZ)
    @seed(rng_seed)
    @given(tokens, hellos, st.lists(_gateway_frames(honest_conversation), min_size=1, max_size=6))
    def one(gateway_token: str | None, hello: str, frames: list[tuple[str, Any]]) -> None:
        header = [f"Authorization: Bearer {gateway_token}"] if gateway_token else []
        try:
            ws = websocket.create_connection(url, header=header, timeout=WAIT)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code >= 500:
                row.fail(f"gateway handshake {exc.status_code}")
            return
        try:
            ws.send(hello)
            counts["gateway-link messages"] += 1
            try:
                welcome = ws.recv()
            except (websocket.WebSocketException, OSError):
                welcome = ""
            if welcome != '{"type": "welcome"}':
                counts["gateway hellos refused"] += 1
                return
            counts["gateway hellos welcomed"] += 1
            _send_frames(ws, frames, counts, "gateway-link")
        finally:
            ws.close()

    one()


def _send_if_open(channel: Any, message: str | bytes) -> None:
    """The gateway may rightly close a stream the fuzz sent an in-band eof or error on."""
    if channel.readyState == "open":
        channel.send(message)


def fuzz_channel(gw: EmbeddedGateway, examples: int, rng_seed: int, user_token: str, row: Row,
                 counts: Counter) -> None:
    """Generated control messages (channel 0) and in-band messages on a stream, from a real peer."""
    thread = LoopThread("fuzz-channel").start()
    try:
        async def open_session() -> tuple[RouterClient, Any, Any]:
            client = RouterClient(gw.router_url, user_token)
            session = await connect(client, gw.gateway_name, "echo")
            stream, reply = await session.peer.open_stream(protocol.MAX_STREAM_ID)
            assert reply["op"] == "opened", reply
            return client, session, stream

        client, session, stream = thread.run(open_session(), WAIT)

        @settings(max_examples=examples, **FUZZ)
        @seed(rng_seed)
        @given(st.sampled_from(["control", "control", "stream"]),
               control_messages | st.binary(max_size=64) | json_values.map(json.dumps))
        def one(where: str, message: str | bytes) -> None:
            target = session.peer.control if where == "control" else stream
            if isinstance(message, str):
                message = message.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            thread.loop.call_soon_threadsafe(_send_if_open, target.channel, message)
            counts["data-channel messages"] += 1

        one()

        async def still_answers() -> dict[str, Any] | None:
            session.peer.control.send_control("ping")
            while (reply := await session.peer.control.receive()) is not None:
                if reply == {"op": "pong"}:
                    return reply
            return None

        if thread.run(still_answers(), WAIT) != {"op": "pong"}:
            row.fail("the gateway stopped answering the fuzzed session's control channel")
        thread.run(session.close(client, gw.gateway_name), WAIT)
        thread.run(client.close(), WAIT)
    finally:
        thread.stop()


def fuzz(http: int = 1500, streams: int = 120, gateway_frames: int = 120, channel: int = 300, rng_seed: int = 1) -> Row:
    """Hostile input against a live router and gateway while an honest tunnel keeps moving data."""
    row = Row("input: generated requests and messages", "", 0, "")
    counts: Counter[str] = Counter()
    with EchoServer() as echo:
        resources = [echo_resource(echo), {"name": "closed", "kind": "tcp", "host": "127.0.0.1", "port": free_port()},
                     {**echo_resource(echo, "bob-only"), "users": ["bob"]}]
        config = make_config(resources, users=("alice", "bob", "carol", "dave"),
                             router={"rate_limit": 100000, "rate_burst": 100000})
        tokens = [token(config, "alice"), token(config, "bob")]
        with captured_logs(logging.ERROR) as records, warnings.catch_warnings(), EmbeddedGateway(config) as gw:
            # Other threads (aioice's consent jitter) use the random module while hypothesis
            # generates, and our strategies have long reprs: both warnings are noise here.
            warnings.simplefilter("ignore", HypothesisWarning)
            honest = HonestTraffic(gw.router_url, token(config, "dave"), gw.gateway_name)
            progress = [honest.received]
            for number, phase in enumerate( (lambda: fuzz_http(gw, http, rng_seed, tokens, row, counts),
                          lambda: fuzz_streams(gw, streams, rng_seed, tokens, row, counts),
                          lambda: fuzz_gateway_link(gw, gateway_frames, rng_seed, config, honest.conversation_id,
                                                    row, counts),
                          lambda: fuzz_channel(gw, channel, rng_seed, token(config, "carol"), row, counts)), 1):
                phase()
                try:  # it keeps passing data: more arrives after each phase
                    wait_until(lambda: honest.received > progress[-1])
                except TimeoutError:
                    row.fail(f"the honest tunnel stopped moving data during fuzz phase {number}")
                progress.append(honest.received)
            sent, echoed, intact = honest.finish()
            status = requests.get(f"{gw.router_url}/api/v1/gateways/{gw.gateway_name}", timeout=WAIT,
                                  headers={"Authorization": f"Bearer {tokens[0]}"})
            if status.status_code != 200 or not status.json().get("online"):
                row.fail(f"the honest gateway is not online at the end ({status.status_code})")
        for record in records:
            if not record.startswith(FUZZ_CLIENT_LOGGERS):  # the fuzzer's own libraries may complain
                row.fail(f"logged: {record.splitlines()[0][:200]}")
    if not intact or sent != echoed:
        row.fail(f"the honest tunnel lost data: sent {sent} bytes, got {echoed} back (intact: {intact})")
    injected = [e for e in honest.stream_events if "INJECTED" in json.dumps(e)]
    if injected:
        row.fail(f"a gateway's junk reached another gateway's conversation: {injected[0]}")
    total = sum(counts[k] for k in ("http requests", "stream messages", "gateway-link messages",
                                     "data-channel messages"))
    row.times = total
    row.tried = (f"{counts['http requests']} HTTP requests, {counts['stream messages']} conversation-stream "
                 f"and {counts['gateway-link messages']} gateway-link WebSocket messages, "
                 f"{counts['data-channel messages']} data-channel messages (hypothesis, seed {rng_seed})")
    statuses = sorted((k.split()[1], v) for k, v in counts.items() if k.startswith("HTTP "))
    server_errors = sum(v for s, v in statuses if s >= "500")
    row.survived = (f"{server_errors or 'no'} 5xx (statuses: {', '.join(f'{s}×{n}' for s, n in statuses)}); "
                    f"{sum(1 for f in row.failures if f.startswith('logged')) or 'nothing'} logged at ERROR; "
                    f"an honest tunnel echoed {echoed / 2 ** 20:.1f} MiB {'intact' if intact else 'DAMAGED'}, "
                    "still moving data after every phase")
    row.figures = {"counts": dict(counts), "honest_bytes": echoed, "progress": progress}
    return row


# --- access ---------------------------------------------------------------------------------------

def _action_body(kind: str, conversation_id: str | None, data: Any = None) -> bytes:
    body: dict[str, Any] = {"kind": kind, "data": data or {}}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return json.dumps(body).encode()


def _offer(resource: str) -> dict[str, Any]:
    return {"type": "offer", "sdp": real_offer_sdp(), "resource": resource}  # call it off the loop first (cached)


async def _access_attempts(stack: Any, config: dict[str, Any], port: int, row: Row, refused: Counter) -> None:
    """Every way in that must be refused, at the router and (after a router restart) at the gateway."""
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.router import Router

    url, name = stack.router.url, config["gateway"]["name"]
    actions = f"/api/v1/gateways/{name}/actions"

    async def attempt(what: str, client: RouterClient, method: str, path: str, body: bytes | None,
                      expected: int) -> None:
        status, reply, _ = await client.request(method, path, body=body)
        row.times += 1
        if status != expected:
            row.fail(f"{what}: HTTP {status}, expected {expected} ({str(reply)[:120]})")
        else:
            refused[expected] += 1

    async with RouterClient(url, token(config, "bob")) as bob, RouterClient(url, token(config, "alice")) as alice, \
            RouterClient(url, token(config, "carol")) as carol, RouterClient(url, None) as nobody, \
            RouterClient(url, "x" * 43) as stranger:
        session = await connect(bob, name, "echo")
        cid = session.conversation_id
        stream_path = f"/api/v1/conversations/{cid}/stream"
        for what, client, method, path, body, expected in [
            ("another user closes bob's conversation", alice, "POST", actions, _action_body("close", cid), 403),
            ("another user sends candidates into it", alice, "POST", actions,
             _action_body("icecandidate", cid, {"candidates": []}), 403),
            ("another user offers on it", alice, "POST", actions, _action_body("offer", cid, _offer("echo")), 403),
            ("another user opens its stream", alice, "GET", stream_path, None, 403),
            ("a resource outside the allow list", alice, "POST", actions,
             _action_body("offer", "conv-" + "a" * 16, _offer("bob-only")), 403),
            ("no token", nobody, "POST", actions, _action_body("ping", None), 401),
            ("a wrong token", stranger, "POST", actions, _action_body("ping", None), 401),
            ("a wrong token lists resources", stranger, "GET", "/api/v1/resources", None, 401),
            ("a wrong token opens a stream", stranger, "GET", stream_path, None, 401),
            ("a wrong token asks for a gateway", stranger, "GET", f"/api/v1/gateways/{name}", None, 401),
        ]:
            await attempt(what, client, method, path, body, expected)
        status, listing = await alice.get("/api/v1/resources")
        row.times += 1
        if "bob-only" in json.dumps(listing):
            row.fail("the allow list did not hide bob-only from alice's resource list")
        else:
            refused["hidden"] += 1
        # carol goes over her action budget; alice, on her own token, does not notice
        over = 0
        for _ in range(config["router"]["rate_burst"] + 5):
            status, _, headers = await carol.request("POST", actions, body=_action_body("ping", None))
            if status == 429:
                over += 1
                retry_after = int(headers.get("Retry-After", "0"))
        row.times += over
        if not over or retry_after < 1:
            row.fail("a token over its action budget was not refused with 429 and Retry-After")
        else:
            refused[429] += over
        status, _, _ = await alice.request("POST", actions, body=_action_body("ping", None))
        if status != 200:
            row.fail(f"alice was limited by carol's budget: HTTP {status}")
        # The router restarts and forgets every binding; the gateway still refuses alice on bob's session.
        await stack.router.stop()
        stack.router = Router(config_from_dict(config).router)
        await stack.router.start("127.0.0.1", port)
        await asyncio.wait_for(stack.agent.online.wait(), WAIT)
        await attempt("another user closes bob's conversation after a router restart", alice, "POST", actions,
                      _action_body("close", cid), 403)
        channel, reply = await session.peer.open_stream(protocol.FIRST_STREAM_ID + 2)
        channel.send(b"still mine")
        if reply.get("op") != "opened" or await channel.receive() != b"still mine":
            row.fail("bob's session stopped passing data")
        await bob.action(name, cid, "close")
        await session.peer.close()


def _private_files(folder: Path, config: dict[str, Any], row: Row, refused: Counter) -> None:
    """Files holding secrets that others could read are refused, with the fix in the message."""
    import asyncssh

    from commander_pam_plugin.config import load_config as load_client_config
    from commander_pam_plugin.gateway.config import ConfigError, config_from_dict, load_config

    gateway_file = folder / "shared-gateway.toml"
    gateway_file.write_text(to_toml(config))
    key_file = folder / "shared-key"
    key_file.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    client_file = folder / "shared-client.toml"
    client_file.write_text(f'router_url = "http://127.0.0.1:9"\ntoken = "{token(config, "alice")}"\n')
    for path in (gateway_file, key_file, client_file):
        path.chmod(0o644)
    key_config = {**config, "resources": [{"name": "k", "kind": "ssh", "host": "127.0.0.1", "port": 22,
                                           "username": "u", "private_key": str(key_file)}]}
    for what, load in (("a gateway config others can read", lambda: load_config(gateway_file)),
                       ("a private key others can read", lambda: config_from_dict(key_config)),
                       ("a client config others can read", lambda: load_client_config({"PAM_CONFIG": str(client_file)}))):
        row.times += 1
        try:
            load()
        except (ConfigError, PamError) as exc:
            message = str(exc)
            if "chmod 600" in message and "\n" not in message and token(config, "alice") not in message:
                refused["private"] += 1
                continue
            row.fail(f"{what}: unclear refusal: {message[:160]}")
            continue
        row.fail(f"{what} was accepted")


def access_control(folder: Path) -> Row:
    """Tokens, allow lists, conversation ownership (router and gateway), rate limits, private files."""
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.embedded import start_stack

    row = Row("access: tokens, allow lists, ownership, rate limit, private files", "", 0, "")
    refused: Counter[Any] = Counter()
    with EchoServer() as echo:
        resources = [echo_resource(echo), {**echo_resource(echo, "bob-only"), "users": ["bob"]}]
        config = make_config(resources, router={"rate_limit": 2, "rate_burst": 20})
        real_offer_sdp()  # made (and cached) here: it runs its own event loop
        port, thread = free_port(), LoopThread("access").start()
        try:
            stack = thread.run(start_stack(config_from_dict(config), "127.0.0.1", port), WAIT)
            thread.run(stack.wait_online(WAIT), WAIT + 1)
            thread.run(_access_attempts(stack, config, port, row, refused), WAIT * 3)
            thread.run(stack.close(), WAIT)
        finally:
            thread.stop()
        _private_files(folder, config, row, refused)
    row.tried = ("another user's conversation (close, candidates, offer, stream; again at the gateway after a "
                 "router restart), a resource outside the allow list, missing and wrong tokens, a token over its "
                 "action budget, secret files readable by others")
    row.survived = (f"all refused: 403×{refused[403]}, 401×{refused[401]}, 429×{refused[429]} (with Retry-After; "
                    f"another token unaffected), allow list hid the resource, {refused['private']} files refused "
                    "with 'chmod 600'; the owner's session kept passing data")
    return row


# --- faults ---------------------------------------------------------------------------------------

def _launch_cat(env: dict[str, str], resource: str) -> Proc:
    """`pam launch RESOURCE --command cat` in pipe mode (stdin is a pipe), proven live by one echoed line."""
    launch = Proc([*SHELL, "pam", "launch", resource, "--command", "cat"], env=env, stdin=True)
    assert launch.proc.stdin is not None
    launch.proc.stdin.write("alive\n")
    launch.proc.stdin.flush()
    launch.wait_for("^alive$")
    return launch


def gateway_killed(runs: int, folder: Path) -> Row:
    """kill -9 the gateway under a live tunnel and a live launch; both say so; a new tunnel works once it is back."""
    row = Row("fault: gateway killed mid-session", "", runs, "")
    tunnel_s: list[float] = []
    launch_s: list[float] = []
    reasons: set[str] = set()
    with EchoServer() as echo, demo_ssh_server() as ssh:
        config = make_config([echo_resource(echo), ssh_resource(ssh, "ssh")])
        port = free_port()
        url, alice = f"http://127.0.0.1:{port}", token(config, "alice")
        env = client_env(url, alice, folder)
        for run in range(runs):
            gateway = serve(config, folder, port)
            launch = None
            try:
                with shell_for(url, alice, folder) as shell:
                    status, out, err = shell.run("pam tunnel start echo --json")
                    tunnel_port = json.loads(out)["port"]
                    assert echo_roundtrip(tunnel_port, b"before") == b"before"
                    launch = _launch_cat(env, "ssh")
                    gateway.kill()
                    killed = time.monotonic()
                    noticed = wait_until(lambda: "lost:" in shell.err.getvalue())
                    tunnel_s.append(noticed - killed)
                    launch.proc.wait(WAIT)
                    launch_s.append(launch.lines[-1][0] - killed if launch.lines else WAIT)
                    reasons.add(shell.err.getvalue().strip().splitlines()[-1])
                    reasons.add(launch.text("err").strip().splitlines()[-1])
                    if launch.proc.returncode == 0 or "lost" not in launch.text("err"):
                        row.fail(f"run {run}: launch ended with {launch.proc.returncode}: {launch.text('err')[-200:]}")
                    gateway = serve(config, folder, port)
                    status, out, err = shell.run("pam tunnel start echo --json")
                    if status != 0 or echo_roundtrip(json.loads(out)["port"], b"after") != b"after":
                        row.fail(f"run {run}: no new tunnel once the gateway was back: {err.strip()}")
            except (TimeoutError, AssertionError, KeyError, ValueError) as exc:
                row.fail(f"run {run}: {exc.__class__.__name__}: {str(exc)[:200]}")
            finally:
                gateway.stop()
                if launch is not None:
                    launch.kill()
    row.tried = "kill -9 of `pam-gateway serve` under a live tunnel and a live `pam launch`, then restart it"
    row.survived = (f"tunnel reported it {len(tunnel_s)}/{runs} (max {max(tunnel_s, default=0):.1f} s), launch "
                    f"{len(launch_s)}/{runs} (max {max(launch_s, default=0):.1f} s, exit 255); a new "
                    f"`pam tunnel start` worked each time the gateway was back")
    row.figures = {"tunnel_detect_s": tunnel_s, "launch_detect_s": launch_s, "lines": sorted(reasons)}
    return row


def router_restarted(runs: int, folder: Path) -> Row:
    """kill -9 the router (gateway agent apart); the agent redials with backoff; tunnels keep working."""
    row = Row("fault: router restarted", "", runs, "")
    reconnect_s: list[float] = []
    gaps: list[list[float]] = []
    with EchoServer() as echo:
        config = make_config([echo_resource(echo)])
        port = free_port()
        config["router"]["listen"] = f"127.0.0.1:{port}"
        path = write_config(config, folder, "split.toml")
        url, name = f"http://127.0.0.1:{port}", config["gateway"]["name"]
        router = Gateway("router", path)
        router.wait_for("router listening")
        agent = Gateway("agent", path, "--router", url)
        client = runtime(url, token(config, "alice"))
        ref = ResourceRef("echo", name, "tcp")
        try:
            agent.wait_for(f"gateway {name} online at")
            tunnel = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
            for run in range(runs):
                mark = len(agent.lines)
                router.kill()
                agent.wait_for("lost the router link", since=mark)
                router = Gateway("router", path)
                _, _, listening = router.wait_for("router listening")
                index, _, online = agent.wait_for(f"gateway {name} online at", since=mark)
                reconnect_s.append(online - listening)
                gaps.append([round(b - a, 3) for a, b in zip(*(lambda t: (t, t[1:]))(
                    agent.stamps("lost the router link|unreachable|online at", mark)))])
                if echo_roundtrip(tunnel.port, b"old tunnel %d" % run) != b"old tunnel %d" % run:
                    row.fail(f"run {run}: the tunnel opened before the restart stopped passing data")
                fresh = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
                if echo_roundtrip(fresh.port, b"new tunnel") != b"new tunnel":
                    row.fail(f"run {run}: a tunnel opened after the restart did not pass data")
                client.stop_tunnel(fresh.id)
        except (TimeoutError, PamError, OSError) as exc:
            row.fail(f"{exc.__class__.__name__}: {str(exc)[:200]}")
        finally:
            client.shutdown()
            agent.stop()
            router.stop()
    redials = sorted({len(g) - 1 for g in gaps})
    row.tried = "kill -9 of `pam-gateway router` and a restart on the same port, the agent running apart"
    row.survived = (f"the agent redialled by itself {len(reconnect_s)}/{runs} (online {max(reconnect_s, default=0):.2f} s "
                    f"at most after the router was back; {'-'.join(map(str, redials))} redials with growing, "
                    "jittered gaps); the open tunnel and a new one passed data")
    row.figures = {"reconnect_after_router_ready_s": reconnect_s, "gaps_between_redials_s": gaps}
    return row


def client_killed(runs: int, folder: Path, one_way_s: float = 1.0, ice_timeout: float | None = None) -> Row:
    """kill -9 a `pam tunnel start` client mid-session and mid-negotiation; the gateway frees its peer.

    ice_timeout: the gateway's setting (None: its default, which the full run measures).
    """
    row = Row("fault: client killed", "", runs * 2, "")
    freed: dict[str, list[float]] = {"mid-session": [], "mid-negotiation": []}
    with EchoServer() as echo:
        extra = {} if ice_timeout is None else {"ice_timeout": ice_timeout}
        config = make_config([echo_resource(echo)], **extra)
        port = free_port()
        gateway = serve(config, folder, port)
        proxy_thread = LoopThread("latency-proxy").start()
        proxy = proxy_thread.run(LatencyProxy("127.0.0.1", port, one_way_s).start(), WAIT)
        alice = token(config, "alice")
        try:
            for run in range(runs):
                for phase, url in (("mid-session", f"http://127.0.0.1:{port}"),
                                   ("mid-negotiation", f"http://127.0.0.1:{proxy.port}")):
                    mark = len(gateway.lines)
                    client = Proc([*SHELL, "pam", "tunnel", "start", "echo", "--json"], env=client_env(url, alice, folder))
                    try:
                        _, opened, _ = gateway.wait_for(r"conversation (\S+) \(alice, echo\) opened", since=mark)
                        if phase == "mid-session":
                            _, line, _ = client.wait_for(r'^\{.*"port"')
                            data = b"x" * 4096
                            if echo_roundtrip(json.loads(line.string)["port"], data) != data:
                                row.fail(f"run {run}: the tunnel did not work before the kill")
                        elif any(n == "out" for _, n, _ in client.lines):
                            row.fail(f"run {run}: the client connected before the kill (not mid-negotiation)")
                        client.kill()
                        killed = time.monotonic()
                        cid = re.escape(opened.group(1))
                        _, ended, at = gateway.wait_for(rf"conversation {cid} .* (closed|failed): ", since=mark,
                                                        timeout=WAIT * 2)
                        freed[phase].append(at - killed)
                    except (TimeoutError, ValueError) as exc:
                        row.fail(f"run {run} {phase}: {str(exc)[:200]}")
                    finally:
                        client.kill()
            if gateway.live_sessions():
                row.fail(f"sessions still live at the gateway: {sorted(gateway.live_sessions())}")
        finally:
            proxy_thread.run(proxy.close(), WAIT)
            proxy_thread.stop()
            gateway.stop()
    row.tried = (f"kill -9 of a `pam tunnel start` client mid-session and mid-negotiation (its offer applied, "
                 f"the answer held back {one_way_s:g} s by a latency proxy)")
    row.survived = (f"the gateway freed the peer each time: mid-session max {max(freed['mid-session'], default=0):.1f} s "
                    f"(ICE consent), mid-negotiation max {max(freed['mid-negotiation'], default=0):.1f} s "
                    f"(ice_timeout); no session left")
    row.figures = {f"{k}_freed_s": v for k, v in freed.items()}
    return row


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


# --- load and leaks -------------------------------------------------------------------------------

def echo_load(ports: list[int], size: int) -> list[bool]:
    """One echo round trip of `size` seeded bytes through each port at once; True where intact.

    Runs in its own process (`--echo-load`): a tunnel's user is another process, and load
    threads inside the client's process would starve the plugin's loop of the GIL.
    """
    def one(index_port: tuple[int, int]) -> bool:
        index, port = index_port
        data = payload(size, index)
        try:
            return sha256(echo_roundtrip(port, data)) == sha256(data)
        except OSError:
            return False

    with ThreadPoolExecutor(len(ports)) as pool:
        return list(pool.map(one, enumerate(ports)))


def concurrent_sessions(sessions: int, size: int, folder: Path, idle: int = 5) -> Row:
    """N tunnels up at once against one gateway process, each moving `size` bytes both ways,
    while `idle` more sit quiet (a busy gateway must not drop them either).

    Three processes besides the gateway's: this one holds the tunnels (the plugin's runtime),
    benchmarks/tcp_target.py is the echo target, and an --echo-load child is the tunnels' user.
    """
    row = Row("load: concurrent sessions", "", sessions, "")
    target = Proc([sys.executable, str(ROOT / "benchmarks" / "tcp_target.py")], stdin=True)
    try:
        echo_port = json.loads(target.wait_for(r"^\{")[1].string)["echo"]
        # One user opens every session here, so the per-token budget is raised for this check.
        config = make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo_port}],
                             router={"rate_limit": 1000, "rate_burst": 1000})
        port = free_port()
        gateway = serve(config, folder, port)
        client = runtime(f"http://127.0.0.1:{port}", token(config, "alice"))
        ref = ResourceRef("echo", config["gateway"]["name"], "tcp")
        try:
            idle_rss = gateway.status("VmRSS")
            ready, tunnels = [], []

            def open_one(_: int) -> Any:
                started = time.monotonic()
                tunnel = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
                ready.append(time.monotonic() - started)
                return tunnel

            with ThreadPoolExecutor(sessions + idle) as pool:  # all negotiating at once
                for future in [pool.submit(open_one, i) for i in range(sessions + idle)]:
                    try:
                        tunnels.append(future.result(WAIT * 3))
                    except PamError as exc:
                        row.fail(f"a tunnel did not open: {exc.message}")
            peak = {"rss_kb": gateway.status("VmRSS"), "live": len(gateway.live_sessions())}
            busy, quiet = tunnels[:sessions], tunnels[sessions:]
            load = Proc([sys.executable, str(ROOT / "benchmarks" / "reliability.py"), "--echo-load",
                         ",".join(str(t.port) for t in busy), "--size", str(size)])
            results = json.loads(load.wait_for(r"^\[", timeout=WAIT * 6)[1].string)
            quiet_ok = sum(1 for t in quiet if echo_roundtrip(t.port, b"still here") == b"still here")
            states = [f"{t.state}: {t.reason}" if t.reason else t.state for t in tunnels]
            for tunnel in tunnels:
                client.stop_tunnel(tunnel.id)
        finally:
            client.shutdown()
            gateway.stop()
    finally:
        target.stop()
    intact = sum(results)
    if intact != sessions:
        row.fail(f"{sessions - intact} transfers damaged or cut (tunnels: "
                 f"{', '.join(f'{n} {state}' for state, n in Counter(states).items())})", sessions - intact)
    if quiet_ok != idle:
        row.fail(f"{idle - quiet_ok} of {idle} idle tunnels were dropped while the others were busy", idle - quiet_ok)
    if peak["live"] != sessions + idle:
        row.fail(f"the gateway held {peak['live']} sessions at once, not {sessions + idle}")
    ready.sort()
    per_session_kb = (peak["rss_kb"] - idle_rss) / (sessions + idle)
    row.tried = (f"{sessions} tunnels opened at once against one gateway process, then each echoing "
                 f"{size / 2 ** 20:g} MiB at the same time (the load in its own process), {idle} more idle")
    row.survived = (f"{intact}/{sessions} transfers intact (sha256), {quiet_ok}/{idle} idle tunnels still up, "
                    f"{peak['live']} sessions live together; "
                    f"ready p50 {_pct(ready, 50):.2f} s, p95 {_pct(ready, 95):.2f} s; gateway "
                    f"~{per_session_kb / 1024:.1f} MiB RSS per session")
    row.figures = {"ready_s": ready, "idle_rss_kb": idle_rss, "peak": peak, "per_session_kb": per_session_kb,
                   "tunnel_states": dict(Counter(states))}
    return row


def _pct(values: list[float], pct: int) -> float:
    return values[min(len(values) - 1, int(len(values) * pct / 100))] if values else 0.0


def open_close_cycles(cycles: int, folder: Path, warmup: int = 10) -> Row:
    """Open a tunnel, move bytes, close it, many times: gateway RSS and client fds/threads stay put."""
    row = Row("leaks: open/close cycles", "", cycles, "")
    with EchoServer() as echo:
        config = make_config([echo_resource(echo)], router={"rate_limit": 1000, "rate_burst": 1000})
        port = free_port()
        gateway = serve(config, folder, port)
        client = runtime(f"http://127.0.0.1:{port}", token(config, "alice"))
        ref = ResourceRef("echo", config["gateway"]["name"], "tcp")
        data = payload(64 * 1024, 5)

        def cycle() -> None:
            tunnel = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
            try:
                if echo_roundtrip(tunnel.port, data) != data:
                    row.fail("a cycle's transfer was damaged")
            finally:
                client.stop_tunnel(tunnel.id)

        try:
            for _ in range(warmup):
                cycle()
            before = (gateway.status("VmRSS"), gateway.fd_count(), open_fds(), {t.name for t in threading.enumerate()})
            for index in range(cycles):
                try:
                    cycle()
                except PamError as exc:
                    row.fail(f"cycle {index}: {exc.message}")
            after = (gateway.status("VmRSS"), gateway.fd_count(), open_fds(), {t.name for t in threading.enumerate()})
            live = gateway.live_sessions()
        finally:
            client.shutdown()
            gateway.stop()
    growth_mb = (after[0] - before[0]) / 1024
    new_fds, new_threads = after[2] - before[2], after[3] - before[3]
    if growth_mb >= RSS_BOUND_MB:
        row.fail(f"gateway RSS grew {growth_mb:.1f} MB (bound {RSS_BOUND_MB:g} MB)")
    if new_fds or new_threads:
        row.fail(f"client kept {len(new_fds)} more fds and threads {sorted(new_threads)}")
    if after[1] > before[1] or live:
        row.fail(f"gateway fds {before[1]} -> {after[1]}, sessions still live: {sorted(live)}")
    row.tried = f"tunnel open, 64 KiB echoed, close, in one client process against one gateway process (after {warmup} warm-up)"
    row.survived = (f"gateway RSS {growth_mb:+.1f} MB ({before[0] / 1024:.0f} -> {after[0] / 1024:.0f} MB), "
                    f"gateway fds {before[1]} -> {after[1]}, client fds {len(before[2])} -> {len(after[2])}, "
                    f"threads {len(before[3])} -> {len(after[3])}; no session left")
    row.figures = {"gateway_rss_kb": [before[0], after[0]], "gateway_fds": [before[1], after[1]],
                   "client_fds": [len(before[2]), len(after[2])], "client_threads": [len(before[3]), len(after[3])]}
    return row


# --- secrets --------------------------------------------------------------------------------------

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


# --- the table ------------------------------------------------------------------------------------

FULL = {"fuzz": dict(http=1600, streams=150, gateway_frames=150, channel=300), "gateway": 5, "router": 5,
        "client": 3, "targets": 20, "sessions": (50, 1024 * 1024), "cycles": 300}
QUICK = {"fuzz": dict(http=200, streams=20, gateway_frames=20, channel=40), "gateway": 1, "router": 1,
         "client": 1, "targets": 3, "sessions": (10, 256 * 1024), "cycles": 25}


def checks(sizes: dict[str, Any], folder: Path) -> dict[str, Callable[[], Row]]:
    """Every check by short name, at the given sizes, in table order."""
    return {"fuzz": lambda: fuzz(**sizes["fuzz"]),
            "access": lambda: access_control(folder),
            "gateway": lambda: gateway_killed(sizes["gateway"], folder),
            "router": lambda: router_restarted(sizes["router"], folder),
            "client": lambda: client_killed(sizes["client"], folder),
            "targets": lambda: target_faults(sizes["targets"], folder),
            "timeouts": lambda: connect_timeouts(),
            "sessions": lambda: concurrent_sessions(*sizes["sessions"], folder),
            "cycles": lambda: open_close_cycles(sizes["cycles"], folder),
            "secrets": lambda: secrets_scan(folder)}


def apply_time_bounds(row: Row) -> Row:
    """The issue's time bounds, as lost entries of the row (benchmark runs only)."""
    for figure, bound in TIME_BOUNDS.get(row.check, []):
        late = [t for t in row.figures.get(figure, []) if t > bound]
        if late:
            row.fail(f"{figure}: {max(late):.1f} s, over the bound of {bound:g} s")
    return row


def table(rows: list[Row]) -> str:
    lines = ["| check | what was tried | times | what survived | lost |", "|---|---|---:|---|---:|"]
    for row in rows:
        lost = str(row.lost) if not row.failures else f"{row.lost}: " + "; ".join(row.failures[:3])
        cells = (row.check, row.tried, str(row.times), row.survived, lost)
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


BEGIN, END = "<!-- reliability table: begin -->", "<!-- reliability table: end -->"


def write_doc(markdown: str, note: str) -> None:
    """Replace the table between the markers in docs/RELIABILITY.md."""
    path = ROOT / "docs" / "RELIABILITY.md"
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + f"\n{note}\n\n{markdown}\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the sizes the tests use")
    parser.add_argument("--only", help="comma-separated checks: " + ", ".join(FULL))
    parser.add_argument("--json", metavar="FILE", help="write every row and figure as JSON")
    parser.add_argument("--write-doc", action="store_true", help="put the table into docs/RELIABILITY.md (full runs)")
    parser.add_argument("--echo-load", metavar="PORTS", help=argparse.SUPPRESS)  # concurrent_sessions' child
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_doc and (args.quick or args.only):
        parser.error("--write-doc takes a full run (no --quick, no --only)")
    if args.echo_load:
        print(json.dumps(echo_load([int(p) for p in args.echo_load.split(",")], args.size)), flush=True)
        return 0
    logging.getLogger().addHandler(logging.NullHandler())  # rows carry what matters; expected warnings stay quiet
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="pam-reliability-") as tmp:
        selected = checks(sizes, Path(tmp))
        names_wanted = args.only.split(",") if args.only else list(selected)
        rows = []
        for name in names_wanted:
            started = time.monotonic()
            rows.append(apply_time_bounds(selected[name]()))
            print(f"{name}: {rows[-1].lost} lost ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    markdown = table(rows)
    print(markdown)
    note = (f"Run {datetime.now().strftime('%Y-%m-%d')} with `python benchmarks/reliability.py"
            f"{' --quick' if args.quick else ''}` on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            "everything on 127.0.0.1 (client, router, gateway and targets share the cores).")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    if args.write_doc:
        write_doc(markdown, note)
    return 1 if any(r.lost for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
