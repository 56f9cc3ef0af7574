"""Signaling: open a WebRTC session with a gateway through the router, in as few round trips as possible.

Self-contained (no shell imports). Rules it keeps, each one a defect of the system it replaces:
- one keep-alive HTTP session per router and token, one capability check per gateway per session;
- the conversation stream (WebSocket) starts in parallel with gathering and is awaited only
  by events, never by a fixed delay; the router keeps early events, so the offer never waits;
- candidates known before the offer is acknowledged go out in ONE action; a candidate that
  arrives while that action is in flight lands in a fresh buffer and is sent next, never lost;
- a resource whose gateway is not known yet is not looked up first: the offer is addressed to
  the resource and its reply names the gateway (a list is fetched only if that route answers 404);
- gateways older than 1.7.0 get one action per candidate and no trickle, said once at DEBUG.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import requests
import websocket

from . import protocol
from .errors import PamError
from .loop import BackgroundLoop
from .peer import ClientPeer, PeerLost

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0  # TCP connect to the router: an unreachable router fails fast
CLOSE_NOTICE_TIMEOUT_S = 2.0  # the close notice is best effort: never a long wait on a router
READ_TIMEOUT_S = 20.0  # the router itself gives up on a gateway after 15 s
# Kept-alive connections to the router. A shell that starts 200 tunnels at once has 200 requests
# in flight; with 64 kept, the other 136 each opened a TCP connection, used it once and closed it.
POOL_MAXSIZE = 256


@dataclass
class GatewayInfo:
    name: str
    version: str
    capabilities: tuple[str, ...]

    @property
    def trickle(self) -> bool:
        return protocol.CAP_TRICKLE in self.capabilities

    @property
    def batch(self) -> bool:
        return protocol.CAP_BATCH in self.capabilities


class RouterTimeout(PamError):
    """The router did not answer within the time allowed (the caller may name what it waited for)."""


class RouterRefusal(PamError):
    """The router (or the gateway behind it) answered with an error status."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


def valid_name(value: Any) -> bool:
    """A well-formed resource or gateway name (protocol.check_name) or not."""
    try:
        protocol.check_name(value, "name")
    except protocol.ProtocolError:
        return False
    return True


def lookup_resource(items: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The list entry for `name`, or None; refused, as the router refuses it, if several gateways serve it."""
    found = [item for item in items if item.get("name") == name]
    if len(found) > 1:
        gateways = ", ".join(sorted(str(item.get("gateway")) for item in found))
        raise PamError(f"resource {name} is served by several gateways: {gateways}; resolve it to one")
    return found[0] if found else None


class RouterClient:
    """A keep-alive HTTP session to one router for one user token."""

    def __init__(self, base_url: str, token: str, ca_file: str | None = None, insecure_http: bool = False) -> None:
        from .config import check_transport_security

        # Several router nodes ("URL1,URL2"): a request that cannot reach one moves to the next.
        self.base_urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()] or [base_url]
        for url in self.base_urls:
            check_transport_security(url, insecure_http)  # before the token goes anywhere
        self.base_url = self.base_urls[0]
        self._token = token
        self.ca_file = ca_file
        self.session = requests.Session()  # verify= per request: REQUESTS_CA_BUNDLE must not override ca_file
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_MAXSIZE)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Authorization"] = f"Bearer {token}"
        self._gateways: dict[str, GatewayInfo] = {}
        self._lock = threading.Lock()
        self._legacy_noted: set[str] = set()
        self._resources: tuple[float, list[dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        return f"RouterClient({self.base_url!r})"

    def _request(self, method: str, path: str, body: Any = None,
                 read_timeout: float = READ_TIMEOUT_S) -> dict[str, Any]:
        for tried in range(1, len(self.base_urls) + 1):
            try:
                response = self.session.request(method, self.base_url + path, json=body, verify=self.ca_file or True,
                                                timeout=(min(CONNECT_TIMEOUT_S, read_timeout), read_timeout))
                break
            except requests.exceptions.SSLError as exc:
                raise PamError(f"the router at {self.base_url} failed TLS verification ({_tls_reason(exc)}); "
                               "set ca_file to the CA that signed its certificate") from None
            except requests.ConnectionError as exc:
                if tried == len(self.base_urls):
                    raise PamError(f"cannot reach the router at {self.base_url}: {_reason(exc)}") from None
                self._next_node()
            except requests.Timeout:
                raise RouterTimeout(f"the router at {self.base_url} did not answer in time") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400 or not isinstance(payload, dict) or not payload.get("ok", False):
            message = ""
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                message = str(payload["error"].get("message", ""))
            raise RouterRefusal(f"router: {message or f'HTTP {response.status_code}'}", response.status_code)
        return payload

    def known_gateway(self, gateway: str) -> GatewayInfo | None:
        """What this session has learnt of a gateway so far (from any reply), or None."""
        with self._lock:
            return self._gateways.get(gateway)

    def gateway_info(self, gateway: str) -> GatewayInfo:
        """Version and capabilities: from any earlier reply, else asked once (GET)."""
        known = self.known_gateway(gateway)
        if known is not None:
            return known
        payload = self._request("GET", f"/api/v1/gateways/{quote(gateway, safe='')}")
        return self._learn(gateway, payload)

    def _learn(self, gateway: str, payload: dict[str, Any]) -> GatewayInfo:
        info = GatewayInfo(gateway, str(payload.get("version", "0")),
                           tuple(c for c in payload.get("capabilities", []) if isinstance(c, str)))
        if protocol.version_tuple(info.version) < protocol.BATCH_SINCE and gateway not in self._legacy_noted:
            self._legacy_noted.add(gateway)
            log.debug("gateway %s is %s (< 1.7.0): one action per candidate, no trickle", gateway, info.version)
        with self._lock:
            self._gateways[gateway] = info
        return info

    def forget_gateway(self, gateway: str) -> None:
        """Drop cached capabilities (the gateway may have been upgraded or restarted)."""
        with self._lock:
            self._gateways.pop(gateway, None)

    def action(self, gateway: str, kind: str, conversation_id: str, data: dict[str, Any],
               trickle: bool, timeout: float = READ_TIMEOUT_S) -> dict[str, Any]:
        path = f"/api/v1/gateways/{quote(gateway, safe='')}/actions"
        return self._post_action(path, gateway, kind, conversation_id, data, trickle, timeout)[1]

    def resource_action(self, resource: str, kind: str, conversation_id: str, data: dict[str, Any],
                        trickle: bool, timeout: float = READ_TIMEOUT_S) -> tuple[str, dict[str, Any]]:
        """An action addressed by resource, so no list is fetched first: (the gateway the router
        chose, its reply data). A router or gateway that cannot route it answers 404."""
        path = f"/api/v1/resources/{quote(resource, safe='')}/actions"
        return self._post_action(path, None, kind, conversation_id, data, trickle, timeout)

    def _post_action(self, path: str, gateway: str | None, kind: str, conversation_id: str, data: dict[str, Any],
                     trickle: bool, timeout: float) -> tuple[str, dict[str, Any]]:
        body = {"conversation_id": conversation_id, "kind": kind, "data": data, "trickle_ice": trickle}
        payload = self._request("POST", path, body, timeout)
        described = payload.get("gateway") if isinstance(payload.get("gateway"), dict) else {}
        name = gateway if gateway is not None else described.get("name")
        if not valid_name(name):
            raise PamError("router: the reply does not name the gateway that took the action")
        if described:
            self._learn(name, described)
        result = payload.get("data", {})
        return name, result if isinstance(result, dict) else {}

    def cached_resources(self, max_age_s: float) -> list[dict[str, Any]] | None:
        """The list fetched less than max_age_s ago, or None (never fetches)."""
        with self._lock:
            cached = self._resources
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        return None

    def resources(self, max_age_s: float = 0.0) -> list[dict[str, Any]]:
        """The resources this user may use; a list fetched less than max_age_s ago is reused."""
        cached = self.cached_resources(max_age_s)
        if cached is not None:
            return cached
        items = self._request("GET", "/api/v1/resources").get("resources", [])
        fresh = [r for r in items if isinstance(r, dict)]
        with self._lock:
            self._resources = (time.monotonic(), fresh)
        return fresh

    def gateway_of(self, resource: str) -> str:
        """The gateway serving `resource`, from a fresh list; else one line naming what this user may use."""
        items = self.resources()
        entry = lookup_resource(items, resource)
        if entry is None:
            known = ", ".join(sorted({str(r.get("name")) for r in items})) or "none"
            # the router's list says so: as final as its own 404 (healing does not retry it)
            raise RouterRefusal(f"unknown resource {resource!r}; resources you may use: {known}", 404)
        return str(entry.get("gateway"))

    def stream_url(self, conversation_id: str) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path + f"/api/v1/conversations/{conversation_id}/stream"
        return urlunsplit((scheme, parts.netloc, path, "", ""))

    def ssl_options(self) -> dict[str, Any]:
        """websocket-client's sslopt: verify with ca_file when one is configured."""
        return {"ca_certs": self.ca_file} if self.ca_file else {}

    def _next_node(self) -> None:
        """This router node went away: the next one (any node answers any request)."""
        self.base_url = self.base_urls[(self.base_urls.index(self.base_url) + 1) % len(self.base_urls)]

    def connect_stream(self, conversation_id: str) -> websocket.WebSocket:
        """The conversation's WebSocket, on the first router node that accepts a connection."""
        for tried in range(1, len(self.base_urls) + 1):
            try:
                return websocket.create_connection(self.stream_url(conversation_id), header=[self.auth_header()],
                                                   timeout=CONNECT_TIMEOUT_S, enable_multithread=True,
                                                   sslopt=self.ssl_options())
            except ssl.SSLError:
                raise
            except OSError:
                if tried == len(self.base_urls):
                    raise
                self._next_node()
        raise AssertionError("unreachable")

    def auth_header(self) -> str:
        return f"Authorization: Bearer {self._token}"

    def close(self) -> None:
        self.session.close()


def _tls_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("certificate verify failed", "hostname mismatch", "self-signed certificate",
                   "unable to get local issuer certificate", "wrong version number"):
        if marker in text:
            return marker
    return "TLS error"


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return exc.__class__.__name__


class StreamListener:
    """The conversation's WebSocket, read on its own thread; events go to a callback."""

    def __init__(self, router: RouterClient, conversation_id: str,
                 on_event: Callable[[dict[str, Any]], None]) -> None:
        self._router = router
        self._conversation_id = conversation_id
        self._on_event = on_event
        self.ready = threading.Event()
        self.failed: str | None = None
        self._ws: websocket.WebSocket | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"pam-ws-{conversation_id[:8]}", daemon=True)

    def start(self) -> "StreamListener":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._ws = self._router.connect_stream(self._conversation_id)
            self._ws.settimeout(None)
            while not self._closing:
                text = self._ws.recv()
                if not text:
                    break
                try:
                    event = json.loads(text)
                except (TypeError, json.JSONDecodeError):
                    continue  # plain-text acknowledgements and noise are not events
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "ready":
                    self.ready.set()
                    continue
                self._on_event(event)
        except Exception as exc:  # the stream is an aid, not the session: report and end
            if not self._closing:
                self.failed = f"the conversation stream failed ({exc.__class__.__name__})"
                log.debug("%s", self.failed)
                self._on_event({"type": "stream_failed", "message": self.failed})
        finally:
            self.ready.set()
            if self._ws is not None:
                self._ws.shutdown()  # closes the socket itself; abort() alone leaves the fd open

    def close(self, wait: bool = True) -> None:
        """Wake the reader (abort) and wait (unless told not to) for it to close the socket."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            try:
                ws.abort()
            except Exception:
                pass
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)


class CandidateSender:
    """Sends local candidates: buffered until the offer is acknowledged, then one batch, then live.

    The buffer is swapped under a lock, so a candidate added while a batch is in flight goes into
    the new buffer and is sent by the next loop turn: none is lost. Live candidates go out at once.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None], batch: bool) -> None:
        self._send = send
        self.batch = batch
        self._lock = threading.Lock()
        self._buffer: list[dict[str, Any]] = []
        self._end = False
        self._live = False
        self.actions = 0

    def add(self, candidates: Sequence[dict[str, Any]], end: bool = False) -> None:
        """New local candidates (and/or end-of-candidates); send now if live, else buffer."""
        with self._lock:
            if not self._live:
                self._buffer.extend(candidates)
                self._end = self._end or end
                return
        self._transmit(list(candidates), end)

    def go_live(self) -> None:
        """The offer is acknowledged: flush the buffer in one action, then send live."""
        while True:
            with self._lock:
                pending, end = self._buffer, self._end
                self._buffer, self._end = [], False
                if not pending and not end:
                    self._live = True
                    return
            self._transmit(pending, end)

    def _transmit(self, candidates: list[dict[str, Any]], end: bool) -> None:
        if self.batch:
            for start in range(0, max(len(candidates), 1), protocol.MAX_CANDIDATES_PER_BATCH):
                chunk = candidates[start:start + protocol.MAX_CANDIDATES_PER_BATCH]
                last = start + protocol.MAX_CANDIDATES_PER_BATCH >= len(candidates)
                if len(chunk) == 1 and not (end and last):
                    self._send({"candidate": chunk[0]})
                else:
                    self._send({"candidates": chunk, "end_of_candidates": end and last})
                self.actions += 1
            return
        for candidate in candidates:  # pre-1.7.0: one candidate per action, one after another
            self._send({"candidate": candidate})
            self.actions += 1
        if end:
            self._send({"candidate": None})
            self.actions += 1


@dataclass
class ConnectOptions:
    """How to negotiate; the legacy_* settings reproduce the old client for side-by-side benchmarks."""

    trickle: bool = True
    # None/True: host candidates ride in the offer (server-reflexive and relay ones follow as
    # found, so a slow STUN/TURN server never delays it); False: the offer carries none and every
    # candidate follows in actions (the old client's way, kept for benchmarks).
    candidates_in_offer: bool | None = None
    timeout_s: float = 15.0
    legacy_ws_ready_wait: bool = False
    legacy_backend_delay_s: float = 0.0
    legacy_per_candidate: bool = False
    # Trickle: ask for the answer in the offer's reply (a current gateway has it by then); False
    # takes it from the conversation stream as older clients do (kept for benchmarks).
    answer_in_reply: bool = True
    # Access governance (docs/GATEWAY.md): why and under which ticket, carried in the offer; how
    # long to wait for an approver when the gateway holds the offer.
    reason: str | None = None
    ticket: str | None = None
    wait_timeout_s: float = 300.0


@dataclass
class Session:
    """An open WebRTC session with a gateway."""

    loop: BackgroundLoop
    router: RouterClient
    gateway: str | None  # None until the offer's reply names it (an offer addressed by resource)
    resource: str
    conversation_id: str
    peer: ClientPeer
    listener: StreamListener
    trickle: bool
    candidate_actions: int = 0
    candidate_worker: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pam-candidates"),
        repr=False)
    _closed: bool = field(default=False, repr=False)

    def close(self, notify: bool = True, wait: bool = True) -> None:
        """Tell the gateway (best effort, on its own thread, bounded), stop the stream and the peer.

        wait False (Ctrl-C): the close notice is not waited for at all, so an unresponsive router
        never holds up an interrupt. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if notify and not self.peer.lost.is_set():
            notice = threading.Thread(target=self._send_close_notice, name="pam-close-notice", daemon=True)
            notice.start()
            if wait:
                notice.join(CLOSE_NOTICE_TIMEOUT_S)
        self.listener.close(wait=wait)
        self.candidate_worker.shutdown(wait=False, cancel_futures=True)
        try:
            self.loop.run(self.peer.close(), timeout=5)
        except Exception as exc:
            log.debug("peer close: %s", exc)

    def _send_close_notice(self) -> None:
        try:
            if self.gateway is None:  # an offer by resource was refused before its reply named one
                self.router.resource_action(self.resource, "close", self.conversation_id, {}, self.trickle,
                                            timeout=CLOSE_NOTICE_TIMEOUT_S)
            else:
                self.router.action(self.gateway, "close", self.conversation_id, {}, self.trickle,
                                   timeout=CLOSE_NOTICE_TIMEOUT_S)
        except PamError as exc:
            log.debug("close action failed: %s", exc.message)


class _Phase:
    """The phase we are waiting in, so a timeout can name what stalled."""

    def __init__(self, timing: Any) -> None:
        self.name = "the peer to be created"
        self.held_s: float | None = None  # set while a held offer waits for an approver
        self._timing = timing

    def done(self, checkpoint: str, next_wait: str) -> None:
        if self._timing is not None:
            self._timing.checkpoint(checkpoint)
        self.name = next_wait
        self.held_s = None


async def _call(function: Callable[[ClientPeer], None], peer: ClientPeer) -> None:
    function(peer)  # on the loop thread, where the peer's events fire


def new_conversation_id() -> str:
    return secrets.token_urlsafe(18)


def open_session(loop: BackgroundLoop, router: RouterClient, gateway: str | None, resource: str,
                 session: protocol.SessionRequest, *, ice_servers: Sequence[Any],
                 host_addresses: Sequence[str], timing: Any = None,
                 options: ConnectOptions | None = None, ice_transport_policy: str = "all",
                 on_peer: Callable[[ClientPeer], None] | None = None,
                 on_candidate_action: Callable[[dict[str, Any], CandidateSender], None] | None = None) -> Session:
    """Negotiate a peer with `gateway` for `resource`; returns once the control channel is open.

    gateway None: the offer is addressed to the resource and the returned Session's gateway is
    the one that answered.

    on_peer, if given, is called with the new peer before any remote byte can arrive (to attach
    channel listeners). on_candidate_action, if given, is called with each icecandidate payload just before it is
    sent (tests use it to inject a candidate while a batch is in flight).
    """
    options = options or ConnectOptions()
    deadline = time.monotonic() + options.timeout_s
    phase = _Phase(timing)
    # No capability round trip: use what this session already knows of the gateway, else
    # assume a current one; the offer's reply tells the truth (a pre-1.7.0 gateway answers
    # in that reply whatever we asked) before any candidate action is sent.
    info = router.known_gateway(gateway) if gateway is not None else None
    trickle = options.trickle and (info is None or info.trickle)

    conversation_id = new_conversation_id()
    holder: dict[str, ClientPeer] = {}
    answer_once = AnswerOnce()
    listener = StreamListener(router, conversation_id,
                              lambda event: _on_stream_event(loop, holder, event, phase, answer_once))
    listener.start()
    try:
        peer = _run(loop, ClientPeer.create(ice_servers, host_addresses, terminal=session.mode == "terminal",
                                            ice_transport_policy=ice_transport_policy),
                    deadline, phase, resource, options)
    except BaseException:
        listener.close()
        raise
    peer.trickle_expected = trickle
    holder["peer"] = peer
    if on_peer is not None:
        loop.run(_call(on_peer, peer))
    phase.done("peer_created", "local candidates to be gathered")
    if timing is not None:
        peer.ice_connected_callback = lambda: timing.checkpoint("ice_connected")
    result = Session(loop, router, gateway, resource, conversation_id, peer, listener, trickle)
    try:
        _negotiate(result, session, phase, deadline, options, on_candidate_action, answer_once)
    except BaseException as exc:
        result.close(notify=True, wait=not isinstance(exc, KeyboardInterrupt))
        raise
    return result


def _negotiate(result: Session, session: protocol.SessionRequest, phase: _Phase, deadline: float, options: ConnectOptions,
               on_candidate_action: Callable[[dict[str, Any], CandidateSender], None] | None,
               answer_once: "AnswerOnce") -> None:
    loop, router, peer, trickle = result.loop, result.router, result.peer, result.trickle
    conversation_id, resource = result.conversation_id, result.resource
    in_offer = not trickle or options.candidates_in_offer is not False
    sdp = _run(loop, peer.make_offer(gather_first=in_offer), deadline, phase, resource, options)
    if not in_offer:
        sdp, _, _ = protocol.split_sdp_candidates(sdp)
    phase.done("offer_created", "the offer's reply")

    def send_candidates(data: dict[str, Any]) -> None:
        if on_candidate_action is not None:
            on_candidate_action(data, sender)
        assert result.gateway is not None  # candidates go out only after the offer's reply
        router.action(result.gateway, "icecandidate", conversation_id, data, trickle)

    sender = CandidateSender(send_candidates, batch=not options.legacy_per_candidate)
    # Candidates found on the loop go to ONE worker thread, in order (an end-of-candidates must
    # never overtake a candidate), so the loop never blocks on HTTP. Before the offer is
    # acknowledged they are buffered.
    worker = result.candidate_worker

    def late(candidate: dict[str, Any] | None) -> None:
        try:
            worker.submit(sender.add, [] if candidate is None else [candidate], candidate is None)
        except RuntimeError:  # the session closed (its worker shut down) before gathering ended
            log.debug("late candidate after the session closed: not sent")

    if not in_offer:
        def gathered(future: Any) -> None:
            if not future.cancelled() and future.exception() is None:
                worker.submit(sender.add, future.result(), not peer.late_expected)
                loop.submit(peer.watch_late_candidates(late))

        loop.submit(peer.local_candidates()).add_done_callback(gathered)
    else:
        loop.submit(peer.watch_late_candidates(late))

    if options.legacy_ws_ready_wait:
        result.listener.ready.wait(max(0.0, deadline - time.monotonic()))
        if options.legacy_backend_delay_s:
            time.sleep(options.legacy_backend_delay_s)  # compatibility profile only, default off

    offer = {"type": "offer", "sdp": sdp, "resource": resource, "session": session.to_json()}
    access = {k: v for k, v in (("reason", options.reason), ("ticket", options.ticket)) if v}
    if access:
        offer["access"] = access
    if trickle and options.answer_in_reply and not options.legacy_ws_ready_wait:
        offer["answer_in_reply"] = True  # a gateway that has its answer by then puts it in the reply
    try:  # the reply may be held up at the gateway; the connect deadline bounds the wait
        reply = _send_offer(result, offer, lambda: _remaining(deadline, phase, resource, options))
    except RouterTimeout:
        raise _timeout(phase, resource, options) from None
    gateway = result.gateway
    assert gateway is not None
    learnt = router.known_gateway(gateway)
    if learnt is not None and not learnt.batch:
        sender.batch = False  # before go_live: nothing has been sent yet
    held = reply.get("held") is True  # the gateway waits for an approver: so do we, up to wait_timeout_s
    if trickle and not reply.get("sdp"):
        phase.done("offer_acked", "the answer on the conversation stream")
        if held:
            _held(reply, resource, phase, options)
    else:
        answer = reply.get("sdp")
        if not isinstance(answer, str):
            raise PamError(f"gateway {gateway} sent no answer to the offer")
        if answer_once.claim():  # else the stream's copy came first and is applied already
            try:
                _run(loop, peer.apply_answer(answer), deadline, phase, resource, options)
            except protocol.ProtocolError as exc:
                raise PamError(f"gateway {gateway} sent an unusable answer: {exc.message}") from None
            phase.done("answer_received", "the ICE connection")
    sender.go_live()
    if held:  # the answer (approved) or a failed state (denied, expired) on the stream ends the wait
        if not answer_once.news.wait(options.wait_timeout_s):
            raise _timeout(phase, resource, options)
        deadline = time.monotonic() + options.timeout_s  # then a connect like any other
    result.candidate_actions = sender.actions
    if sender.actions:
        phase.done("candidates_sent", phase.name)
    try:
        _run(loop, peer.wait_ready(), deadline, phase, resource, options)
    except PeerLost as exc:
        reason = str(exc) or "the gateway closed the session"
        hint = ice_hint(peer, resource) if "ICE" in reason or "failed" in reason else ""
        raise PamError(f"could not connect to {resource}: {reason}{hint}") from None
    result.candidate_actions = sender.actions
    phase.done("data_channel_open", "nothing")


def ice_hint(peer: ClientPeer, resource: str) -> str:
    """What a failed connect tried and where to look next (ICE server URLs only, never credentials)."""
    urls = []
    for server in peer.ice_servers:
        listed = getattr(server, "urls", server)
        urls.extend(listed if isinstance(listed, list) else [listed])
    hosts = ", ".join(peer.host_addresses) or "none"
    servers = ", ".join(str(u).split("?")[0] for u in urls) or "none"
    return (f" (tried: policy {peer.ice_transport_policy}, host addresses {hosts}, ICE servers {servers}); "
            f"across NAT configure ice_servers (STUN, or TURN for symmetric NAT); run: pam tunnel diagnose {resource}")


def _send_offer(result: Session, offer: dict[str, Any], timeout: Callable[[], float]) -> dict[str, Any]:
    """The offer to its gateway; with none known yet, addressed to the resource (one round trip, and
    result.gateway is learnt from the reply). Routers older than that route, and gateways that do
    not announce their resources, answer 404: then the full list names the gateway."""
    router, conversation_id = result.router, result.conversation_id
    if result.gateway is None:
        try:
            result.gateway, reply = router.resource_action(result.resource, "offer", conversation_id, offer,
                                                           result.trickle, timeout())
            return reply
        except RouterRefusal as exc:
            if exc.http_status != 404:
                raise
            log.debug("offer by resource: %s; looking %s up in the resource list", exc.message, result.resource)
        result.gateway = router.gateway_of(result.resource)
    return router.action(result.gateway, "offer", conversation_id, offer, result.trickle, timeout())


def _held(reply: dict[str, Any], resource: str, phase: _Phase, options: ConnectOptions) -> None:
    """Say what the held offer waits for (one line, and the phase a timeout names)."""
    waiting = " ".join(str(reply.get("waiting_for") or "approval").split())[:200]
    log.info("%s: waiting for %s (up to %g s)", resource, waiting, options.wait_timeout_s)
    phase.name = waiting
    phase.held_s = options.wait_timeout_s


def _run(loop: BackgroundLoop, coro: Any, deadline: float, phase: _Phase, resource: str,
         options: ConnectOptions) -> Any:
    """Run a step on the loop within the connect deadline; a timeout names the phase."""
    try:
        return loop.run(coro, timeout=_remaining(deadline, phase, resource, options))
    except (TimeoutError, concurrent.futures.TimeoutError):
        raise _timeout(phase, resource, options) from None


def _remaining(deadline: float, phase: _Phase, resource: str, options: ConnectOptions) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(phase, resource, options)
    return left


def _timeout(phase: _Phase, resource: str, options: ConnectOptions) -> PamError:
    if phase.held_s is not None:
        return PamError(f"no answer for {resource} within --wait-timeout {phase.held_s:g} s "
                        f"(waited for {phase.name})")
    return PamError(f"connecting to {resource} timed out after {options.timeout_s:g} s waiting for {phase.name}")


class AnswerOnce:
    """The answer may come in the offer's reply or on the stream (or both, from a gateway that
    sends it twice): whichever is first is applied, exactly once (a second setRemoteDescription
    would fail the peer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False
        self.news = threading.Event()  # an answer or an end arrived (what a held offer waits for)

    def claim(self) -> bool:
        self.news.set()
        with self._lock:
            taken, self._taken = self._taken, True
            return not taken


def _on_stream_event(loop: BackgroundLoop, holder: dict[str, ClientPeer], event: dict[str, Any],
                     phase: _Phase, answer_once: AnswerOnce) -> None:
    """Runs on the listener thread: hand answer/candidates/state to the peer on the loop."""
    peer = holder.get("peer")
    if peer is None:
        return
    kind = event.get("type")
    if kind == "answer" and isinstance(event.get("sdp"), str):
        if not answer_once.claim():
            log.debug("answer on the stream ignored: the offer's reply carried it")
            return
        future = loop.submit(peer.apply_answer(event["sdp"]))
        future.add_done_callback(lambda f: _report(loop, peer, f, "the gateway's answer was unusable"))
        phase.done("answer_received", "the ICE connection")
    elif kind == "candidates" and isinstance(event.get("candidates"), list):
        future = loop.submit(peer.add_remote_candidates(event["candidates"], bool(event.get("end_of_candidates"))))
        future.add_done_callback(lambda f: _report(loop, peer, f, "the gateway sent an unusable candidate"))
    elif kind == "stream_failed":
        answer_once.news.set()
        if not peer.ready.is_set() and peer.trickle_expected:
            loop.call_soon(peer.mark_lost, str(event["message"]))
    elif kind in ("state", "error"):
        state = event.get("state")
        reason = str(event.get("reason") or event.get("message") or state or "error")
        if kind == "error" or state in ("closed", "failed"):
            loop.call_soon(peer.mark_lost, reason[:200])
            answer_once.news.set()


def _report(loop: BackgroundLoop, peer: ClientPeer, future: Any, reason: str) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("%s: %s", reason, future.exception())
        loop.call_soon(peer.mark_lost, reason)
