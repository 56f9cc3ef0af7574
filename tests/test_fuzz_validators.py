"""Property-based tests of every protocol validator, and the input strategies the live fuzz reuses.

Each validator must either accept a value (and then what it returns obeys the protocol's
limits) or refuse it with ProtocolError: a 4xx status and one short line that never echoes
the input. Anything else (TypeError, RecursionError, UnicodeEncodeError...) would be a 500 at
the router or a dead handler at the gateway. benchmarks/reliability/ imports the strategies
below to build the requests and messages of its fuzz run.
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commander_pam_plugin import protocol, rtc
from commander_pam_plugin.protocol import ProtocolError

MARKER = "MARKER-7f3a9c1e5b"  # stands in for a secret a client might put anywhere
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------------------------------

def repeat(text: str, *counts: int) -> st.SearchStrategy[str]:
    """Long strings built on demand (a literal in sampled_from would bloat every strategy's repr)."""
    return st.sampled_from(counts).map(lambda count: text * count)


any_text = st.text(st.characters(exclude_categories=()), max_size=48)  # surrogates included
edge_text = st.sampled_from(["", " ", "\n", "echo\n", "\x00", "\ud800", "..", "../x", "%00", "é", "null",
                             MARKER]) | repeat("a", 65, 513)
json_scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                | any_text | edge_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=16)
names = (st.sampled_from(["echo", "closed", "bob-only", "ssh", "gw-test", "offline-gw", "no-such"])
         | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True) | edge_text | json_values)
conversation_ids = (st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True) | st.text(max_size=70)
                    | st.sampled_from(["abcdefgh\n", "abcd/efgh", MARKER]) | repeat("a", 7, 64, 65)
                    | json_values)
hosts = (st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str)
         | st.sampled_from(["127.0.0.1", "0.0.0.0", "host.local", "", "1.2.3", "::ffff:1.2.3.4"]) | repeat("x", 300)
         | any_text)
candidate_lines = st.builds(
    lambda foundation, component, proto, priority, host, port, kind, extra:
    f"candidate:{foundation} {component} {proto} {priority} {host} {port} typ {kind}{extra}",
    st.from_regex(r"[A-Za-z0-9+/]{1,32}", fullmatch=True) | any_text,
    st.integers(-1, 300), st.sampled_from(["udp", "tcp", "UDP", "sctp", ""]),
    st.integers(-2 ** 40, 2 ** 40), hosts, st.integers(-5, 70000),
    st.sampled_from(["host", "srflx", "relay", "prflx", "bogus", ""]),
    st.sampled_from(["", " generation 0", " raddr 1.2.3.4 rport 9", " tcptype active", " raddr", " ufrag"]),
) | any_text | st.sampled_from(["candidate:", "candidate:1 1 udp 1 127.0.0.1 9 typ host"]) | repeat("c", 600)
candidates = (st.fixed_dictionaries({"candidate": candidate_lines},
                                    optional={"sdpMid": st.none() | st.sampled_from(["0", "1"]) | repeat("x", 40)
                                              | json_scalars,
                                              "sdpMLineIndex": st.integers(-2, 20) | json_scalars})
              | json_values)
sessions = st.none() | json_values | st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["tunnel", "terminal", "TUNNEL", ""]) | json_scalars,
    "term": st.sampled_from(["xterm-256color", "vt100", "xterm\n", "a b"]) | repeat("x", 65) | json_scalars,
    "cols": st.integers(-1, 1002) | json_scalars, "rows": st.integers(-1, 1002) | json_scalars,
    "command": st.sampled_from([None, "ls -l", "echo\x00", "\ud800"]) | repeat("x", 4097) | repeat("é", 2049)
               | any_text,
    "pty": st.booleans() | json_scalars})


@functools.lru_cache(maxsize=1)
def real_offer_sdp() -> str:
    """An offer as the plugin makes it (aiortc, 127.0.0.1 candidates), built once."""
    async def make() -> str:
        pc = rtc.new_peer_connection([])
        pc.createDataChannel("control", negotiated=True, id=protocol.CONTROL_CHANNEL_ID)
        await rtc.set_local_description(pc, await pc.createOffer(), ["127.0.0.1"])
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp
    return asyncio.run(make())


def _mutate(sdp: str, index: int, replacement: str) -> str:
    lines = sdp.split("\r\n")
    lines[index % len(lines)] = replacement
    return "\r\n".join(lines)


sdps = (st.deferred(lambda: st.just(real_offer_sdp()))
        | st.deferred(lambda: st.builds(_mutate, st.just(real_offer_sdp()), st.integers(0, 40),
                                        st.sampled_from(["", "m=audio 9 RTP/AVP 0", "a=ice-ufrag:", "garbage",
                                                         "a=fingerprint:sha-256 zz", "a=candidate:junk"])
                                        | any_text))
        | st.sampled_from(["", "v=0", "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"])
        | repeat("x", 40000)
        | any_text | json_scalars)
offer_data = json_values | st.fixed_dictionaries(
    {"sdp": sdps, "resource": names}, optional={"type": st.sampled_from(["offer", "answer"]) | json_scalars,
                                                "session": sessions})
icecandidate_data = json_values | st.one_of(
    st.fixed_dictionaries({"candidates": st.lists(candidates, max_size=70) | json_values},
                          optional={"end_of_candidates": st.booleans() | json_scalars}),
    st.fixed_dictionaries({"candidate": st.none() | candidates},
                          optional={"end_of_candidates": st.booleans() | json_scalars}),
    st.fixed_dictionaries({}, optional={"end_of_candidates": st.booleans() | json_scalars}))
kinds = st.sampled_from(protocol.ACTION_KINDS) | json_scalars


def _action(kind: Any, data: Any, conversation_id: Any, trickle: Any, drop: list[str]) -> Any:
    body = {"kind": kind, "data": data, "conversation_id": conversation_id, "trickle_ice": trickle}
    return {k: v for k, v in body.items() if k not in drop}


_optional_keys = st.lists(st.sampled_from(["kind", "data", "conversation_id", "trickle_ice"]), max_size=2)
action_bodies = (st.builds(_action, st.just("offer"), offer_data, conversation_ids, st.booleans(), _optional_keys)
                 | st.builds(_action, st.just("icecandidate"), icecandidate_data, conversation_ids,
                             st.booleans() | json_scalars, _optional_keys)
                 | st.builds(_action, kinds, json_values, conversation_ids, st.booleans() | json_scalars,
                             _optional_keys)
                 | json_values)
control_ops = st.sampled_from(["open", "opened", "refused", "resize", "ping", "pong", "eof", "exit", "error"])
control_messages = st.one_of(
    st.builds(lambda op, fields: json.dumps({"op": op, **fields}),
              control_ops | json_scalars,
              st.fixed_dictionaries({}, optional={"id": st.integers(-2, 1100) | json_scalars,
                                                  "cols": st.integers(-1, 1002) | json_scalars,
                                                  "rows": st.integers(-1, 1002) | json_scalars,
                                                  "status": json_scalars, "reason": json_scalars})),
    json_values.map(json.dumps), any_text, repeat("[", 3000), repeat("x", 9000))


# --- the properties ------------------------------------------------------------------------------

def refuses_cleanly(call: Callable[[], Any]) -> Any:
    """Run a validator: its result, or None after checking the refusal is a clean one-line 4xx."""
    try:
        return call()
    except ProtocolError as exc:
        assert 400 <= exc.status < 500, exc.status
        assert exc.message and "\n" not in exc.message and len(exc.message) <= 300, exc.message
        assert MARKER not in exc.message, "a validator echoed its input"
        body = exc.to_json()
        assert body["ok"] is False and body["error"]["message"] == exc.message
        return None


NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@PROPERTY
@given(names)
def test_names_accepted_are_short_and_plain(value):
    name = refuses_cleanly(lambda: protocol.check_name(value, "resource"))
    if name is not None:
        assert NAME_OK.fullmatch(name) and "\n" not in name


@PROPERTY
@given(conversation_ids)
def test_conversation_ids_accepted_are_url_and_file_safe(value):
    cid = refuses_cleanly(lambda: protocol.check_conversation_id(value))
    if cid is not None:
        assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", cid)


@PROPERTY
@given(candidates)
def test_candidates(value):
    checked = refuses_cleanly(lambda: protocol.validate_candidate(value))
    if checked is not None:
        assert len(checked["candidate"]) <= protocol.MAX_CANDIDATE_BYTES
        assert 0 <= protocol.parse_candidate(checked["candidate"]).port <= 65535
        assert protocol.validate_candidate(checked) == checked  # idempotent


@PROPERTY
@given(icecandidate_data, st.booleans())
def test_icecandidate_data(value, batch_allowed):
    batch = refuses_cleanly(lambda: protocol.validate_icecandidate_data(value, batch_allowed))
    if batch is not None:
        assert len(batch.candidates) <= protocol.MAX_CANDIDATES_PER_BATCH
        assert isinstance(batch.end_of_candidates, bool)
        if not batch_allowed:
            assert "candidates" not in value


@PROPERTY
@given(sessions)
def test_sessions(value):
    request = refuses_cleanly(lambda: protocol.validate_session(value))
    if request is not None:
        assert request.mode in protocol.SESSION_MODES and isinstance(request.pty, bool)
        assert 1 <= request.cols <= protocol.MAX_TERMINAL_SIZE and 1 <= request.rows <= protocol.MAX_TERMINAL_SIZE
        if request.command is not None:
            assert "\x00" not in request.command
            assert len(request.command.encode()) <= protocol.MAX_COMMAND_BYTES


@PROPERTY
@given(sdps, st.sampled_from(["offer", "answer"]))
def test_sdp(value, kind):
    sdp = refuses_cleanly(lambda: protocol.validate_sdp(value, kind))
    if sdp is not None:
        assert len(sdp) <= protocol.MAX_SDP_BYTES and "m=application" in sdp
        bare, wire, _ = protocol.split_sdp_candidates(sdp)
        assert "a=candidate:" not in bare and all(c["candidate"].startswith("candidate:") for c in wire)


@PROPERTY
@given(offer_data)
def test_offer_data(value):
    offer = refuses_cleanly(lambda: protocol.validate_offer_data(value))
    if offer is not None:
        assert NAME_OK.fullmatch(offer.resource) and isinstance(offer.session, protocol.SessionRequest)


@PROPERTY
@given(action_bodies)
def test_actions(value):
    action = refuses_cleanly(lambda: protocol.validate_action(value))
    if action is not None:
        assert action.kind in protocol.ACTION_KINDS and isinstance(action.trickle_ice, bool)
        if action.kind not in ("resources", "ping"):
            protocol.check_conversation_id(action.conversation_id)


@PROPERTY
@given(action_bodies.map(lambda body: json.dumps(body).encode())
       | st.binary(max_size=256)
       | st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth)
       | st.integers(protocol.MAX_BODY_BYTES - 2, protocol.MAX_BODY_BYTES + 2).map(lambda n: b'"' + b"x" * n + b'"')
       | any_text.map(lambda text: json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")))
def test_json_bodies(raw):
    try:
        value = protocol.parse_json_body(raw)
    except ProtocolError as exc:
        assert exc.status in (400, 413) and "\n" not in exc.message
        return
    assert len(raw) <= protocol.MAX_BODY_BYTES
    json.dumps(value).encode("utf-8")  # whatever got through can be re-encoded (no lone surrogates)


def _plain(value: Any) -> bool:
    """No NaN (it never equals itself) and no lone surrogate (refused on purpose)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "NaN" not in text


@PROPERTY
@given(json_values.filter(_plain))
def test_json_round_trips_within_the_depth_limit(value):
    assert protocol.parse_json(json.dumps(value)) == value


@PROPERTY
@given(control_messages)
def test_control_messages(text):
    message = refuses_cleanly(lambda: protocol.parse_control_message(text))
    if message is not None:
        assert isinstance(message["op"], str)


@PROPERTY
@given(control_ops, st.dictionaries(st.sampled_from(["id", "cols", "rows", "status", "reason"]),
                                    st.integers(-5, 5000) | st.text(max_size=20) | st.booleans()))
def test_control_messages_round_trip(op, fields):
    assert protocol.parse_control_message(protocol.control_message(op, **fields)) == {"op": op, **fields}


@PROPERTY
@given(st.text(max_size=20) | json_scalars)
def test_version_tuple_never_raises(value):
    parsed = protocol.version_tuple(value)
    assert isinstance(parsed, tuple) and all(isinstance(part, int) for part in parsed)


@PROPERTY
@given(st.integers(1, 2 ** 16 - 1), st.integers(0, 2 ** 31 - 1), st.ip_addresses(v=4).map(str))
def test_candidates_round_trip_through_the_wire_shape(port, priority, host):
    line = f"candidate:abc 1 udp {priority} {host} {port} typ host"
    candidate = protocol.candidate_from_wire({"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0})
    assert protocol.candidate_from_wire(protocol.candidate_to_wire(candidate)).port == port


def test_the_real_offer_passes_and_nesting_past_the_limit_does_not():
    assert protocol.validate_offer_data({"sdp": real_offer_sdp(), "resource": "echo"}).resource == "echo"
    deep = "[" * (protocol.MAX_JSON_DEPTH + 1) + "]" * (protocol.MAX_JSON_DEPTH + 1)
    with pytest.raises(ProtocolError, match="nests deeper"):
        protocol.parse_json(deep)
    assert protocol.parse_json("[" * protocol.MAX_JSON_DEPTH + "]" * protocol.MAX_JSON_DEPTH)
    with pytest.raises(ProtocolError, match="not valid Unicode"):
        protocol.parse_json('{"a": ["\\udc00"]}')
    with pytest.raises(ProtocolError):
        protocol.check_name("web-1\n", "resource")  # "$" alone would have let this through
    assert math.isinf(protocol.parse_json("1e999"))  # valid JSON, harmless: validators type-check it
