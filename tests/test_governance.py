"""Access governance end to end (issue 17): real router, gateway, aiortc peers, TCP and SSH targets.

One gateway for the module (EmbeddedGateway, in this process, so its log records are captured),
clients as real `pam` shell processes, `pam-gateway` control commands as real processes. Every
test checks the audit lines its conversation left, exactly.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from agent_support import agent_socket, last_json, run_shell, shell_env  # noqa: F401 (agent_socket: fixture)
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, demo_ssh_server, make_config, ssh_resource

SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
GATEWAY_CLI = [sys.executable, "-m", "commander_pam_plugin.gateway"]
PLUGIN = Path(__file__).parent / "gateway_plugins" / "governance_test_plugin.py"
WAIT = 60


class _Records(logging.Handler):
    """Every gateway log record of the module, formatted (the password must be in none)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("governance")
    control_dir = base / "control"
    control_dir.mkdir(mode=0o700)
    vault = base / "vault.txt"
    records = _Records()
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    with demo_ssh_server() as ssh, EchoServer() as echo, EchoServer() as guarded:
        vault.write_text(ssh.password)
        os.environ["PAM_TEST_VAULT_FILE"] = str(vault)
        tcp = {"kind": "tcp", "host": "127.0.0.1"}
        resources = [
            {"name": "needs-reason", **tcp, "port": guarded.port, "access": {"require_reason": True}},
            {"name": "frozen", **tcp, "port": guarded.port},
            {"name": "db-live", **tcp, "port": echo.port},
            {"name": "db-approve", **tcp, "port": guarded.port, "access": {"approvers": ["bob"]}},
            {"name": "db-idle", **tcp, "port": echo.port, "access": {"idle_timeout_s": 1.5, "warn_before_s": 1}},
            {"name": "db-ticket", **tcp, "port": echo.port,
             "access": {"require_reason": True, "require_ticket": True}},
            ssh_resource(ssh, "box-approve", access={"approvers": ["alice", "bob"]}),  # alice: never for her own
            ssh_resource(ssh, "box-short", access={"max_duration_s": 2, "warn_before_s": 1}),
            ssh_resource(ssh, "box-live"),
            {**{k: v for k, v in ssh_resource(ssh, "vault-box").items() if k != "password"},
             "access": {"credentials": "plugin"}},
        ]
        config = make_config(resources, audit_log=str(base / "audit.jsonl"),
                             control_socket=str(control_dir / "gw.sock"), plugin_files=[str(PLUGIN)])
        cli_config = base / "cli.toml"  # what an operator's `pam-gateway --config` reads: name and socket
        cli_config.write_text(f'[gateway]\nname = "gw-test"\ntoken = "{config["gateway"]["token"]}"\n'
                              f'control_socket = "{control_dir / "gw.sock"}"\n')
        cli_config.chmod(0o600)
        with EmbeddedGateway(config) as gateway:
            plugin = sys.modules["pam_gateway_plugin_governance_test_plugin"]
            yield {"gateway": gateway, "base": base, "audit": base / "audit.jsonl", "cli": cli_config,
                   "guarded": guarded, "echo": echo, "ssh": ssh, "records": records, "plugin": plugin}
    root.removeHandler(records)
    root.setLevel(saved_level)
    os.environ.pop("PAM_TEST_VAULT_FILE", None)


def _env(stack: Any, user: str = "alice") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    gateway = stack["gateway"]
    env.update(HOME=str(stack["base"]), PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token(user),
               PAM_AGENT_SOCKET=str(stack["base"] / "no-agent.sock"))
    return env


def _pam(stack: Any, *args: str, user: str = "alice") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHELL, "pam", *args], stdin=subprocess.DEVNULL, env=_env(stack, user),
                          capture_output=True, text=True, timeout=WAIT)


def _pam_background(stack: Any, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*SHELL, "pam", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(stack))


def _gateway_cli(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY_CLI, args[0], "--config", str(stack["cli"]), *args[1:]],
                          capture_output=True, text=True, timeout=WAIT)


def _audit(stack: Any, conversation: str | None = None, resource: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stack["audit"].read_text().splitlines()]
    return [e for e in lines if (conversation is None or e.get("conversation") == conversation)
            and (resource is None or e.get("resource") == resource)]


def _kinds(entries: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in entries]


def _session_of(stack: Any, resource: str) -> str:
    """The live session's id on `resource`, once the gateway has opened it (woken by its event)."""
    event = stack["plugin"].wait_for(lambda e: e.kind == "open" and e.record["resource"] == resource
                                     and e.record["conversation"] not in stack.setdefault("seen", set()))
    stack["seen"].add(event.record["conversation"])
    return event.record["conversation"]


def _ended(stack: Any, conversation: str) -> None:
    stack["plugin"].wait_for(lambda e: e.kind == "end" and e.record["conversation"] == conversation)


@pytest.mark.parametrize("resource, refusal", [
    ("needs-reason", "needs-reason requires a reason: add --reason TEXT"),  # the built-in policy (TOML)
    ("frozen", "change freeze until Monday"),  # a plugin file's pam_gateway_decide
])
def test_a_denied_offer_never_reaches_the_target(stack: Any, resource: str, refusal: str) -> None:
    before = len(_audit(stack, resource=resource))
    # --run would reach the target through the tunnel (one echoed byte) if the offer were allowed
    probe = f"{sys.executable} -c \"import socket; s = socket.create_connection(('{{host}}', {{port}}), 10); " \
            "s.sendall(b'x'); assert s.recv(1) == b'x'\""
    result = _pam(stack, "tunnel", "start", resource, "--run", probe)
    assert result.returncode != 0
    assert f"access to {resource} denied: {refusal}" in result.stderr
    assert stack["guarded"].connections == 0  # a real listener: no accept, ever
    entries = _audit(stack, resource=resource)[before:]
    assert [(e["kind"], e["verdict"], e["detail"], e["user"]) for e in entries] == \
        [("decision", "deny", refusal, "alice")]


def test_approval_waits_refuses_self_approval_and_connects_once_the_named_approver_approves(stack: Any) -> None:
    launch = _pam_background(stack, "launch", "box-approve", "--command", "echo approved-and-running",
                             "--reason", "rotate the TLS key", "--ticket", "CHG-42", "--wait-timeout", "40")
    waiting: dict[str, str] = {}
    seen = threading.Event()

    def read_stderr() -> None:
        assert launch.stderr is not None
        for line in launch.stderr:
            waiting.setdefault("text", "")
            waiting["text"] += line
            if "waiting for approval by " in line:
                waiting["line"] = line
                waiting["request"] = line.split("(request ")[1].split(")")[0]
                seen.set()
    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        assert seen.wait(WAIT), waiting
        assert "box-approve: waiting for approval by bob (request " in waiting["line"]  # never alice herself
        assert "(up to 40 s)" in waiting["line"]
        request_id = waiting["request"]
        gateway = stack["gateway"]

        def approve(user: str) -> requests.Response:
            return requests.post(f"{gateway.router_url}/api/v1/gateways/gw-test/actions",
                                 headers={"Authorization": f"Bearer {gateway.user_token(user)}"},
                                 json={"kind": "approve", "data": {"request": request_id, "decision": "approve"}},
                                 timeout=WAIT)
        def listing(user: str) -> list[str]:
            reply = requests.post(f"{gateway.router_url}/api/v1/gateways/gw-test/actions",
                                  headers={"Authorization": f"Bearer {gateway.user_token(user)}"},
                                  json={"kind": "approve", "data": {"list": True}}, timeout=WAIT)
            return [p["id"] for p in reply.json()["data"]["pending"]]
        assert listing("bob") == [request_id] and listing("alice") == [] and listing("carol") == []
        own = approve("alice")
        assert own.status_code == 403 and "alice may not approve their own request" in own.text
        outsider = approve("carol")
        assert outsider.status_code == 403 and "carol is not an approver of box-approve" in outsider.text
        assert launch.poll() is None  # still waiting: neither answer counted
        assert approve("bob").status_code == 200
        out, _ = launch.communicate(timeout=WAIT)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0 and out == "approved-and-running\n", waiting
    entries = _audit(stack, resource="box-approve")
    assert _kinds(entries) == ["decision", "approval", "approval", "approval", "open", "end"]
    decision, own_try, outsider_try, approval, opened, end = entries
    assert (decision["verdict"], decision["approvers"], decision["reason"], decision["ticket"]) == \
        ("hold", ["bob"], "rotate the TLS key", "CHG-42")
    assert (own_try["verdict"], own_try["approver"]) == ("refused", "alice")
    assert (outsider_try["verdict"], outsider_try["approver"]) == ("refused", "carol")
    assert (approval["verdict"], approval["approver"], approval["request"]) == ("approved", "bob", request_id)
    assert approval["ts"] <= opened["ts"] and opened["user"] == "alice" and end["status"] == "closed"


def test_a_session_over_its_maximum_duration_ends_with_the_reason_and_a_non_zero_status(stack: Any) -> None:
    result = _pam(stack, "launch", "box-short", "--command", "sleep 30")
    assert result.returncode == 255, result.stderr
    assert "gateway: this session on box-short ends in 1 s (maximum duration of 2 s)" in result.stderr
    assert "session ended by the gateway: maximum duration of 2 s reached" in result.stderr
    entries = _audit(stack, resource="box-short")
    assert _kinds(entries) == ["decision", "open", "end"]
    assert entries[2]["detail"] == "session ended by the gateway: maximum duration of 2 s reached"
    assert 2 <= entries[2]["duration_s"] < 10


def test_terminate_ends_a_live_tunnel_and_the_user_reads_the_reason(stack: Any) -> None:
    tunnel = _pam_background(stack, "tunnel", "start", "db-live", "--json", "--reason", "debug a query")
    try:
        assert tunnel.stdout is not None
        record = json.loads(tunnel.stdout.readline())
        import socket
        with socket.create_connection(("127.0.0.1", record["port"]), timeout=WAIT) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        conversation = _session_of(stack, "db-live")
        listed = json.loads(_gateway_cli(stack, "sessions", "--json").stdout)
        mine = [s for s in listed if s["id"] == conversation]
        assert len(mine) == 1 and mine[0]["user"] == "alice" and mine[0]["reason"] == "debug a query"
        assert mine[0]["bytes"] > 0 and mine[0]["mode"] == "tunnel"
        done = _gateway_cli(stack, "terminate", conversation, "--reason", "suspicious traffic")
        assert done.returncode == 0, done.stderr
        _, err = tunnel.communicate(timeout=WAIT)
    finally:
        if tunnel.poll() is None:
            tunnel.kill()
    assert tunnel.returncode == 1
    assert "session terminated by operator" in err and ": suspicious traffic" in err, err
    entries = _audit(stack, conversation=conversation)
    assert _kinds(entries) == ["decision", "open", "terminate", "end"]
    assert entries[2]["detail"] == "suspicious traffic" and entries[2]["by"].startswith("operator ")
    assert entries[3]["bytes"] > 0


def test_terminate_ends_a_live_launch(stack: Any) -> None:
    launch = _pam_background(stack, "launch", "box-live", "--command", "echo started; sleep 30")
    try:
        assert launch.stdout is not None and launch.stdout.readline() == "started\n"
        conversation = _session_of(stack, "box-live")
        table = _gateway_cli(stack, "sessions")
        assert conversation in table.stdout and "box-live" in table.stdout
        assert _gateway_cli(stack, "terminate", conversation, "--reason", "host reboot").returncode == 0
        _, err = launch.communicate(timeout=WAIT)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 255 and ": host reboot" in err, err
    assert _kinds(_audit(stack, conversation=conversation)) == ["decision", "open", "terminate", "end"]
    missing = _gateway_cli(stack, "terminate", conversation, "--reason", "again")
    assert missing.returncode == 1 and "no live session" in missing.stderr


def test_a_plugin_supplies_the_password_at_connect_time_and_it_is_written_nowhere(stack: Any) -> None:
    result = _pam(stack, "launch", "vault-box", "--command", "echo vault-ok")
    assert result.returncode == 0 and result.stdout == "vault-ok\n", result.stderr
    conversation = _audit(stack, resource="vault-box")[-1]["conversation"]
    _ended(stack, conversation)
    password = stack["ssh"].password
    assert stack["records"].lines  # the gateway did log (at DEBUG) while this ran
    listed = _gateway_cli(stack, "sessions", "--json")
    for text in [*stack["records"].lines, stack["audit"].read_text(), result.stdout, result.stderr,
                 listed.stdout, listed.stderr]:
        assert password not in text
    assert _kinds(_audit(stack, conversation=conversation)) == ["decision", "open", "end"]
    sock = Path(stack["base"]) / "control" / "gw.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(stack["audit"].stat().st_mode) == 0o600


def _waiting_request(process: subprocess.Popen[str]) -> tuple[str, list[str]]:
    """Read the client's stderr up to the line naming what it waits for: (request id, lines so far)."""
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "waiting for approval by " in line:
            return line.split("(request ")[1].split(")")[0], lines
    raise AssertionError("".join(lines))


def test_an_approver_denies_with_pam_gateway_and_the_target_is_never_reached(stack: Any) -> None:
    tunnel = _pam_background(stack, "tunnel", "start", "db-approve", "--reason", "export", "--wait-timeout", "40")
    try:
        request_id, _ = _waiting_request(tunnel)
        pending = json.loads(_gateway_cli(stack, "pending", "--json").stdout)
        assert [(p["id"], p["user"], p["approvers"]) for p in pending] == [(request_id, "alice", ["bob"])]
        denied = _gateway_cli(stack, "deny", request_id, "--as", "bob", "--reason", "not during the audit")
        assert denied.returncode == 0, denied.stderr
        _, err = tunnel.communicate(timeout=WAIT)
    finally:
        if tunnel.poll() is None:
            tunnel.kill()
    assert tunnel.returncode == 1
    assert f"request {request_id} denied by bob: not during the audit" in err
    assert stack["guarded"].connections == 0
    entries = _audit(stack, resource="db-approve")
    assert [(e["kind"], e["verdict"]) for e in entries] == [("decision", "hold"), ("approval", "denied")]
    assert entries[1]["approver"] == "bob" and entries[1]["detail"] == "not during the audit"


def test_a_held_request_that_nobody_answers_ends_at_the_wait_timeout(stack: Any) -> None:
    before = len(_audit(stack, resource="db-approve"))
    started = time.monotonic()
    result = _pam(stack, "tunnel", "start", "db-approve", "--run", "true", "--wait-timeout", "1")
    assert time.monotonic() - started < 12  # generous: not the 15 s connect timeout on top of the wait
    assert result.returncode == 1
    assert "no answer for db-approve within --wait-timeout 1 s (waited for approval by bob (request " \
        in result.stderr, result.stderr
    conversation = _audit(stack, resource="db-approve")[before]["conversation"]
    stack["plugin"].wait_for(lambda e: e.kind == "approval" and e.record["conversation"] == conversation)
    entries = _audit(stack, resource="db-approve")[before:]
    assert [(e["kind"], e["verdict"]) for e in entries] == [("decision", "hold"), ("approval", "withdrawn")]
    assert json.loads(_gateway_cli(stack, "pending", "--json").stdout) == []


def test_an_idle_tunnel_is_warned_then_ended(stack: Any) -> None:
    result = _pam(stack, "tunnel", "start", "db-idle")  # foreground: until the tunnel ends
    assert result.returncode == 1
    assert "gateway: this session on db-idle ends in 1 s (idle timeout of 1.5 s)" in result.stderr, result.stderr
    assert "lost: session ended by the gateway: idle for 1.5 s" in result.stderr
    entries = _audit(stack, resource="db-idle")
    assert _kinds(entries) == ["decision", "open", "end"]
    assert entries[2]["detail"] == "session ended by the gateway: idle for 1.5 s"


def test_reason_and_ticket_pass_through_the_agent_for_a_background_tunnel(stack: Any, tmp_path: Path,
                                                                          agent_socket: Path) -> None:
    env = shell_env(tmp_path, agent_socket, stack["gateway"])
    started = run_shell(env, "pam tunnel start db-ticket --background --json --reason 'restore a table' "
                             "--ticket INC-7")
    assert started.returncode == 0, started.stderr
    assert last_json(started.stdout)["resource"] == "db-ticket"
    tunnel_id = last_json(started.stdout)["id"]
    conversation = _session_of(stack, "db-ticket")
    assert _gateway_cli(stack, "terminate", conversation, "--reason", "end of shift").returncode == 0
    _ended(stack, conversation)
    # a session the gateway ended is final: the agent does not heal it (no new offer)
    from commander_pam_plugin.agent import client
    record = client.request({"op": "wait", "id": tunnel_id, "state": "lost", "timeout": 20}, path=agent_socket)
    assert record is not None and record["tunnel"]["state"] == "lost", record
    assert record["tunnel"]["reason"].endswith(": end of shift")
    entries = _audit(stack, resource="db-ticket")
    assert _kinds(entries) == ["decision", "open", "terminate", "end"]
    assert {(e["reason"], e["ticket"]) for e in entries} == {("restore a table", "INC-7")}
    assert run_shell(env, "pam tunnel stop --all").returncode == 0


def test_approval_needs_trickle(stack: Any) -> None:
    before = len(_audit(stack, resource="db-approve"))
    result = _pam(stack, "tunnel", "start", "db-approve", "--no-trickle-ice", "--run", "true")
    assert result.returncode == 1
    refusal = "db-approve needs approval, which needs trickle ICE (connect without --no-trickle-ice)"
    assert f"access to db-approve denied: {refusal}" in result.stderr
    assert [(e["kind"], e["verdict"], e["detail"]) for e in _audit(stack, resource="db-approve")[before:]] == \
        [("decision", "deny", refusal)]


def test_a_reused_peer_gets_the_offer_decision_for_another_resource(stack: Any, tmp_path: Path,
                                                                    agent_socket: Path) -> None:
    env = shell_env(tmp_path, agent_socket, stack["gateway"])
    first = run_shell(env, "pam tunnel start db-live --background --json --reason 'reuse check'")
    assert first.returncode == 0, first.stderr
    conversation = _session_of(stack, "db-live")
    from commander_pam_plugin.agent import client
    answer = client.request({"op": "start", "resource": "frozen", "gateway": "gw-test"}, path=agent_socket)
    assert answer is not None and "tunnel" in answer, answer  # reused: no offer, so no refusal yet
    import socket
    with socket.create_connection(("127.0.0.1", answer["tunnel"]["port"]), timeout=WAIT) as sock:
        sock.sendall(b"let me in")
        assert sock.recv(100) == b""  # refused at the gateway: nothing comes back
    assert stack["guarded"].connections == 0
    [frozen] = [t for t in client.request({"op": "list"}, path=agent_socket)["tunnels"] if t["resource"] == "frozen"]
    assert "access to frozen denied: change freeze until Monday" in frozen["last_error"], frozen
    streams = [e for e in _audit(stack, conversation=conversation) if e["resource"] == "frozen"]
    assert [(e["kind"], e["verdict"], e["reason"]) for e in streams] == [("decision", "deny", "reuse check")]
    assert run_shell(env, "pam tunnel stop --all").returncode == 0
