"""Another local user can never reach the agent: the socket's permissions stop it, and when
they are opened by mistake the peer-credential check still refuses it before reading a byte.
Runs as root: the test creates a throwaway user with useradd and removes it afterwards."""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from agent_support import stop_agent
from commander_pam_plugin.agent import client

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to create another local user")


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    name = f"pamt{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def shared_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A socket path outside pytest's private tmp tree, so that only the agent's own modes guard it."""
    base = Path(tempfile.mkdtemp(prefix="pam-agent-iso-"))
    os.chmod(base, 0o755)
    sock = base / "run" / "agent.sock"
    monkeypatch.setenv("PAM_AGENT_SOCKET", str(sock))
    try:
        yield sock
    finally:
        stop_agent(sock)
        shutil.rmtree(base, ignore_errors=True)


def _connect_as(user: pwd.struct_passwd, path: Path) -> str:
    """In a forked child running as `user`: connect, send a ping, return what happened."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(10)
                    sock.connect(str(path))
                    try:
                        sock.sendall(b'{"op": "list"}\n')
                    except BrokenPipeError:  # the agent refused and closed first: its answer is still to read
                        pass
                    result = "answer " + sock.makefile("rb").readline().decode(errors="replace")
            except OSError as exc:
                result = f"oserror {exc.__class__.__name__}"
            os.write(write_fd, result.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        result = reader.read().decode()
    os.waitpid(pid, 0)
    return result


def test_another_user_cannot_connect_to_the_agent(other_user, shared_socket: Path) -> None:
    assert client.request({"op": "ping"}, start=True)["ok"]
    assert shared_socket.stat().st_mode & 0o777 == 0o600
    assert shared_socket.parent.stat().st_mode & 0o777 == 0o700
    assert _connect_as(other_user, shared_socket) == "oserror PermissionError"


def test_peer_credentials_refuse_another_user_even_on_an_open_socket(other_user, shared_socket: Path) -> None:
    assert client.request({"op": "ping"}, start=True)["ok"]
    os.chmod(shared_socket.parent, 0o755)  # a mistake: the modes no longer protect the agent
    os.chmod(shared_socket, 0o666)
    result = _connect_as(other_user, shared_socket)
    assert result.startswith("answer ") and '"ok":false' in result and "only its own user" in result, result
    assert "tunnels" not in result
    assert client.request({"op": "list"})["tunnels"] == []  # the agent is still there for its user


def test_a_socket_directory_open_to_others_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    monkeypatch.setenv("PAM_AGENT_SOCKET", str(directory / "agent.sock"))
    with pytest.raises(Exception, match="open to other users"):
        client.request({"op": "ping"}, start=True)


def test_a_socket_planted_by_another_user_is_not_talked_to(other_user, shared_socket: Path) -> None:
    directory = shared_socket.parent
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o777)  # a mistake that lets another user plant a socket on the path
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child, as the other user: listen on the agent's path, report what it received
        try:
            os.setgroups([])
            os.setgid(other_user.pw_gid)
            os.setuid(other_user.pw_uid)
            with socket.socket(socket.AF_UNIX) as server:
                server.bind(str(shared_socket))
                server.listen(1)
                os.write(ready_write, b"r")
                server.settimeout(20)
                conn, _ = server.accept()
                conn.settimeout(5)
                try:
                    got = conn.recv(100)
                except OSError:
                    got = b""
                os.write(ready_write, b"got:" + got)
        finally:
            os._exit(0)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"r"
        with pytest.raises(Exception, match="belongs to another user"):
            client.request({"op": "start", "resource": "db"}, start=True)
        with os.fdopen(ready_read, "rb") as reader:
            assert reader.read() == b"got:"  # not one byte of the request reached it
    finally:
        os.waitpid(pid, 0)
        shared_socket.unlink(missing_ok=True)
