"""pam tunnel end to end: real shell, real router and gateway, real aiortc peers, real TCP (127.0.0.1)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client_support import GatewayProcess, ShellSession, echo_roundtrip, open_fds, payload, point_client_at, sha256
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, free_port, make_config

HERE = Path(__file__).parent
SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
ECHO_CHECK = f"{sys.executable} {HERE / 'tools' / 'echo_check.py'}"
EIGHT = ",".join(f"127.0.0.{i}" for i in range(1, 9))


@pytest.fixture(scope="module")
def echo() -> EchoServer:
    with EchoServer() as server:
        yield server


def _resources(echo: EchoServer) -> list[dict]:
    return [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port},
            {"name": "closed", "kind": "tcp", "host": "127.0.0.1", "port": free_port()}]


@pytest.fixture(scope="module")
def gateway(echo: EchoServer) -> EmbeddedGateway:
    with EmbeddedGateway(make_config(_resources(echo))) as gw:
        yield gw


def _env(gateway: EmbeddedGateway, tmp_path: Path, **extra: str) -> dict[str, str]:
    config = tmp_path / "client.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"),
               PAM_CONFIG=str(config), **extra)
    return env


@pytest.mark.parametrize("mode", [[], ["--no-trickle-ice"]], ids=["trickle", "non-trickle"])
def test_32_mib_each_way_arrive_intact_through_the_one_shot_shell(gateway: EmbeddedGateway, tmp_path: Path,
                                                                   mode: list[str]) -> None:
    result = subprocess.run([*SHELL, "pam", "tunnel", "start", "echo", *mode, "--run", f"{ECHO_CHECK} {{port}} 32"],
                            env=_env(gateway, tmp_path), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "received 33554432 sha256 match" in result.stdout
    assert "tunnel t1: 127.0.0.1:" in result.stdout


def test_run_command_status_becomes_the_exit_status(gateway: EmbeddedGateway, tmp_path: Path) -> None:
    result = subprocess.run([*SHELL, "pam", "tunnel", "start", "echo", "--run", "exit 7"],
                            env=_env(gateway, tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 7, result.stderr


def test_twenty_concurrent_connections_each_move_one_mib_intact(gateway: EmbeddedGateway, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    point_client_at(monkeypatch, gateway, tmp_path=tmp_path)
    with ShellSession() as session:
        status, out, err = session.run("pam tunnel start echo --json")
        assert status == 0, err
        port = json.loads(out)["port"]
        blobs = [payload(1024 * 1024, seed) for seed in range(20)]
        with ThreadPoolExecutor(20) as pool:
            echoed = list(pool.map(lambda blob: echo_roundtrip(port, blob), blobs))
        assert [sha256(e) for e in echoed] == [sha256(b) for b in blobs]
        status, out, _ = session.run("pam tunnel list --json")
        (row,) = json.loads(out)
        assert row["connections_total"] == 20 and row["bytes_out"] == row["bytes_in"] == 20 * 1024 * 1024


def _refused_roundtrip(port: int, data: bytes) -> bytes:
    """A round trip whose connection the tunnel may close before we finish sending (ENOTCONN/EPIPE)."""
    try:
        return echo_roundtrip(port, data)
    except OSError:
        return b""


def test_a_refused_target_connection_ends_alone_and_the_tunnel_stays_up(
        echo: EchoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed_port = free_port()
    resources = [{"name": "flaky", "kind": "tcp", "host": "127.0.0.1", "port": closed_port}]
    with EmbeddedGateway(make_config(resources)) as gw:
        point_client_at(monkeypatch, gw, tmp_path=tmp_path)
        with ShellSession() as session:
            status, out, err = session.run("pam tunnel start flaky --json")
            assert status == 0, err
            port = json.loads(out)["port"]
            assert _refused_roundtrip(port, b"nobody home") == b""  # refused at the target: closed, no bytes
            status, out, _ = session.run("pam tunnel list --json")
            (row,) = json.loads(out)
            assert row["state"] == "up" and row["refused"] == 1
            assert _refused_roundtrip(port, b"again") == b""
            assert json.loads(session.run("pam tunnel list --json")[1])[0]["refused"] == 2


def test_half_close_reaches_the_target_and_comes_back(gateway: EmbeddedGateway, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    point_client_at(monkeypatch, gateway, tmp_path=tmp_path)
    with ShellSession() as session:
        port = json.loads(session.run("pam tunnel start echo --json")[1])["port"]
        # echo_roundtrip half-closes and reads until the target's own EOF comes back through the tunnel
        assert echo_roundtrip(port, b"half-close please") == b"half-close please"


def test_pre_1_7_gateway_still_opens_a_tunnel(echo: EchoServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedGateway(make_config(_resources(echo), legacy=True)) as legacy:
        point_client_at(monkeypatch, legacy, tmp_path=tmp_path)
        with ShellSession() as session:
            status, out, err = session.run("pam tunnel start echo --json")  # trickle asked, not offered
            assert status == 0, err
            assert echo_roundtrip(json.loads(out)["port"], b"old gateway") == b"old gateway"
        assert legacy.router.stats["offer"] == 1


def test_gateway_without_batch_gets_one_action_per_candidate(echo: EchoServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from commander_pam_plugin import protocol
    from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session
    from commander_pam_plugin.loop import BackgroundLoop

    with EmbeddedGateway(make_config(_resources(echo), capabilities=["trickle"])) as gw:
        loop = BackgroundLoop()
        router = RouterClient(gw.router_url, gw.user_token("alice"))
        addresses = EIGHT.split(",")
        session = open_session(loop, router, gw.gateway_name, "echo", protocol.SessionRequest(),
                               ice_servers=[], host_addresses=addresses,
                               options=ConnectOptions(trickle=True, candidates_in_offer=False))
        try:
            counts = gw.router.conversation_stats[session.conversation_id]
            # Trickle: the session may be ready before the last one-by-one actions reach the router.
            deadline = time.monotonic() + 10.0  # a bound against hanging, not a timing claim
            while counts["icecandidate"] < len(addresses) + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert counts["icecandidate"] == len(addresses) + 1  # each alone, then end-of-candidates
            assert session.candidate_actions == len(addresses) + 1
        finally:
            session.close()
            router.close()
            loop.stop()


def test_eight_host_addresses_cost_at_most_one_candidate_action(gateway: EmbeddedGateway, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    point_client_at(monkeypatch, gateway, tmp_path=tmp_path, addresses=EIGHT)
    with ShellSession() as session:
        before = set(gateway.router.conversation_stats)
        status, out, err = session.run("pam tunnel start echo --json")
        assert status == 0, err
        (conversation,) = set(gateway.router.conversation_stats) - before
        assert gateway.router.conversation_stats[conversation]["icecandidate"] <= 1
        offered = [c for c in gateway.agent.applied_candidates[conversation]]
        assert {c["candidate"].split()[4] for c in offered} == set(EIGHT.split(","))
        assert echo_roundtrip(json.loads(out)["port"], b"eight") == b"eight"


def test_separate_candidates_go_in_one_batch_and_a_late_one_is_not_lost(gateway: EmbeddedGateway) -> None:
    from commander_pam_plugin import protocol
    from commander_pam_plugin.loop import BackgroundLoop
    from commander_pam_plugin.negotiation import ConnectOptions, RouterClient, open_session

    late = {"candidate": "candidate:late 1 udp 2130706431 127.0.0.9 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
    injected = threading.Event()

    def inject_during_first_batch(data: dict, sender) -> None:
        # Model a gatherer that is still running when the batch leaves: the batch carries no
        # end marker, and a late candidate (then end-of-candidates) arrives while it is in flight.
        if not injected.is_set():
            injected.set()
            data["end_of_candidates"] = False
            adder = threading.Thread(target=sender.add, args=([late], True))
            adder.start()
            adder.join(5)  # it was buffered, not sent: the batch is still in flight

    loop = BackgroundLoop()
    router = RouterClient(gateway.router_url, gateway.user_token("alice"))
    session = open_session(loop, router, gateway.gateway_name, "echo", protocol.SessionRequest(),
                           ice_servers=[], host_addresses=EIGHT.split(","),
                           options=ConnectOptions(trickle=True, candidates_in_offer=False),
                           on_candidate_action=inject_during_first_batch)
    try:
        conversation = session.conversation_id
        deadline = time.monotonic() + 10
        while late["candidate"] not in [c["candidate"] for c in gateway.agent.applied_candidates[conversation]]:
            assert time.monotonic() < deadline, "the late candidate never reached the gateway"
            time.sleep(0.01)
        counts = gateway.router.conversation_stats[conversation]
        assert counts["icecandidate"] == 2  # the batch of eight, then the late one alone
    finally:
        session.close()
        router.close()
        loop.stop()


def test_stop_all_leaves_no_listener_socket_or_thread(echo: EchoServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = GatewayProcess(make_config(_resources(echo)), tmp_path)  # its sockets are not ours to count
    try:
        point_client_at(monkeypatch, gateway, tmp_path=tmp_path)
        with ShellSession() as session:
            warm = json.loads(session.run("pam tunnel start echo --json")[1])  # loop + router session now exist
            assert session.run("pam tunnel stop --all")[0] == 0
            fds, threads = open_fds(), {t.name for t in threading.enumerate()}
            ports = []
            for _ in range(3):
                record = json.loads(session.run("pam tunnel start echo --json")[1])
                assert echo_roundtrip(record["port"], b"x" * 1000) == b"x" * 1000
                ports.append(record["port"])
            assert len(open_fds()) > len(fds)
            status, out, _ = session.run("pam tunnel stop --all")
            assert status == 0 and "stopped 3 tunnels" in out
            assert session.run("pam tunnel list")[1].strip() == "no tunnels"
            assert open_fds() - fds == set()
            assert {t.name for t in threading.enumerate()} - threads == set()
            for port in ports + [warm["port"]]:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        gateway.stop()


def test_killed_gateway_is_reported_by_tunnel_list_within_ten_seconds(echo: EchoServer, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = GatewayProcess(make_config(_resources(echo)), tmp_path)
    try:
        point_client_at(monkeypatch, gateway, tmp_path=tmp_path)
        with ShellSession() as session:
            port = json.loads(session.run("pam tunnel start echo --json")[1])["port"]
            assert echo_roundtrip(port, b"alive") == b"alive"
            gateway.kill()
            killed = time.monotonic()
            while True:  # what a user does: ask again until the state changes
                (row,) = json.loads(session.run("pam tunnel list --json")[1])
                if row["state"] == "lost":
                    break
                assert time.monotonic() - killed < 10, f"still {row['state']} 10 s after the kill"
                time.sleep(0.1)
            assert row["reason"]
            assert "lost" in session.err.getvalue()  # the interactive shell said so, unprompted
    finally:
        gateway.stop()


def test_busy_port_unknown_resource_and_unreachable_router_are_one_line_errors(
        gateway: EmbeddedGateway, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([*SHELL, "pam", "tunnel", "start", "echo", "--port", str(port)],
                                env=_env(gateway, tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in result.stderr

    result = subprocess.run([*SHELL, "pam", "tunnel", "start", "nosuch"], env=_env(gateway, tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "nosuch" in result.stderr and "echo" in result.stderr and "closed" in result.stderr

    env = _env(gateway, tmp_path)
    env["PAM_ROUTER_URL"] = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run([*SHELL, "pam", "tunnel", "start", "echo"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert time.monotonic() - started < 3 + 2  # the bound (3 s) plus interpreter start-up
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "cannot reach the router" in result.stderr


@pytest.mark.skipif(not __import__("shutil").which("curl"), reason="needs the curl client")
def test_curl_through_a_tunnel_with_braces_in_the_run_command(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A real HTTP server and a real curl; CMD keeps its own braces (curl's -w '%{http_code}')."""
    import functools
    import hashlib
    import http.server

    (tmp_path / "www").mkdir()
    blob = payload(3 * 1024 * 1024, seed=7)
    (tmp_path / "www" / "blob.bin").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        resources = [{"name": "web", "kind": "tcp", "host": "127.0.0.1", "port": server.server_address[1]}]
        with EmbeddedGateway(make_config(resources)) as gw:
            command = ("curl -s -w '%{http_code}' -o got.bin http://{host}:{port}/blob.bin")
            result = subprocess.run([*SHELL, "pam", "tunnel", "start", "web", "--run", command], cwd=tmp_path,
                                    env=_env(gw, tmp_path), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("200")
        assert hashlib.sha256((tmp_path / "got.bin").read_bytes()).digest() == hashlib.sha256(blob).digest()
    finally:
        server.shutdown()
        server.server_close()
