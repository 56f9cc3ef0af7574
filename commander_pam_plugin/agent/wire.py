"""The agent's protocol: one JSON object per line, one request and one answer per connection.

Request: {"op": "ping"|"start"|"list"|"stop"|"wait"|"exit", ...}; "wait" answers when a
tunnel reaches a state (or with its record as it is after "timeout" seconds). Answer: {"ok": true, ...} or
{"ok": false, "error": "one line"}. Anything else is refused in one line.
"""
from __future__ import annotations

import json
from typing import Any

MAX_LINE = 64 * 1024
OPS = ("ping", "start", "list", "stop", "wait", "exit")


class WireError(ValueError):
    """A request the agent refuses; the message is the one line it answers."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def parse_request(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise WireError(f"a request is one JSON line of at most {MAX_LINE} bytes")
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("a request must be a JSON object") from None
    if not isinstance(request, dict):
        raise WireError("a request must be a JSON object")
    if request.get("op") not in OPS:
        raise WireError(f"unknown op; expected one of {', '.join(OPS)}")
    return request


def refusal(reason: str) -> dict[str, Any]:
    return {"ok": False, "error": reason[:300]}
