"""Terminal sessions end to end: aiortc client -> router -> gateway -> asyncssh -> a real shell in a PTY."""
from __future__ import annotations

import json
import logging
import stat

import asyncssh
import pytest
from gateway_support import (ClientPeer, RouterClient, connect, demo_ssh_server, make_config, new_conversation_id, run,
                             ssh_resource)

from commander_pam_plugin.gateway.embedded import EmbeddedGateway

USER_KEY = asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="module")
def ssh():
    with demo_ssh_server(authorized_keys=[USER_KEY]) as server:
        yield server


def terminal(command: str | None = None, **fields) -> dict:
    return {"mode": "terminal", "term": "xterm-256color", "cols": 80, "rows": 24, "command": command,
            "pty": True, **fields}


async def resize_and_sync(session, cols: int, rows: int) -> None:
    """Resize, then ping: the control channel is ordered, so the pong means the resize was applied."""
    session.peer.control.send_control("resize", cols=cols, rows=rows)
    session.peer.control.send_control("ping")
    while await session.peer.control.receive() != {"op": "pong"}:
        pass


def test_a_command_runs_in_a_pty_with_the_clients_terminal_and_returns_its_status(ssh):
    with EmbeddedGateway(make_config([ssh_resource(ssh)])) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "ssh", trickle=True,
                                        session=terminal("echo term=$TERM; stty size; exit 3",
                                                         term="vt100", cols=100, rows=30))
                output, end = await session.peer.terminal.read_until("exit")
                assert end == {"op": "exit", "status": 3}
                assert b"term=vt100" in output and b"30 100" in output
                await session.close(c, gw.gateway_name)
                assert gw.agent.sessions == {}
        run(main())


def test_pipe_mode_carries_stdin_and_its_eof(ssh):
    with EmbeddedGateway(make_config([ssh_resource(ssh)])) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "ssh", session=terminal("cat; echo done", pty=False))
                session.peer.terminal.send(b"line one\n")
                session.peer.terminal.send_control("eof")
                output, end = await session.peer.terminal.read_until("exit")
                assert (output, end) == (b"line one\ndone\n", {"op": "exit", "status": 0})
                await session.close(c, gw.gateway_name)
        run(main())


def test_login_shell_follows_window_changes(ssh):
    with EmbeddedGateway(make_config([ssh_resource(ssh)])) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "ssh", session=terminal())
                await resize_and_sync(session, 120, 40)
                session.peer.terminal.send(b"stty size; exit 7\n")
                output, end = await session.peer.terminal.read_until("exit")
                assert end == {"op": "exit", "status": 7}
                assert b"40 120" in output
                await session.close(c, gw.gateway_name)
        run(main())


def test_private_key_auth_and_known_hosts(ssh, tmp_path):
    trusted = tmp_path / "known_hosts"
    trusted.write_text(ssh.known_hosts_line())
    stranger = tmp_path / "other_known_hosts"
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    stranger.write_text(f"[127.0.0.1]:{ssh.port} {other_key}\n")
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(USER_KEY.export_private_key())
    key_file.chmod(0o600)  # pam-gateway refuses a key file others can read, as ssh does
    resources = [ssh_resource(ssh, "by-key", private_key=str(key_file), known_hosts=str(trusted)),
                 ssh_resource(ssh, "inline-key", private_key=USER_KEY.export_private_key().decode(),
                              known_hosts=str(trusted)),
                 ssh_resource(ssh, "untrusted", known_hosts=str(stranger))]
    with EmbeddedGateway(make_config(resources)) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                for name in ("by-key", "inline-key"):
                    session = await connect(c, gw.gateway_name, name, session=terminal("echo key-ok", pty=False))
                    output, end = await session.peer.terminal.read_until("exit")
                    assert (output, end) == (b"key-ok\n", {"op": "exit", "status": 0})
                    await session.close(c, gw.gateway_name)
                session = await connect(c, gw.gateway_name, "untrusted", session=terminal("true"))
                output, end = await session.peer.terminal.read_until("exit")
                assert end["op"] == "error" and "host key of untrusted is not trusted" in end["reason"]
                assert await session.peer.terminal.receive() is None
                await session.close(c, gw.gateway_name)
        run(main())


def test_the_password_never_leaves_the_gateway(ssh, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + ssh.password[::-1]
    resources = [ssh_resource(ssh, "good"), ssh_resource(ssh, "bad", password=wrong)]
    frames: list[str] = []
    with EmbeddedGateway(make_config(resources)) as gw:
        gw.router.observe(lambda _gateway, _direction, frame: frames.append(frame))

        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "good", trickle=True, candidates="batch",
                                        session=terminal("echo fine"))
                output, end = await session.peer.terminal.read_until("exit")
                assert b"fine" in output and end == {"op": "exit", "status": 0}
                await session.close(c, gw.gateway_name)

                session = await connect(c, gw.gateway_name, "bad", session=terminal("echo never"))
                output, end = await session.peer.terminal.read_until("exit")
                assert end["op"] == "error" and "authentication as" in end["reason"] and "bad" in end["reason"]
                assert await session.peer.terminal.receive() is None  # closed after the error
                await session.close(c, gw.gateway_name)
                return c.transcript + [json.dumps(end)]
        seen = run(main())
    assert frames and seen
    for secret in (ssh.password, wrong):
        assert not any(secret in text for text in seen), "password in an HTTP reply or stream message"
        assert not any(secret in frame for frame in frames), "password on the gateway link"
        assert not any(secret in f"{record.getMessage()} {record.args} {record.exc_text}" for record in caplog.records)
    assert any("could not start" in record.getMessage() for record in caplog.records)


def test_sessions_are_recorded_as_asciicast_without_input(ssh, tmp_path):
    recordings = tmp_path / "casts"
    resources = [ssh_resource(ssh, "recorded", record=True)]
    with EmbeddedGateway(make_config(resources, recordings_dir=str(recordings))) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                session = await connect(c, gw.gateway_name, "recorded",
                                        session=terminal("cat >/dev/null; echo visible-output", pty=False))
                session.peer.terminal.send(b"typed-secret\n")
                session.peer.terminal.send_control("eof")
                await session.peer.terminal.read_until("exit")
                await session.close(c, gw.gateway_name)

                session = await connect(c, gw.gateway_name, "recorded", session=terminal("read line", cols=90))
                await resize_and_sync(session, 132, 43)
                session.peer.terminal.send(b"\n")
                _, end = await session.peer.terminal.read_until("exit")
                assert end == {"op": "exit", "status": 0}
                await session.close(c, gw.gateway_name)
                return session.conversation_id
        last = run(main())
    files = sorted(recordings.iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    assert stat.S_IMODE(recordings.stat().st_mode) == 0o700
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.name.startswith("recorded-") and path.suffix == ".cast"
    assert files[1].name.endswith(f"-{last}.cast")
    first = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert first[0]["version"] == 2 and (first[0]["width"], first[0]["height"]) == (80, 24)
    assert "visible-output\n" in "".join(e[2] for e in first[1:] if e[1] == "o")
    assert "typed-secret" not in files[0].read_text()
    second = [json.loads(line) for line in files[1].read_text().splitlines()]
    assert second[0]["width"] == 90
    assert [e[2] for e in second[1:] if e[1] == "r"] == ["132x43"]
    assert all(isinstance(e[0], float) for e in second[1:])


def test_terminal_mode_needs_an_ssh_resource_and_an_allowed_user(ssh):
    resources = [ssh_resource(ssh, "alice-only", users=["alice"]),
                 {"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": ssh.port}]
    with EmbeddedGateway(make_config(resources)) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("bob")) as c:
                sdp = await ClientPeer("terminal").offer()
                status, body = await c.action(gw.gateway_name, new_conversation_id(), "offer",
                                              {"sdp": sdp, "resource": "db", "session": terminal()})
                assert status == 400 and "pam launch opens ssh resources" in body["error"]["message"]
                status, body = await c.action(gw.gateway_name, new_conversation_id(), "offer",
                                              {"sdp": sdp, "resource": "alice-only", "session": terminal()})
                assert status == 403 and "may not use" in body["error"]["message"]
                assert gw.agent.sessions == {}
        run(main())


def test_demo_resource_of_the_embedded_default():
    with EmbeddedGateway(demo=True) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("local")) as c:
                status, body = await c.get("/api/v1/resources")
                assert body["resources"] == [{"name": "demo", "kind": "ssh", "gateway": "local"}]
                session = await connect(c, "local", "demo", session=terminal("exit 5"))
                _, end = await session.peer.terminal.read_until("exit")
                assert end == {"op": "exit", "status": 5}
                await session.close(c, "local")
        run(main())


def test_a_recorded_resource_refuses_to_run_when_it_cannot_record(ssh, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    resources = [ssh_resource(ssh, "recorded", record=True)]
    with EmbeddedGateway(make_config(resources, recordings_dir=str(blocker / "casts"))) as gw:
        async def main():
            async with RouterClient(gw.router_url, gw.user_token("alice")) as c:
                sdp = await ClientPeer("terminal").offer()
                status, body = await c.action(gw.gateway_name, new_conversation_id(), "offer",
                                              {"sdp": sdp, "resource": "recorded", "session": terminal("true")})
                assert status == 503 and "must be recorded" in body["error"]["message"]
                assert gw.agent.sessions == {}
        run(main())
