"""`pam tunnel diagnose RESOURCE`: why a connection does (or does not) come up, and the fix.

Walks the path a connect takes, each step on its own so one failure does not hide the next:
the router (reachable, TLS verified), the token, the gateway, each ICE server (a STUN binding,
a TURN allocation), the candidate types this side gathers, then one trial connection and the
type of the pair ICE selected. The verdict names the first thing to fix. Never prints a token
or a TURN credential (ICE servers are shown by URL only).
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import aioice.stun
import aioice.turn
from aiortc import RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

from . import protocol, rtc
from .errors import PamError
from .negotiation import ConnectOptions, RouterRefusal

PROBE_TIMEOUT_S = 3.0
TRIAL_TIMEOUT_S = 15.0


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not run (an earlier step failed)
    detail: str


@dataclass
class Report:
    resource: str
    checks: list[Check] = field(default_factory=list)
    local_candidates: list[str] = field(default_factory=list)
    gateway_candidates: list[str] = field(default_factory=list)
    selected_pair: str | None = None  # "srflx -> host" style: local type -> gateway's type
    verdict: str = ""
    fix: str = ""

    def add(self, name: str, ok: bool | None, detail: str) -> Check:
        check = Check(name, ok, detail)
        self.checks.append(check)
        return check

    def failed(self, name: str) -> bool:
        return any(c.name == name and c.ok is False for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        marks = {True: "ok  ", False: "FAIL", None: "skip"}
        lines = [f"{marks[c.ok]}  {c.name}: {c.detail}" for c in self.checks]
        lines.append(f"verdict: {self.verdict}")
        if self.fix:
            lines.append(f"fix: {self.fix}")
        return "\n".join(lines)


def _urls(server: RTCIceServer) -> list[str]:
    return [str(u) for u in (server.urls if isinstance(server.urls, list) else [server.urls])]


def _shown(url: str) -> str:
    return url.split("?")[0] + (f" ({url.split('transport=')[1]})" if "transport=" in url else "")


def stun_binding(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> tuple[str, int] | None:
    """Our address as the STUN server sees it, or None if it did not answer."""
    request = aioice.stun.Message(message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(bytes(request), (socket.gethostbyname(host), port))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data, _ = sock.recvfrom(2048)
                try:
                    response = aioice.stun.parse_message(data)
                except ValueError:
                    continue
                if response.transaction_id == request.transaction_id:
                    mapped = response.attributes.get("XOR-MAPPED-ADDRESS")
                    return (str(mapped[0]), int(mapped[1])) if mapped else None
        except OSError:
            return None
    return None


async def turn_allocation(host: str, port: int, username: str | None, password: str | None,
                          secure: bool, transport: str) -> tuple[str, int]:
    """Allocate a relay on the TURN server and release it: the relayed address it gave."""
    relay, _ = await asyncio.wait_for(aioice.turn.create_turn_endpoint(
        asyncio.DatagramProtocol, server_addr=(host, port), username=username, password=password,
        ssl=secure or None, transport=transport), PROBE_TIMEOUT_S)
    try:
        address = relay.get_extra_info("sockname")
        return str(address[0]), int(address[1])
    finally:
        relay.close()


def _probe_ice_servers(report: Report, loop: Any, servers: Sequence[RTCIceServer]) -> dict[str, bool]:
    """One check per URL; returns which kinds answered: {"stun": bool, "turn": bool}."""
    working = {"stun": False, "turn": False}
    if not servers:
        report.add("ICE servers", None, "none configured (host candidates only)")
    for server in servers:
        for url in _urls(server):
            parsed = parse_stun_turn_uri(url)
            name = f"ICE server {_shown(url)}"
            if parsed["scheme"] in ("stun", "stuns"):
                mapped = stun_binding(parsed["host"], parsed["port"])
                if mapped is None:
                    report.add(name, False, f"no answer to a STUN binding request within {PROBE_TIMEOUT_S:g} s")
                else:
                    working["stun"] = True
                    report.add(name, True, f"STUN binding answered: this side is seen as {mapped[0]}:{mapped[1]}")
                continue
            try:
                relayed = loop.run(turn_allocation(parsed["host"], parsed["port"], server.username, server.credential,
                                                   parsed["scheme"] == "turns", parsed["transport"] or "udp"),
                                   timeout=PROBE_TIMEOUT_S + 2)
            except Exception as exc:  # refused credentials, timeout, TLS failure: say which
                reason = str(exc) if isinstance(exc, aioice.stun.TransactionFailed) else exc.__class__.__name__
                report.add(name, False, f"TURN allocation failed ({reason[:120]})")
            else:
                working["turn"] = True
                report.add(name, True, f"TURN allocation granted: relay address {relayed[0]}:{relayed[1]}")
    return working


async def _gathered_types(servers: Sequence[RTCIceServer], addresses: Sequence[str], policy: str) -> list[str]:
    """Candidate types this side gathers with its configuration (waits for late gathering too)."""
    pc = rtc.new_peer_connection(servers, policy)
    try:
        pc.createDataChannel("probe", negotiated=True, id=0)
        await rtc.set_local_description(pc, await pc.createOffer(), addresses)
        done = asyncio.get_running_loop().create_future()
        late: list[str] = []
        rtc.watch_late_candidates(pc, lambda c: late.append(c["candidate"]) if c else
                                  (done.done() or done.set_result(None)))
        await asyncio.wait_for(done, rtc.LATE_GATHER_TIMEOUT_S + 2)
        _, in_sdp, _ = protocol.split_sdp_candidates(pc.localDescription.sdp)
        return [line.split()[7] for line in [c["candidate"] for c in in_sdp] + late]
    finally:
        await pc.close()


def run_diagnosis(runtime: Any, hook: Any, resource: str) -> Report:
    """Every check, then the verdict; raises nothing for a failed check (that is the report)."""
    report = Report(resource)
    router = None
    try:
        router = runtime.router()
        router._request("GET", "/api/v1/health")
        secure = router.base_url.startswith("https://")
        report.add("router", True, f"{router.base_url} answers" + (" (TLS certificate verified)" if secure else
                                                                    " (plain HTTP on loopback)"))
    except PamError as exc:
        report.add("router", False, exc.message)
    if router is not None and not report.failed("router"):
        try:
            router.resources()
            report.add("token", True, "accepted by the router")
        except RouterRefusal as exc:
            report.add("token", False, f"refused ({exc.message})")
        except PamError as exc:
            report.add("token", False, exc.message)
    ref = None
    if router is not None and not report.failed("router") and not report.failed("token"):
        try:
            ref = runtime.resolve(hook, resource)
            gateway = ref.gateway or router.gateway_of(resource)
            info = router.gateway_info(gateway)
            report.add("gateway", True, f"{gateway} online (version {info.version})")
        except PamError as exc:
            report.add("gateway", False, exc.message)
    servers = runtime.ice_servers()
    addresses = runtime.host_addresses(hook)
    policy = runtime.config.ice_transport_policy
    working = _probe_ice_servers(report, runtime.loop, servers)
    try:
        report.local_candidates = runtime.loop.run(_gathered_types(servers, addresses, policy),
                                                   timeout=rtc.LATE_GATHER_TIMEOUT_S + 5)
        report.add("local candidates", bool(report.local_candidates),
                   ", ".join(sorted(set(report.local_candidates))) or f"none (policy {policy})")
    except Exception as exc:
        report.add("local candidates", False, f"gathering failed ({exc.__class__.__name__})")
    if ref is not None and not report.failed("gateway"):
        _trial(report, runtime, hook, ref)
    else:
        report.add("trial connection", None, "not tried: " + next(c.detail for c in report.checks if c.ok is False))
    report.verdict, report.fix = verdict(report, servers, working, policy)
    return report


def _trial(report: Report, runtime: Any, hook: Any, ref: Any) -> None:
    started = time.monotonic()
    try:
        session = runtime.connect(hook, ref, protocol.SessionRequest(), trickle=True,
                                  options=ConnectOptions(trickle=True,
                                                         timeout_s=min(runtime.config.connect_timeout_s, TRIAL_TIMEOUT_S)))
    except PamError as exc:
        report.add("trial connection", False, exc.message.split(" (tried:")[0])
        return
    try:
        pair = rtc.selected_pair_types(session.peer.pc)
        connection = rtc.ice_connection(session.peer.pc)
        report.gateway_candidates = [c.type for c in getattr(connection, "remote_candidates", [])]
        report.selected_pair = f"{pair[0]} -> {pair[1]}" if pair else None
        report.add("trial connection", True, f"connected in {1000 * (time.monotonic() - started):.0f} ms "
                                             f"over a {report.selected_pair} pair")
    finally:
        session.close()


def verdict(report: Report, servers: Sequence[RTCIceServer], working: dict[str, bool], policy: str) -> tuple[str, str]:
    """The first thing to fix, from the checks (pure: tests feed it reports)."""
    if report.failed("router"):
        detail = next(c.detail for c in report.checks if c.name == "router")
        if "TLS" in detail:
            return "the router's TLS certificate is not trusted", "set ca_file to the CA that signed it"
        if "in clear" in detail:
            return "the router URL is plain http:// to another machine", "use https:// for router_url"
        return "the router cannot be reached", "check router_url and that the router is running"
    if report.failed("token"):
        return "the router refused the token", "set a valid token (PAM_TOKEN or token in the config)"
    if report.failed("gateway"):
        return "the gateway is not online", "start the gateway (pam-gateway agent) and check its router_url"
    pair = report.selected_pair or ""
    if not report.failed("trial connection") and pair:
        kind = pair.split(" -> ")
        if "relay" in kind:
            return f"connected through a TURN relay ({pair})", ""
        if "srflx" in kind or "prflx" in kind:
            return f"connected across NAT with STUN ({pair})", ""
        return f"connected directly ({pair})", ""
    dead = [c.name.removeprefix("ICE server ") for c in report.checks if c.name.startswith("ICE server ") and c.ok is False]
    if policy == "relay" and not working["turn"]:
        return ("relay policy without a working TURN server: nothing can connect",
                "configure a TURN server in ice_servers (turn: or turns: with username and credential)")
    if dead and not (working["stun"] or working["turn"]):
        return f"no ICE server answered ({', '.join(dead)})", "fix the ICE server address, port or credentials"
    if not servers:
        return ("no ICE server configured and host candidates did not connect (behind NAT?)",
                "configure a STUN server in ice_servers (enough for cone NATs), or TURN for symmetric NATs")
    if working["turn"]:
        gateway_has_relay = "relay" in report.gateway_candidates
        return ("TURN works from here but no pair connected",
                "configure the same TURN server in the gateway's ice_servers" if not gateway_has_relay
                else "check that the gateway can reach the TURN server and that UDP to its relay ports is open")
    if working["stun"]:
        return ("STUN answers but no direct path: at least one side is behind a symmetric NAT "
                "(both sides behind symmetric NAT need a relay)",
                "configure a TURN server in ice_servers (client and gateway)")
    return "no pair connected", "run with --json and check each step"


def main(runtime: Any, hook: Any, resource: str, as_json: bool, out: Any) -> int:
    report = run_diagnosis(runtime, hook, resource)
    if as_json:
        print(json.dumps(report.to_json()), file=out, flush=True)
    else:
        print(report.text(), file=out, flush=True)
    return 0 if report.selected_pair else 1
