"""The product in the lab: router (pub), coturn (pub), gateway and an echo target (gw), and the
client as a real `pam` shell run inside the client's namespace. Router and gateway run in this
process on loops whose threads live in their namespaces, so tests can read what the router relayed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from commander_pam_plugin.gateway.agent import GatewayAgent
from commander_pam_plugin.gateway.config import config_from_dict
from commander_pam_plugin.gateway.router import Router

from . import coturn
from .certs import TestCA
from .lab import GATEWAY_IP, SERVICE_IP, CLIENT_IP, Lab, NetnsLoop, run_in_netns

ROUTER_PORT = 8443
TESTS = Path(__file__).resolve().parent.parent


class LabStack:
    """Build with the lab's NAT kinds and each side's ICE settings; close() undoes everything."""

    def __init__(self, workdir: Path, *, client_nat: str = "cone", gateway_nat: str = "cone",
                 gateway_ice: Sequence[str] = (), gateway_policy: str = "all", gateway_ice_timeout: float = 8.0,
                 with_turn: bool = True, delay_udp_ms: float | None = None, delay_tcp_ms: float = 0.0,
                 ssh_target: bool = False, ssh_variants: Sequence[dict[str, Any]] = ()) -> None:
        """ssh_target: also a demo SSH server in the gateway's namespace, served as resource 'ssh'
        (and once more per ssh_variants entry: its name and resource settings, e.g. resume_grace_s)."""
        from gateway_support import EchoServer, make_config, ssh_resource

        self.workdir = workdir
        self.lab = Lab(client_nat, gateway_nat, delay_udp_ms=delay_udp_ms, delay_tcp_ms=delay_tcp_ms)
        self.frames: list[tuple[str, str]] = []
        self._loops: list[NetnsLoop] = []
        self.turn: coturn.Coturn | None = None
        self.echo: Any = None
        self.ssh: Any = None
        try:
            self.lab.build()
            self.ca = TestCA(workdir)
            server = self.ca.issue(SERVICE_IP)
            if with_turn:
                self.turn = coturn.Coturn(SERVICE_IP, workdir, cert=server.cert, key=server.key,
                                          prefix=self.lab.exec_prefix("pub"))
            self.echo = run_in_netns(self.lab.ns("gw"), EchoServer)
            resources = [{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": self.echo.port}]
            if ssh_target:
                from commander_pam_plugin.gateway.demo_ssh import DemoSSHServer
                self._ssh_loop = self._loop("gw")
                self.ssh = self._ssh_loop.run(DemoSSHServer().start())
                resources.append(ssh_resource(self.ssh))
                resources.extend(ssh_resource(self.ssh, **variant) for variant in ssh_variants)
            data = make_config(resources,
                               router={"tls_cert": str(server.cert), "tls_key": str(server.key)},
                               host_addresses=[GATEWAY_IP], ice_servers=[self.ice(s) for s in gateway_ice],
                               ice_transport_policy=gateway_policy, ice_timeout=gateway_ice_timeout,
                               router_ca_file=str(self.ca.ca_file))
            self.config = config_from_dict(data)
            pub = self._loop("pub")
            self.router = Router(self.config.router)
            self.router.observe(lambda gateway, direction, frame: self.frames.append((direction, frame)))
            self.router_url = pub.run(self.router.start(SERVICE_IP, ROUTER_PORT))
            gw = self._loop("gw")
            self.agent = GatewayAgent(self.config.gateway, self.router_url)

            async def start_agent() -> None:
                import asyncio
                self._agent_task = asyncio.ensure_future(self.agent.run())
                await asyncio.wait_for(self.agent.online.wait(), 20)
            gw.run(start_agent())
        except BaseException:
            self.close()
            raise

    def _loop(self, role: str) -> NetnsLoop:
        loop = NetnsLoop(self.lab.ns(role))
        self._loops.append(loop)
        return loop

    def ice(self, name: str) -> Any:
        """An ICE server entry by short name: 'stun', 'turn-udp', 'turn-tcp', 'turns', 'dead-stun'."""
        if name == "dead-stun":
            return f"stun:{SERVICE_IP}:3999"  # nobody listens: coturn's namespace answers nothing there
        assert self.turn is not None, "this lab has no coturn"
        return {"stun": self.turn.stun_url(), "turn-udp": self.turn.turn("udp"),
                "turn-tcp": self.turn.turn("tcp"), "turns": self.turn.turns()}[name]

    def user_token(self, name: str = "alice") -> str:
        return next(u.token for u in self.config.router.users if u.name == name)

    def client_config(self, *, ice: Sequence[str] = (), policy: str = "all", timeout_s: float = 15.0) -> Path:
        """A private client TOML for the shell in the client's namespace."""
        addresses = [] if policy == "relay" else [CLIENT_IP]
        data = {"router_url": self.router_url, "token": self.user_token(), "ca_file": str(self.ca.ca_file),
                "ice_servers": [self.ice(s) for s in ice], "host_addresses": addresses,
                "ice_transport_policy": policy, "connect_timeout_s": timeout_s}
        path = self.workdir / f"client-{len(list(self.workdir.glob('client-*.toml')))}.toml"
        path.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in data.items()))
        path.chmod(0o600)
        return path

    def client(self, config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """`pam ARGS...` (the one-shot shell) inside the client's namespace."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
        env["PAM_CONFIG"] = str(config)
        command = [*self.lab.exec_prefix("cli"), sys.executable, "-m", "commander_pam_plugin.shell", "pam", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    def echo_check_command(self, mib: int) -> str:
        return f"{sys.executable} {TESTS / 'tools' / 'echo_check.py'} {{port}} {mib}"

    def relayed_candidate_types(self) -> dict[str, list[str]]:
        """Candidate types in every frame the router relayed: 'out' to the gateway, 'in' from it."""
        import re

        pattern = re.compile(r"candidate:\S+ \d+ \S+ \d+ \S+ \d+ typ (\w+)")
        return {d: [t for direction, frame in self.frames if direction == d for t in pattern.findall(frame)]
                for d in ("in", "out")}

    def close(self) -> None:
        for loop in reversed(self._loops):
            try:
                if self.ssh is not None and loop is self._ssh_loop:
                    loop.run(_close(self.ssh), 15)
                if loop.netns.endswith("-gw") and hasattr(self, "agent"):
                    loop.run(self.agent.stop(), 15)
                if loop.netns.endswith("-pub") and hasattr(self, "router"):
                    loop.run(self.router.stop(), 15)
            except Exception:
                pass
            loop.stop()
        self._loops.clear()
        if self.echo is not None:
            self.echo.close()
        if self.turn is not None:
            self.turn.close()
        self.lab.close()

    def __enter__(self) -> "LabStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _close(server: Any) -> None:
    server.close()  # on the loop that serves it


def _toml(value: Any) -> str:
    """A TOML value: strings, numbers, booleans, lists, and inline tables of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
