"""The paths the data-plane benchmarks compare, side by side in one run, all on 127.0.0.1:

- `direct`: straight to the target;
- `ssh -L`: OpenSSH's port forward through a private sshd this module starts (a temporary host
  key, a temporary client key, its own config; Debian's openssh-server);
- `pam stock`: a pam tunnel whose client peer and gateway agent were both built with
  PAM_SCTP_TUNING=0 (aiortc's stock SCTP/DTLS, this issue's starting point);
- `pam tuned`: the same with commander_pam_plugin.sctp_tuning (the default).

Each pam path has its own benchmarks/_stack.Stack (router, gateway agent, targets); a redis
resource is added to each gateway when a redis port is given.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import _stack
from commander_pam_plugin.negotiation import ConnectOptions
from commander_pam_plugin.sctp_tuning import ENV as TUNING_ENV

GATEWAY = "gw-main"


@contextlib.contextmanager
def tuning(value: str) -> Iterator[None]:
    """PAM_SCTP_TUNING=value while peers (and agent processes) are being built."""
    old = os.environ.get(TUNING_ENV)
    os.environ[TUNING_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TUNING_ENV, None)
        else:
            os.environ[TUNING_ENV] = old


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SshForward:
    """A private sshd on 127.0.0.1 and `ssh -N -L` through it to targets on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd) or not shutil.which("ssh"):
            raise RuntimeError("ssh -L needs OpenSSH: apt-get install -y openssh-server")
        self.dir = Path(tempfile.mkdtemp(prefix="ssh-", dir=workdir))
        os.chmod(self.dir, 0o700)
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client.pub").read_text())
        os.chmod(self.dir / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}", f"HostKey {self.dir / 'host'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no",
            "AllowTcpForwarding yes", f"PidFile {self.dir / 'sshd.pid'}", "StrictModes no", ""]))
        self.sshd = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "w"))
        wait_port(self.port)
        self.forwards: list[subprocess.Popen[bytes]] = []

    def forward(self, target_port: int) -> int:
        """A local port that ssh forwards to 127.0.0.1:target_port."""
        local = free_port()
        user = os.environ.get("USER") or "root"
        process = subprocess.Popen(["ssh", "-N", "-T", "-i", str(self.dir / "client"), "-p", str(self.port),
                                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ExitOnForwardFailure=yes",
                                    "-L", f"127.0.0.1:{local}:127.0.0.1:{target_port}", f"{user}@127.0.0.1"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.forwards.append(process)
        wait_port(local)
        return local

    def close(self) -> None:
        for process in [*self.forwards, self.sshd]:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PamPath:
    """One stack (router, gateway agent, targets) and one client tunnel per resource, all built
    with PAM_SCTP_TUNING set to `tuning` ("0" stock, "1" tuned)."""

    def __init__(self, workdir: Path, tuning_value: str, resources: list[str],
                 extra_resources: list[dict[str, Any]]) -> None:
        self.tuning = tuning_value
        self.workdir = workdir / f"pam-{tuning_value}"
        self.workdir.mkdir()
        original = _stack.write_toml

        def with_extra(path: Path, tables: Any) -> Path:  # the extra resources go to the gateway's config
            tables = list(tables)
            if path.name == f"{GATEWAY}.toml":
                tables += [("[[resources]]", resource) for resource in extra_resources]
            return original(path, tables)

        _stack.write_toml = with_extra
        try:
            with tuning(tuning_value):
                self.stack = _stack.Stack(self.workdir, [_stack.GatewaySpec(GATEWAY)], ssh=False).__enter__()
                self.runtime = self.stack.runtime(("127.0.0.1",))
                self.tunnels = {name: _stack.open_tunnel(self.runtime, name, ConnectOptions()) for name in resources}
        finally:
            _stack.write_toml = original
        self.agent = self.stack.agents[GATEWAY]

    def port(self, resource: str) -> int:
        return self.tunnels[resource].port

    def close(self) -> None:
        for tunnel in self.tunnels.values():
            with contextlib.suppress(Exception):
                _stack.close_tunnel(self.runtime, tunnel)
        self.runtime.shutdown()
        self.stack.close()
