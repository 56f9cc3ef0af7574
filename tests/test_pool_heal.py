"""A pool heals a tunnel: two gateway processes serve one resource; SIGKILL the one under a
background tunnel and the agent's healing brings the tunnel back, on the same local port,
through the other gateway of the pool (one router node, no Redis)."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

from agent_support import agent_socket, last_json, run_shell, shell_env  # noqa: F401
from client_support import echo_roundtrip, payload
from commander_pam_plugin.agent import client
from gateway_support import EchoServer, new_token
from scaleout_support import WAIT, RouterNode, write_config

POOL = ("gw-1", "gw-2")


class GatewayAgentProcess:
    """`pam-gateway agent` in its own process, so SIGKILL is a real gateway death."""

    def __init__(self, directory: Path, name: str, token: str, router_url: str, echo_port: int) -> None:
        self.name = name
        path = write_config(directory, f"gateway-{name}", {
            "gateway": {"name": name, "token": token, "host_addresses": ["127.0.0.1"]},
            "resources": [{"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": echo_port}]})
        self.process = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.gateway", "agent",
                                         "--config", str(path), "--router", router_url],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._online = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._online.wait(WAIT * 2):
            self.stop()
            raise RuntimeError(f"gateway {name} did not come online:\n" + "\n".join(self.log))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if f"gateway {self.name} online" in line:
                self._online.set()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait(sock: Path, tunnel_id: str, state: str, timeout: float = 45) -> dict:
    answer = client.request({"op": "wait", "id": tunnel_id, "state": state, "timeout": timeout}, path=sock)
    assert answer["reached"], f"tunnel never reached {state}: {answer['tunnel']}"
    return answer["tunnel"]


def _sha_roundtrip(port: int, seed: int) -> None:
    data = payload(256 * 1024, seed=seed)
    assert hashlib.sha256(echo_roundtrip(port, data)).digest() == hashlib.sha256(data).digest()


def test_a_killed_pool_gateway_heals_the_tunnel_through_the_other(agent_socket: Path, tmp_path: Path) -> None:
    alice = new_token()
    tokens = {name: new_token() for name in POOL}
    router_config = {"users": [{"name": "alice", "token": alice}],
                     "gateways": [{"name": n, "token": t, "resources": ["db"]} for n, t in tokens.items()]}
    with EchoServer() as echo:
        router = RouterNode(tmp_path, "a", router_config, None).start()  # in-memory state: no Redis
        gateways: dict[str, GatewayAgentProcess] = {}
        try:
            for name in POOL:
                gateways[name] = GatewayAgentProcess(tmp_path, name, tokens[name], router.url, echo.port)
            env = shell_env(tmp_path, agent_socket, PAM_ROUTER_URL=router.url, PAM_TOKEN=alice)
            started = run_shell(env, "pam tunnel start db --background --json")
            assert started.returncode == 0, started.stderr
            record = last_json(started.stdout)
            _sha_roundtrip(record["port"], seed=1)
            serving = _wait(agent_socket, record["id"], "up")["gateway"]
            assert serving in POOL, serving
            survivor = next(name for name in POOL if name != serving)

            gateways[serving].kill()  # mid-run, SIGKILL: no goodbye to the router or the peer
            lost = _wait(agent_socket, record["id"], "reconnecting")
            assert lost["reason"] and lost["port"] == record["port"]

            healed = _wait(agent_socket, record["id"], "up")  # by itself: nothing restarted
            assert healed["gateway"] == survivor, healed  # the pool's other member took it
            assert healed["port"] == record["port"] and healed["reason"] == ""
            assert gateways[serving].process.poll() is not None  # the killed one is still dead
            _sha_roundtrip(record["port"], seed=2)  # a new TCP connection on the same local port

            listed = run_shell(env, "pam tunnel list --json")
            assert listed.returncode == 0, listed.stderr
            assert f'"gateway": "{survivor}"' in listed.stdout, listed.stdout
        finally:
            for gateway in gateways.values():
                gateway.stop()
            router.stop()


def test_a_new_session_is_addressed_as_the_tunnel_was_first(mocker) -> None:
    """Narrow: the re-offer after a loss names a gateway only if the first offer did (a tunnel
    resolved to a named gateway stays there; one by resource lets the router pick again)."""
    from commander_pam_plugin.config import PamConfig
    from commander_pam_plugin.errors import PamError
    from commander_pam_plugin.runtime import PamRuntime
    from commander_pam_plugin.tunnel import Tunnel

    runtime = PamRuntime(PamConfig(router_url="http://127.0.0.1:9", token="t"))
    try:
        connect = mocker.patch.object(runtime, "connect", side_effect=PamError("stop here"))
        by_resource = Tunnel("db", "", "127.0.0.1", addressed_gateway="")
        by_name = Tunnel("db", "gw-1", "127.0.0.1", addressed_gateway="gw-1")
        for tunnel in (by_resource, by_name):
            tunnel.gateway = "gw-1"  # learnt from the first offer's reply; that gateway then died
            try:
                runtime.attach_session(None, tunnel)
            except PamError:
                pass
        assert [call.args[1].gateway for call in connect.call_args_list] == [None, "gw-1"]
    finally:
        runtime.shutdown()
