"""Access governance at the decision point: policy hooks, approvals, session limits, live control, audit.

One Governor per gateway agent. The agent asks it before an offer becomes an AnswerSession
(allow, deny, or hold for an approver) and tells it when a session opens and ends; it keeps
the live-session registry that `pam-gateway sessions` / `terminate` read, runs each session's
maximum-duration and idle timers (with a warning first), and writes every step to the audit
trail and the pam_gateway_session_event hook.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ProtocolError
from .approvals import Approvals, PendingRequest
from .audit import AuditTrail
from .config import GatewaySettings, Resource
from .hookspecs import AccessRequest, Decision, GatewaySessionEvent
from .plugins import load_plugins
from .policy import MAX_REASON, remember_secret

log = logging.getLogger(__name__)

IDLE_CHECKS_PER_TIMEOUT = 4  # the idle timer looks at the byte counters this often per timeout


@dataclass
class LiveSession:
    """A session the gateway runs: what `sessions` lists and what the limits watch."""

    session: Any  # answerer.AnswerSession
    request: AccessRequest
    since: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    last_bytes: int = 0
    last_active: float = field(default_factory=time.monotonic)
    warned: bool = False
    rebaseline: bool = False  # the warning itself (and the client's SACK of it) is not activity
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    ended: bool = False

    def describe(self) -> dict[str, Any]:
        return {"id": self.request.conversation_id, "user": self.request.user,
                "resource": self.request.resource.name, "mode": self.request.mode, "since": round(self.since, 3),
                "bytes": session_bytes(self.session), "reason": self.request.reason, "ticket": self.request.ticket}


def session_bytes(session: Any) -> int:
    """Bytes on the session's DTLS transport, both ways (what the data plane carried)."""
    try:
        report = session.pc.sctp.transport._get_stats()
        stats = next(iter(report.values()))
        return int(stats.bytesSent) + int(stats.bytesReceived)
    except Exception:  # no transport yet, or closed
        return 0


def _text(value: Any) -> str | None:
    """A reason or ticket from the offer: a bounded single line, or None."""
    if not isinstance(value, str) or not value.strip():
        return None
    return " ".join(value.split())[:MAX_REASON]


class Governor:
    """Policy, approvals, limits and audit for one gateway."""

    def __init__(self, settings: GatewaySettings) -> None:
        governance = settings.governance
        self.settings = settings
        self.pm = load_plugins(governance.plugins, governance.plugin_files)
        self.audit = AuditTrail(governance.audit_log, governance.audit_max_bytes, governance.audit_keep)
        self.approvals = Approvals()
        self.live: dict[str, LiveSession] = {}
        self.ends: dict[str, str] = {}  # conversation -> "terminate" note for its end line

    # --- records ---------------------------------------------------------------------------

    def record(self, kind: str, access: AccessRequest | None = None, **fields: Any) -> dict[str, Any]:
        """One audit line (and the session-event hook): the request's who/what/why plus `fields`."""
        if access is not None:
            fields = {"conversation": access.conversation_id, "user": access.user,
                      "resource": access.resource.name, "mode": access.mode, "reason": access.reason,
                      "ticket": access.ticket, **fields}
        entry = self.audit.record(kind, gateway=self.settings.name, **fields)
        try:
            self.pm.hook.pam_gateway_session_event(event=GatewaySessionEvent(kind, dict(entry)))
        except Exception:
            log.warning("a pam_gateway_session_event plugin failed", exc_info=True)
        return entry

    def record_resume(self, conversation_id: str, **fields: Any) -> dict[str, Any] | None:
        """The resume line, for the resume feature to call when a live session is taken up again."""
        live = self.live.get(conversation_id)
        if live is None:
            return None
        return self.record("resume", live.request, bytes=session_bytes(live.session), **fields)

    # --- decisions -------------------------------------------------------------------------

    def access_request(self, user: str, resource: Resource, conversation_id: str, mode: str,
                       data: Any) -> AccessRequest:
        access = data.get("access") if isinstance(data, dict) else None
        access = access if isinstance(access, dict) else {}
        return AccessRequest(user, resource, self.settings.name, conversation_id, mode,
                             _text(access.get("reason")), _text(access.get("ticket")))

    def decide(self, request: AccessRequest, can_hold: bool = True) -> Decision:
        """The first plugin's decision (the built-in policy last); a failing plugin denies."""
        try:
            decision = self.pm.hook.pam_gateway_decide(request=request)
        except Exception:
            log.warning("a pam_gateway_decide plugin failed; denying", exc_info=True)
            decision = Decision.deny("the gateway's access policy failed")
        if not isinstance(decision, Decision):
            decision = Decision.deny("the gateway's access policy gave no decision")
        if decision.verdict == "hold":  # a user never approves their own request
            others = tuple(a for a in decision.approvers if a != request.user)
            decision = Decision.hold(others, decision.reason) if others else Decision.deny(
                f"{request.resource.name} needs approval and has no approver other than {request.user}")
        if decision.verdict == "hold" and not can_hold:
            decision = Decision.deny(f"{request.resource.name} needs approval, which needs trickle ICE "
                                     "(connect without --no-trickle-ice)")
        self.record("decision", request, verdict=decision.verdict, detail=decision.reason or None,
                    approvers=list(decision.approvers) or None)
        return decision

    def hold(self, request: AccessRequest, decision: Decision) -> PendingRequest:
        return self.approvals.open(request.user, request.resource.name, request.conversation_id, request.mode,
                                   decision.approvers, request.reason, request.ticket)

    async def wait_for_approval(self, request: AccessRequest, pending: PendingRequest) -> tuple[bool, str]:
        """(approved, what the user is told); writes the approval line (approved, denied or expired)."""
        timeout = request.resource.access.approval_timeout_s
        try:
            approved, approver, why = await asyncio.wait_for(asyncio.shield(pending.answer), timeout)
        except asyncio.TimeoutError:
            self.approvals.withdraw(request.conversation_id)
            self.record("approval", request, request=pending.id, verdict="expired")
            return False, f"request {pending.id} was not approved within {timeout:g} s"
        except asyncio.CancelledError:
            if pending.answer.cancelled():  # withdrawn by the requester (close, timeout on their side)
                self.record("approval", request, request=pending.id, verdict="withdrawn")
                return False, f"request {pending.id} withdrawn"
            raise
        verdict = "approved" if approved else "denied"
        self.record("approval", request, request=pending.id, verdict=verdict, approver=approver,
                    detail=why or None)
        if approved:
            return True, f"approved by {approver}"
        return False, f"request {pending.id} denied by {approver}" + (f": {why}" if why else "")

    def answer(self, approver: str, data: Any) -> dict[str, Any]:
        """An approver's `approve` action (through the router with their own token, or the control socket)."""
        if not isinstance(data, dict):
            raise ProtocolError(400, "approve data must be an object")
        if data.get("list") is True:
            return {"pending": self.approvals.listing(approver)}
        request_id, decision = data.get("request"), data.get("decision", "approve")
        if not isinstance(request_id, str) or decision not in ("approve", "deny"):
            raise ProtocolError(400, "approve needs a request id and a decision of approve or deny")
        try:
            pending = self.approvals.decide(request_id, approver, decision == "approve",
                                            _text(data.get("reason")) or "")
        except ProtocolError as exc:
            held = self.approvals.pending.get(request_id)
            if held is not None:  # a refused answer to a real request is audited too (self-approval)
                self.record("approval", request=held.id, conversation=held.conversation_id, user=held.user,
                            resource=held.resource, mode=held.mode, verdict="refused", approver=approver,
                            detail=exc.message)
            raise
        log.info("request %s (%s, %s) %s by %s", pending.id, pending.user, pending.resource,
                 "approved" if decision == "approve" else "denied", approver)
        return {"request": pending.id, "decision": decision}

    def withdraw(self, conversation_id: str) -> None:
        self.approvals.withdraw(conversation_id)

    # --- credentials -----------------------------------------------------------------------

    def connect_resource(self, resource: Resource, user: str) -> Resource:
        """The resource with the credentials a pam_gateway_credentials plugin supplies now (if any)."""
        if not resource.access.credentials_from_plugin:
            return resource
        try:
            supplied = self.pm.hook.pam_gateway_credentials(resource=resource, user=user)
        except Exception:
            log.warning("the pam_gateway_credentials plugin failed for %s", resource.name)
            supplied = None
        if not isinstance(supplied, dict) or not (supplied.get("password") or supplied.get("private_key")):
            raise ProtocolError(503, f"no credentials for {resource.name}: the gateway's credential plugin "
                                     "gave none", "unavailable")
        values = {k: str(supplied[k]) for k in ("password", "private_key") if supplied.get(k)}
        for secret in values.values():
            remember_secret(secret)  # redacted from anything that leaves the gateway
        if "private_key" in values:
            import asyncssh

            asyncssh.import_private_key(values["private_key"])  # a bad key fails here, not in asyncssh's logs
        return dataclasses.replace(resource, **values)

    # --- live sessions ---------------------------------------------------------------------

    def opened(self, session: Any, request: AccessRequest, started: float | None = None) -> None:
        """The offer became a session: register it, write the open line, arm its limits.

        `started` (monotonic) is when a resumed launch session first opened: its maximum duration
        counts from then, so dropping the network never buys a user more time."""
        live = LiveSession(session, request)
        if started is not None:
            live.since -= time.monotonic() - started
            live.started = started
        elapsed = time.monotonic() - live.started
        self.live[request.conversation_id] = live
        self.record("open", request)
        rules = request.resource.access
        loop = asyncio.get_running_loop()
        if rules.max_duration_s is not None:
            warn_at = rules.max_duration_s - rules.warn_before_s - elapsed
            if warn_at > 0:
                live.timers.append(loop.call_later(warn_at, self._warn, live, rules.warn_before_s,
                                                   f"maximum duration of {rules.max_duration_s:g} s"))
            live.timers.append(loop.call_later(max(0.0, rules.max_duration_s - elapsed), self._limit, live,
                                               f"maximum duration of {rules.max_duration_s:g} s reached"))
        if rules.idle_timeout_s is not None:
            live.timers.append(loop.call_later(rules.idle_timeout_s / IDLE_CHECKS_PER_TIMEOUT, self._idle_check, live))

    def _warn(self, live: LiveSession, seconds: float, what: str) -> None:
        if not live.ended:
            live.session.notice(f"this session on {live.request.resource.name} ends in {seconds:g} s ({what})")

    def _limit(self, live: LiveSession, reason: str) -> None:
        if not live.ended:
            self.ends[live.request.conversation_id] = "limit"
            asyncio.ensure_future(live.session.end(f"session ended by the gateway: {reason}"))

    def _idle_check(self, live: LiveSession) -> None:
        if live.ended:
            return
        rules = live.request.resource.access
        assert rules.idle_timeout_s is not None
        now = time.monotonic()
        total = session_bytes(live.session)
        if live.rebaseline:
            live.last_bytes, live.rebaseline = total, False
        elif total != live.last_bytes:
            live.last_bytes, live.last_active, live.warned = total, now, False
        idle = now - live.last_active
        if idle >= rules.idle_timeout_s:
            self._limit(live, f"idle for {rules.idle_timeout_s:g} s")
            return
        if not live.warned and idle >= rules.idle_timeout_s - rules.warn_before_s:
            live.warned = live.rebaseline = True
            self._warn(live, round(rules.idle_timeout_s - idle), f"idle timeout of {rules.idle_timeout_s:g} s")
        loop = asyncio.get_running_loop()
        live.timers.append(loop.call_later(rules.idle_timeout_s / IDLE_CHECKS_PER_TIMEOUT, self._idle_check, live))

    def ended(self, session: Any, reason: str, state: str) -> None:
        """The session closed (any cause): cancel its timers, write its end line."""
        live = self.live.pop(session.conversation_id, None)
        if live is None or live.ended:
            return
        live.ended = True
        for timer in live.timers:
            timer.cancel()
        self.ends.pop(session.conversation_id, None)
        self.record("end", live.request, status=state, detail=reason, bytes=session_bytes(session),
                    duration_s=round(time.monotonic() - live.started, 3))

    async def terminate(self, conversation_id: str, reason: str, by: str) -> dict[str, Any]:
        """End a live session; the user reads `reason`. ProtocolError 404 if there is none."""
        live = self.live.get(conversation_id)
        if live is None:
            raise ProtocolError(404, f"no live session {conversation_id[:40]!r}", "not_found")
        reason = _text(reason) or "no reason given"
        self.record("terminate", live.request, by=by, detail=reason)
        await live.session.end(f"session terminated by {by}: {reason}")
        return {"terminated": conversation_id}

    def listing(self) -> list[dict[str, Any]]:
        return [live.describe() for live in self.live.values()]


def approval_wait_text(pending: PendingRequest) -> str:
    """What the held client waits for, in its own words."""
    return f"approval by {' or '.join(pending.approvers)} (request {pending.id})"

