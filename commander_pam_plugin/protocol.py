"""Signaling and data-plane message shapes, limits and validation.

One module, used by the client, the router and the gateway alike, so the three can never
disagree on what a valid message is. docs/PROTOCOL.md is the prose version of this file.
Every validator raises ProtocolError with an HTTP status and a one-line reason; nothing
here ever echoes a credential back.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
GATEWAY_VERSION = "1.8.0"
# Gateways from 1.7.0 accept candidate batches and trickle ICE (Keeper's numbering, kept).
BATCH_SINCE = (1, 7, 0)

CAP_TRICKLE = "trickle"
CAP_BATCH = "batch_candidates"
ALL_CAPABILITIES = (CAP_TRICKLE, CAP_BATCH)

# Limits. Chosen so an honest client never meets them and a hostile one cannot make the
# router or gateway buffer much.
MAX_BODY_BYTES = 64 * 1024
MAX_SDP_BYTES = 32 * 1024
MAX_CANDIDATE_BYTES = 512
MAX_CANDIDATES_PER_BATCH = 64
MAX_COMMAND_BYTES = 4096
MAX_TERMINAL_SIZE = 1000
MAX_WS_MESSAGE_BYTES = 256 * 1024
MAX_CONVERSATIONS_PER_USER = 64
MAX_JSON_DEPTH = 32  # honest messages nest 5 deep; Python's own parser fails near 1,000
# Honest integers (ids, ports, sizes) have at most 20 digits; Python refuses over 4,300 with a
# ValueError that is not a JSON error, and converting long ones costs quadratic time.
MAX_JSON_INTEGER_DIGITS = 32

ACTION_KINDS = ("offer", "icecandidate", "close", "resources", "ping", "approve")  # approve: docs/PROTOCOL.md
SESSION_MODES = ("tunnel", "terminal")

# Used with fullmatch: "$" alone would let a trailing newline through into logs and file names.
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_SURROGATE = re.compile("[\ud800-\udfff]")

# Data-plane channel ids (negotiated channels, so no DCEP round trip).
CONTROL_CHANNEL_ID = 0
TERMINAL_CHANNEL_ID = 1
FIRST_STREAM_ID = 2
MAX_STREAM_ID = 1023


class ProtocolError(Exception):
    """A request that breaks the protocol: carries the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def check_name(value: Any, what: str) -> str:
    """A resource or gateway name: short, printable, no path tricks."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _bad(f"{what} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def check_conversation_id(value: Any) -> str:
    if not isinstance(value, str) or not _CONVERSATION_ID.fullmatch(value):
        raise _bad("conversation_id must be 8-64 characters of letters, digits, '_' or '-'")
    return value


class _IntegerTooLong(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_JSON_INTEGER_DIGITS:
        raise _IntegerTooLong(text[:0])
    return int(text)


def parse_json(text: str | bytes, what: str = "body") -> Any:
    """JSON that is safe to walk: UTF-8, no lone surrogates, at most MAX_JSON_DEPTH levels deep,
    integers of at most MAX_JSON_INTEGER_DIGITS digits.

    Every JSON text from another party goes through here: the stdlib parser raises
    RecursionError on deep nesting, ValueError on an integer over 4,300 digits, and a lone
    surrogate breaks any later encode().
    """
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, parse_int=_bounded_int)
    except _IntegerTooLong:
        raise _bad(f"{what} holds an integer longer than {MAX_JSON_INTEGER_DIGITS} digits") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise _bad(f"{what} is not valid JSON ({exc.__class__.__name__})") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative, so the check itself cannot recurse too deep
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise _bad(f"{what} holds a string that is not valid Unicode")
            continue
        if not isinstance(item, (list, dict)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _bad(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return value


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body, refusing oversized or malformed input with a clear reason."""
    if len(raw) > MAX_BODY_BYTES:
        raise ProtocolError(413, f"body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", "too_large")
    return parse_json(raw, "body")


# --- ICE candidates -------------------------------------------------------------------

def validate_candidate(value: Any) -> dict[str, Any]:
    """One candidate as RTCIceCandidateInit: {"candidate": "candidate:...", "sdpMid", "sdpMLineIndex"}."""
    if not isinstance(value, dict):
        raise _bad("a candidate must be an object with a 'candidate' string")
    text = value.get("candidate")
    if not isinstance(text, str) or not text:
        raise _bad("candidate.candidate must be a non-empty string")
    if len(text) > MAX_CANDIDATE_BYTES:
        raise _bad(f"candidate is longer than {MAX_CANDIDATE_BYTES} characters")
    mid = value.get("sdpMid", "0")
    if mid is not None and (not isinstance(mid, str) or len(mid) > 32):
        raise _bad("candidate.sdpMid must be a short string")
    index = value.get("sdpMLineIndex", 0)
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 16):
        raise _bad("candidate.sdpMLineIndex must be an integer from 0 to 15")
    parse_candidate(text)
    return {"candidate": text, "sdpMid": mid, "sdpMLineIndex": index}


def parse_candidate(text: str):
    """Parse 'candidate:...' into an aiortc RTCIceCandidate, or raise ProtocolError 400."""
    from aiortc.sdp import candidate_from_sdp

    body = text[len("candidate:"):] if text.startswith("candidate:") else text
    try:
        candidate = candidate_from_sdp(body)
        if candidate.port < 0 or candidate.port > 65535 or candidate.protocol.lower() not in ("udp", "tcp"):
            raise ValueError("port or protocol out of range")
    except Exception:
        raise _bad("candidate is not a parsable ICE candidate line") from None
    return candidate


def candidate_to_wire(candidate: Any, sdp_mid: str = "0") -> dict[str, Any]:
    """An aiortc RTCIceCandidate as the wire shape."""
    from aiortc.sdp import candidate_to_sdp

    return {"candidate": "candidate:" + candidate_to_sdp(candidate), "sdpMid": sdp_mid, "sdpMLineIndex": 0}


def candidate_from_wire(value: dict[str, Any]):
    """The wire shape as an aiortc RTCIceCandidate (validated)."""
    checked = validate_candidate(value)
    candidate = parse_candidate(checked["candidate"])
    candidate.sdpMid = checked["sdpMid"]
    candidate.sdpMLineIndex = checked["sdpMLineIndex"]
    return candidate


@dataclass
class CandidateBatch:
    candidates: list[dict[str, Any]]
    end_of_candidates: bool


def validate_icecandidate_data(data: Any, batch_allowed: bool = True) -> CandidateBatch:
    """Either {"candidates": [...], "end_of_candidates"?} (batch) or {"candidate": c} (single)."""
    if not isinstance(data, dict):
        raise _bad("icecandidate data must be an object")
    end = data.get("end_of_candidates", False)
    if not isinstance(end, bool):
        raise _bad("end_of_candidates must be true or false")
    if "candidates" in data:
        if not batch_allowed:
            raise _bad("this gateway takes one candidate per action (pre-1.7.0); send {\"candidate\": c}")
        items = data["candidates"]
        if not isinstance(items, list):
            raise _bad("candidates must be a list")
        if len(items) > MAX_CANDIDATES_PER_BATCH:
            raise _bad(f"batch holds {len(items)} candidates; the limit is {MAX_CANDIDATES_PER_BATCH}")
        return CandidateBatch([validate_candidate(c) for c in items], end)
    if "candidate" in data:
        single = data["candidate"]
        if single is None:  # browsers' null candidate means end-of-candidates
            return CandidateBatch([], True)
        return CandidateBatch([validate_candidate(single)], end)
    if end:
        return CandidateBatch([], True)
    raise _bad("icecandidate data needs 'candidates' (a list) or 'candidate' (an object)")


# --- SDP ---------------------------------------------------------------------------------

def validate_sdp(sdp: Any, expected_type: str) -> str:
    """An SDP string that aiortc can parse and that carries a data-channel m-line."""
    from aiortc.sdp import SessionDescription

    if not isinstance(sdp, str) or not sdp:
        raise _bad("sdp must be a non-empty string")
    if len(sdp) > MAX_SDP_BYTES:
        raise _bad(f"sdp is longer than {MAX_SDP_BYTES} characters")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception:
        raise _bad(f"sdp is not a parsable {expected_type}") from None
    if not any(m.kind == "application" for m in parsed.media):
        raise _bad("sdp has no data-channel (m=application) section")
    for media in parsed.media:
        if not media.ice.usernameFragment or not media.ice.password or not media.dtls:
            raise _bad("sdp lacks ICE credentials or a DTLS fingerprint")
    return sdp


def split_sdp_candidates(sdp: str) -> tuple[str, list[dict[str, Any]], bool]:
    """Remove candidate lines from an SDP: (bare sdp, wire candidates, end-of-candidates seen)."""
    kept: list[str] = []
    candidates: list[dict[str, Any]] = []
    end = False
    mid = "0"
    for line in sdp.splitlines():
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": 0})
            continue
        if line == "a=end-of-candidates":
            end = True
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates, end


# --- Sessions and actions ------------------------------------------------------------------

@dataclass
class SessionRequest:
    """What the client asks the gateway to open behind the data channels."""

    mode: str = "tunnel"
    term: str = "xterm-256color"
    cols: int = 80
    rows: int = 24
    command: str | None = None
    pty: bool = True
    # Terminal resume (PROTOCOL.md section 7): ask for a session id and secret (resumable), or
    # continue a held session (resume: its id). stderr: remote stderr marked apart (no PTY only).
    # Sent only when set, so older gateways see the old request.
    resumable: bool = False
    resume: str | None = None
    stderr: bool = False

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {key: value for key, value in (("resumable", self.resumable), ("resume", self.resume),
                                                                ("stderr", self.stderr)) if value}
        return {"mode": self.mode, "term": self.term, "cols": self.cols, "rows": self.rows,
                "command": self.command, "pty": self.pty, **extra}


def _size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TERMINAL_SIZE:
        raise _bad(f"{what} must be an integer from 1 to {MAX_TERMINAL_SIZE}")
    return value


def validate_session(value: Any) -> SessionRequest:
    if value is None:
        return SessionRequest()
    if not isinstance(value, dict):
        raise _bad("session must be an object")
    mode = value.get("mode", "tunnel")
    if mode not in SESSION_MODES:
        raise _bad(f"session.mode must be one of {', '.join(SESSION_MODES)}")
    term = value.get("term", "xterm-256color")
    if not isinstance(term, str) or not _TERM.fullmatch(term):
        raise _bad("session.term must be a terminal type name such as xterm-256color")
    command = value.get("command")
    if command is not None and (not isinstance(command, str) or not command or _SURROGATE.search(command)
                                or len(command.encode()) > MAX_COMMAND_BYTES or "\x00" in command):
        raise _bad(f"session.command must be a non-empty string under {MAX_COMMAND_BYTES} bytes")
    pty = value.get("pty", True)
    if not isinstance(pty, bool):
        raise _bad("session.pty must be true or false")
    flags = {key: value.get(key, False) for key in ("resumable", "stderr")}
    if not all(isinstance(flag, bool) for flag in flags.values()):
        raise _bad("session.resumable and session.stderr must be true or false")
    resume = value.get("resume")
    if resume is not None and (not isinstance(resume, str) or not _CONVERSATION_ID.fullmatch(resume)):
        raise _bad("session.resume must be a session id (8-64 letters, digits, '_' or '-')")
    return SessionRequest(mode, term, _size(value.get("cols", 80), "session.cols"),
                          _size(value.get("rows", 24), "session.rows"), command, pty,
                          resume=resume, **flags)


@dataclass
class OfferData:
    sdp: str
    resource: str
    session: SessionRequest = field(default_factory=SessionRequest)


def validate_offer_data(data: Any) -> OfferData:
    """{"sdp": "...", "type": "offer", "resource": NAME, "session": {...}}."""
    if not isinstance(data, dict):
        raise _bad("offer data must be an object")
    if data.get("type", "offer") != "offer":
        raise _bad("offer data type must be 'offer'")
    return OfferData(validate_sdp(data.get("sdp"), "offer"), check_name(data.get("resource"), "resource"),
                     validate_session(data.get("session")))


@dataclass
class Action:
    """A client action as the router receives it."""

    conversation_id: str
    kind: str
    data: Any
    trickle_ice: bool


def validate_action(body: Any) -> Action:
    """{"conversation_id", "kind", "data", "trickle_ice"}; the kind's data is checked too."""
    if not isinstance(body, dict):
        raise _bad("body must be a JSON object")
    kind = body.get("kind")
    if kind not in ACTION_KINDS:
        raise _bad(f"kind must be one of {', '.join(ACTION_KINDS)}")
    trickle = body.get("trickle_ice", False)
    if not isinstance(trickle, bool):
        raise _bad("trickle_ice must be true or false")
    data = body.get("data", {})
    if data is None:
        data = {}
    if kind in ("resources", "ping", "approve"):  # approve: an approver answers a held offer
        conversation = body.get("conversation_id")
        conversation = check_conversation_id(conversation) if conversation is not None else ""
        return Action(conversation, kind, data, trickle)
    conversation = check_conversation_id(body.get("conversation_id"))
    if kind == "offer":
        validate_offer_data(data)
    elif kind == "icecandidate":
        validate_icecandidate_data(data)
    elif kind == "close" and not isinstance(data, dict):
        raise _bad("close data must be an object")
    return Action(conversation, kind, data, trickle)


def version_tuple(version: Any) -> tuple[int, ...]:
    """'1.7.0' -> (1, 7, 0); anything unparsable counts as (0,)."""
    try:
        return tuple(int(part) for part in str(version).split(".")[:3])
    except ValueError:
        return (0,)


# --- Data-plane messages (JSON text on the control channel, or in-band on a stream) ---------

def control_message(op: str, **fields: Any) -> str:
    return json.dumps({"op": op, **fields}, separators=(",", ":"))


def parse_control_message(text: str) -> dict[str, Any]:
    """A data-plane control message; anything malformed is a ProtocolError (never a crash)."""
    if not isinstance(text, str) or len(text) > 8192:
        raise _bad("control message too long")
    message = parse_json(text, "control message")
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise _bad("control message needs an 'op'")
    return message
