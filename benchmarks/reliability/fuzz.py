"""The live fuzz: hypothesis-made HTTP, stream, gateway-link and data-channel input against a live stack."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import threading
import warnings
from collections import Counter
from typing import Any
from urllib.parse import quote

import aiohttp
import requests
import websocket
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import HypothesisWarning
from hypothesis import strategies as st

from commander_pam_plugin import protocol
from commander_pam_plugin.gateway.embedded import EmbeddedGateway, LoopThread
from gateway_support import OFFLINE_GATEWAY, EchoServer, RouterClient, connect, free_port, make_config
from test_fuzz_validators import (action_bodies, any_text, control_messages, conversation_ids, json_scalars,
                                  json_values, names, real_offer_sdp, sessions)
from .stack import Row, WAIT, captured_logs, echo_resource, token, wait_until


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
