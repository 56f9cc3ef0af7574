"""Launch sessions held across a lost peer, and who may resume them (docs/PROTOCOL.md section 7).

Real router, gateway, aiortc peers and asyncssh server on 127.0.0.1; the client side is the
plugin's own negotiation (open_session) with the terminal channel read directly, so each check
sees the protocol messages themselves. A lost peer is a client that closes its peer connection
without the close action (the gateway sees the connection close, as after a consent failure);
the network cut and the real CLI's own recovery are in test_netlab_resume.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from commander_pam_plugin import protocol
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from commander_pam_plugin.loop import BackgroundLoop
from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, RouterRefusal, open_session
from gateway_support import demo_ssh_server, make_config, ssh_resource

WAIT = 20.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    recordings = tmp_path_factory.mktemp("recordings")
    with demo_ssh_server() as server:
        resources = [ssh_resource(server, "box", record=True),
                     ssh_resource(server, "brief", resume_grace_s=1, record=True),
                     ssh_resource(server, "small", resume_buffer_bytes=1024, record=True),
                     ssh_resource(server, "limited", access={"max_duration_s": 600})]
        audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
        with EmbeddedGateway(make_config(resources, recordings_dir=str(recordings),
                                         audit_log=str(audit))) as gateway:
            loop = BackgroundLoop("resume-test")
            try:
                yield gateway, loop, recordings
            finally:
                loop.stop()


class RawTerminal:
    """One conversation's terminal channel, every message kept: bytes, and ops as dicts."""

    def __init__(self, stack: Any, user: str, resource: str, request: protocol.SessionRequest,
                 hello: Callable[[], dict[str, Any]] | None = None) -> None:
        gateway, loop, _ = stack
        self.messages: list[Any] = []
        self._changed = threading.Condition()
        self.router = RouterClient(gateway.router_url, gateway.user_token(user))

        def on_peer(peer: Any) -> None:
            self.channel = peer.terminal
            peer.terminal.on("message", self._on_message)
            if hello is not None:
                peer.terminal.on("open", lambda: peer.terminal.send(protocol.control_message(**hello())))

        self.session = open_session(loop, self.router, gateway.gateway_name, resource, request, ice_servers=[],
                                    host_addresses=["127.0.0.1"], on_peer=on_peer,
                                    options=ConnectOptions(timeout_s=WAIT))
        self.loop = loop

    def _on_message(self, message: Any) -> None:
        item = message if isinstance(message, bytes) else json.loads(message)
        with self._changed:
            self.messages.append(item)
            self._changed.notify_all()

    def op(self, name: str) -> dict[str, Any]:
        """The first `name` op, waited for."""
        def found() -> dict[str, Any] | None:
            return next((m for m in self.messages if isinstance(m, dict) and m.get("op") == name), None)
        with self._changed:
            assert self._changed.wait_for(lambda: found() is not None, WAIT), (name, self.messages)
            result = found()
        assert result is not None
        return result

    def output(self) -> bytes:
        return b"".join(m for m in self.messages if isinstance(m, bytes))

    def wait_output(self, text: bytes) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: text in self.output(), WAIT), self.messages

    def send(self, data: bytes) -> None:
        self.loop.call_soon(self.channel.send, data)

    def lose(self) -> None:
        """The peer goes without a word (no close action): the gateway sees the connection close."""
        self.session.close(notify=False)

    def close(self) -> None:
        self.session.close()


def _resumable(command: str) -> protocol.SessionRequest:
    return protocol.SessionRequest(mode="terminal", command=command, pty=False, resumable=True)


def _resume(stack: Any, user: str, resource: str, grant: dict[str, Any], secret: str | None = None,
            output: int = 0) -> RawTerminal:
    request = protocol.SessionRequest(mode="terminal", command=None, pty=False, resume=grant["id"])
    hello = {"op": "resume", "id": grant["id"], "secret": grant["secret"] if secret is None else secret,
             "output": output}
    return RawTerminal(stack, user, resource, request, hello=lambda: hello)


def _resume_when_detached(stack: Any, grant: dict[str, Any], output: int) -> RawTerminal:
    """Resume as the client does: the gateway may not have seen the loss yet ('one client at a time',
    a refusal that says to retry), so try again until it has, within a bound."""
    deadline = time.monotonic() + WAIT
    while True:
        attempt = _resume(stack, "alice", "box", grant, output=output)
        outcome = attempt.op(_answered(attempt))
        if outcome["op"] == "resumed":
            return attempt
        attempt.close()
        assert outcome.get("retry") is True and time.monotonic() < deadline, outcome
        time.sleep(0.1)  # the client's backoff between refused attempts


def _answered(terminal: RawTerminal) -> str:
    with terminal._changed:
        assert terminal._changed.wait_for(
            lambda: any(isinstance(m, dict) and m.get("op") in ("resumed", "error") for m in terminal.messages), WAIT)
        return next(m["op"] for m in terminal.messages if isinstance(m, dict) and m.get("op") in ("resumed", "error"))


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _markers(recordings: Path, conversation_id: str) -> list[str]:
    cast = next(recordings.glob(f"*-{conversation_id}.cast"))
    return [event[2] for event in map(json.loads, cast.read_text().splitlines()[1:]) if event[1] == "m"]


def test_only_the_same_user_with_the_secret_resumes_and_one_client_at_a_time(stack) -> None:
    gateway, _, recordings = stack
    first = RawTerminal(stack, "alice", "box", _resumable("cat"))
    grant = first.op("session")
    assert len(grant["secret"]) >= 43 and grant["grace"] == 120
    first.send(b"hello\n")
    first.wait_output(b"hello\n")

    with pytest.raises(RouterRefusal) as refused:  # another user: the offer itself is refused
        _resume(stack, "bob", "box", grant)
    assert refused.value.http_status == 404 and "no session" in refused.value.message

    wrong = _resume(stack, "alice", "box", grant, secret="x" * 43, output=6)
    assert "wrong resume secret" in wrong.op("error")["reason"]
    wrong.close()
    while_attached = _resume(stack, "alice", "box", grant, output=6)
    refusal = while_attached.op("error")
    assert "attached to another client" in refusal["reason"] and refusal.get("retry") is True
    while_attached.close()

    first.send(b"typed-before-the-loss\n")
    first.wait_output(b"typed-before-the-loss\n")
    received = len(first.output())
    first.lose()
    second = _resume_when_detached(stack, grant, received)
    resumed = second.op("resumed")
    assert resumed["output"] == received and resumed["input"] == len(b"hello\ntyped-before-the-loss\n")
    second.send(b"after\n")
    second.wait_output(b"after\n")
    assert second.output() == b"after\n"  # nothing doubled: the first channel had all the rest

    third = _resume(stack, "alice", "box", grant, output=received)  # a second client while one is attached
    assert "attached to another client" in third.op("error")["reason"]
    third.close()
    second.close()  # the client's own close ends the held session
    _wait_until(lambda: gateway.agent.launch_sessions.get(grant["id"]) is None, "the session to end")
    markers = _markers(recordings, first.session.conversation_id)
    assert [m.split(":")[0] for m in markers] == ["held", "resumed", "ended"], markers


def test_a_resumed_session_keeps_the_clock_of_its_limits_and_leaves_its_audit_lines(stack) -> None:
    """Dropping the network must not buy a longer maximum duration; the trail tells the whole story."""
    gateway, _, _ = stack
    governor = gateway.agent.governor
    first = RawTerminal(stack, "alice", "limited", _resumable("cat"))
    grant = first.op("session")
    first_id = first.session.conversation_id
    opened_since = next(s["since"] for s in governor.listing() if s["id"] == first_id)
    first.send(b"one\n")
    first.wait_output(b"one\n")
    time.sleep(1.0)  # the resumed session must not start its limits clock again after this
    first.lose()
    attempt_deadline = time.monotonic() + WAIT
    while True:
        second = _resume(stack, "alice", "limited", grant, output=len(first.output()))
        if second.op(_answered(second))["op"] == "resumed":
            break
        second.close()
        assert time.monotonic() < attempt_deadline
        time.sleep(0.1)  # the client's backoff between refused attempts
    second_id = second.session.conversation_id
    resumed_since = next(s["since"] for s in governor.listing() if s["id"] == second_id)
    assert abs(resumed_since - opened_since) < 0.5, (opened_since, resumed_since)
    second.close()
    _wait_until(lambda: gateway.agent.launch_sessions.get(grant["id"]) is None, "the session to end")
    lines = [json.loads(line) for line in governor.audit.path.read_text().splitlines()]
    mine = [(entry["kind"], entry.get("conversation")) for entry in lines
            if entry.get("resource") == "limited" and entry["kind"] != "decision"]
    assert mine == [("open", first_id), ("held", first_id), ("end", first_id), ("open", second_id),
                    ("resume", second_id), ("end", second_id)], mine


def test_output_while_away_is_replayed_from_the_clients_offset(stack) -> None:
    first = RawTerminal(stack, "alice", "box", _resumable("echo start; read go; seq 1 2000; echo done"))
    grant = first.op("session")
    first.wait_output(b"start\n")
    received = len(first.output())
    first.lose()
    second = _resume_when_detached(stack, grant, received)
    second.send(b"go\n")  # input after the resume reaches the same process
    second.wait_output(b"done\n")
    assert second.output() == "".join(f"{i}\n" for i in range(1, 2001)).encode() + b"done\n"
    assert second.op("exit")["status"] == 0
    second.close()


def test_after_the_grace_period_the_session_is_gone(stack) -> None:
    gateway, _, recordings = stack
    first = RawTerminal(stack, "alice", "brief", _resumable("sleep 30"))
    grant = first.op("session")
    first.lose()
    _wait_until(lambda: gateway.agent.launch_sessions.get(grant["id"]) is None, "the grace period to pass")
    with pytest.raises(RouterRefusal) as gone:
        _resume(stack, "alice", "brief", grant)
    assert gone.value.http_status == 410
    assert "did not come back within the grace period of 1 s" in gone.value.message
    assert _markers(recordings, first.session.conversation_id)[-1].startswith("expired:")


def test_more_output_than_the_bound_while_away_ends_the_session_with_the_reason(stack) -> None:
    gateway, _, recordings = stack
    # 10 KB/s of output, this client acknowledges none of it: over 1 KiB waits for it soon after the loss
    first = RawTerminal(stack, "alice", "small", _resumable("while :; do head -c 512 /dev/zero; sleep 0.05; done"))
    grant = first.op("session")
    first.lose()
    _wait_until(lambda: gateway.agent.launch_sessions.get(grant["id"]) is None, "the session to end")
    with pytest.raises(RouterRefusal) as gone:
        _resume(stack, "alice", "small", grant)
    assert gone.value.http_status == 410 and "more than 1024 bytes of output waiting" in gone.value.message
    assert "more than 1024 bytes" in _markers(recordings, first.session.conversation_id)[-1]


def test_an_older_client_still_gets_stderr_merged_and_no_resume_grant(stack) -> None:
    old = RawTerminal(stack, "alice", "box",
                      protocol.SessionRequest(mode="terminal", command="echo err >&2; echo out", pty=False))
    assert old.op("exit")["status"] == 0
    assert b"err\n" in old.output() and b"out\n" in old.output()
    assert not any(isinstance(m, dict) and m.get("op") in ("session", "stderr") for m in old.messages)
    old.close()


def test_command_stderr_goes_to_local_stderr(tmp_path: Path) -> None:
    """The issue's check, through the real shell and the embedded default (demo)."""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TERM": "xterm-256color"}
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.shell", "pam", "launch", "demo",
                             "--command", "echo err >&2; echo out"], stdin=subprocess.DEVNULL, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "out\n"
    assert result.stderr.splitlines()[-1] == "err"


def test_resume_requests_are_validated() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.validate_session({"mode": "terminal", "resume": "../../etc"})
    with pytest.raises(protocol.ProtocolError):
        protocol.validate_session({"mode": "terminal", "resumable": "yes"})
    request = protocol.validate_session({"mode": "terminal", "resume": "abcdefgh12", "stderr": True})
    assert request.resume == "abcdefgh12" and request.stderr and not request.resumable
    assert "resume" not in protocol.SessionRequest(mode="terminal").to_json()  # older gateways see the old request


class _FakeChannel:
    """Only what TerminalLink touches of an RTCDataChannel: handlers, readyState, sent items."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Callable[..., None]]] = {}
        self.readyState = "open"
        self.sent: list[Any] = []

    def on(self, event: str, handler: Callable[..., None]) -> None:
        self.handlers.setdefault(event, []).append(handler)

    once = on

    def send(self, item: Any) -> None:
        self.sent.append(item)

    def arrive(self, message: Any) -> None:
        for handler in self.handlers.get("message", []):
            handler(message)


class _FakeFlow:
    def __init__(self) -> None:
        self.channel = _FakeChannel()
        self.writable = threading.Event()
        self.writable.set()
        self.on_writable: Callable[[], None] | None = None
        self.sent: list[Any] = []

    def take(self, message: Any) -> bool:
        return False

    def reserve(self, size: int) -> None:
        pass

    def send(self, item: Any) -> None:
        self.sent.append(item)


class _FakePeer:
    def __init__(self) -> None:
        self.controls: list[tuple[str, dict[str, Any]]] = []

    def send_control(self, op: str, **fields: Any) -> None:
        self.controls.append((op, fields))


class _Notices:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def feed_notice(self, text: str) -> None:
        self.lines.append(text)


def _on(loop: BackgroundLoop, function: Callable[..., Any], *args: Any) -> Any:
    async def call() -> Any:
        return function(*args)
    return loop.run(call(), timeout=5)


def test_input_the_gateway_did_not_write_is_sent_again_and_pipe_input_while_away_is_kept() -> None:
    """TerminalLink alone (narrow: fake channels): what a resume sends again, and what it keeps."""
    from commander_pam_plugin.launch_link import TerminalLink

    loop = BackgroundLoop("link-test")
    try:
        link = TerminalLink(loop, interactive=False)
        first, second = _FakeFlow(), _FakeFlow()
        _on(loop, link.use, first, _FakePeer())
        first.channel.arrive(protocol.control_message("session", id="sid-12345678", secret="s" * 43, grace=5))
        link.send(b"abc")
        _on(loop, lambda: None)
        assert first.sent == [b"abc"]
        first.channel.arrive(protocol.control_message("ack", input=1))  # the gateway wrote "a"
        first.channel.arrive(b"xyz")
        _on(loop, link.detach)
        assert not link.writable()  # a pipe is not read while away ...
        link.send(b"def")  # ... but what was read just before is kept
        _on(loop, lambda: None)
        woken: list[bool] = []
        link.on_writable(lambda: woken.append(True))
        handshake = _on(loop, link.offer_resume, second, _FakePeer())
        _on(loop, link.hello, second)
        hello = json.loads(second.channel.sent[0])
        assert hello == {"op": "resume", "id": "sid-12345678", "secret": "s" * 43, "output": 3}
        second.channel.arrive(protocol.control_message("resumed", input=2, eof=False, output=3))
        assert handshake.result(5) == ("resumed", "")
        assert second.sent == [b"cdef"] and woken == [True] and link.writable()
        assert first.sent == [b"abc"]  # nothing more went to the lost channel
    finally:
        loop.stop()


def test_typing_while_away_is_dropped_with_one_notice() -> None:
    from commander_pam_plugin.launch_link import TYPED_WHILE_AWAY, TerminalLink

    loop = BackgroundLoop("link-test")
    try:
        link = TerminalLink(loop, interactive=True)
        flow = _FakeFlow()
        _on(loop, link.use, flow, _FakePeer())
        notices = _Notices()
        link.runner = notices  # type: ignore[assignment]
        _on(loop, link.detach)
        assert link.writable()  # the terminal is still read, for ~.
        link.send(b"rm -rf build\r")
        link.send(b"y")
        _on(loop, lambda: None)
        assert link.input.end == 0 and flow.sent == [] and notices.lines == [TYPED_WHILE_AWAY]
    finally:
        loop.stop()


def test_the_output_log_reads_from_any_kept_offset_and_forgets_what_was_acknowledged() -> None:
    from commander_pam_plugin.gateway.launch_sessions import STDERR, STDOUT, OutputLog

    log = OutputLog()
    log.append(STDOUT, b"hello ")
    log.append(STDERR, b"oops\n")
    log.append(STDOUT, b"world\n")
    assert log.read(0, 64) == (STDOUT, b"hello ") and log.read(3, 2) == (STDOUT, b"lo")
    assert log.read(8, 64) == (STDERR, b"ps\n") and log.read(17, 64) is None
    log.trim(8)
    assert (log.base, log.held) == (8, 9) and log.read(8, 64) == (STDERR, b"ps\n")
    log.trim(4)  # never moves back
    assert log.base == 8
    log.trim(100)  # never past the end
    assert (log.base, log.held, log.read(17, 64)) == (17, 0, None)
