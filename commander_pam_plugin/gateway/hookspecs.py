"""The gateway's own hooks: what a team's plugin may decide, observe or supply at the gateway.

These run where the credentials live, so unlike the client's `pam_before_connect` they are
control, not customization. Decisions are firstresult: the first plugin with an answer (not
None) wins; the built-in policy (policy.py, the TOML's rules) answers last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy

PROJECT = "pam_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class AccessRequest:
    """An offer as the gateway's hooks see it (never the SDP, never a credential)."""

    user: str
    resource: Any  # config.Resource: name, kind, users and its access rules (repr hides secrets)
    gateway: str
    conversation_id: str
    mode: str  # "terminal" (pam launch) or "tunnel"
    reason: str | None = None
    ticket: str | None = None


@dataclass(frozen=True)
class Decision:
    """allow; deny with a reason the user reads; or hold until one of `approvers` approves."""

    verdict: Literal["allow", "deny", "hold"]
    reason: str = ""
    approvers: tuple[str, ...] = field(default=())

    @classmethod
    def allow(cls) -> "Decision":
        return cls("allow")

    @classmethod
    def deny(cls, reason: str) -> "Decision":
        return cls("deny", reason)

    @classmethod
    def hold(cls, approvers: tuple[str, ...], reason: str = "") -> "Decision":
        return cls("hold", reason, tuple(approvers))


@dataclass(frozen=True)
class GatewaySessionEvent:
    """A session (or a request for one) changed state; the same record the audit trail writes."""

    kind: str  # decision, approval, open, end, terminate, resume
    record: dict[str, Any]


@hookspec(firstresult=True)
def pam_gateway_decide(request: AccessRequest) -> Decision | None:
    """Return a Decision (allow, deny with reason, hold for approvers) for an offer, or None for no opinion."""


@hookspec
def pam_gateway_session_event(event: GatewaySessionEvent) -> None:
    """A decision, approval, session open, end, termination or resume happened (observe only)."""


@hookspec(firstresult=True)
def pam_gateway_credentials(resource: Any, user: str) -> dict[str, str] | None:
    """Return {"password": ...} and/or {"private_key": ...} for `resource` at connect time, or None."""
