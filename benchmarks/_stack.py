"""What every benchmark starts: targets, router and gateway agents as processes, latency proxies, a client.

Layout (all on 127.0.0.1):

    client (this process, the plugin's runtime on its own loop thread)
      --proxy C (one-way D)--> router process <--proxy G (one-way D)-- gateway agent process(es) --> targets

One action round trip (client -> router -> gateway -> router -> client) costs 4 D; media
(ICE/DTLS/SCTP) and the target connections stay on loopback with no added delay. The router
process answers `stats` with its own action counters (benchmarks/router_process.py), so actions
are counted at the router. Secrets (tokens, the SSH password) go only into 0600 config files.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from latency_proxy import LatencyProxy

from commander_pam_plugin import protocol
from commander_pam_plugin.config import PamConfig
from commander_pam_plugin.gateway.embedded import LoopThread
from commander_pam_plugin.negotiation import ConnectOptions, Session
from commander_pam_plugin.runtime import PamRuntime
from commander_pam_plugin.timing import ConnectTiming
from commander_pam_plugin.tunnel import Tunnel

HERE = Path(__file__).resolve().parent
USER = "bench"
START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 20.0


def host_addresses(count: int) -> tuple[str, ...]:
    """127.0.0.1 .. 127.0.0.N: Linux routes all of 127.0.0.0/8 to lo, so each is a real candidate."""
    if not 1 <= count <= 254:
        raise ValueError("--host-addresses must be from 1 to 254")
    return tuple(f"127.0.0.{i}" for i in range(1, count + 1))


def write_toml(path: Path, tables: Iterable[tuple[str, dict[str, Any]]]) -> Path:
    """A private TOML file from (header, table) pairs; "[[x]]" headers repeat. JSON scalars are TOML."""
    lines = []
    for header, table in tables:
        lines.append(header)
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None]
        lines.append("")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines))
    return path


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """median/min/max (and the samples) of a list of figures, rounded for the JSON file."""
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": round(statistics.median(samples), 2), "min": round(min(samples), 2),
            "max": round(max(samples), 2), "n": len(samples), "samples": [round(s, 2) for s in samples]}


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 50 samples is the 48th smallest)."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    """What these figures were measured on."""
    import aioice
    import aiortc

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": model, "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "aiortc": aiortc.__version__, "aioice": aioice.__version__, "uvloop": uv,
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other work on the cores shows here
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat (fields 14 and 15, after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- helper processes ------------------------------------------------------------------------------

class JsonChild:
    """A helper process whose first stdout line is JSON (ports, URL); stdin EOF stops it."""

    def __init__(self, argv: Sequence[str], name: str, log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "w") as stderr:  # its warnings stay out of the report (kept for a failure)
            self.process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True)
        self._lock = threading.Lock()
        self.info = self._read_json(START_TIMEOUT_S)

    def _read_json(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.stop()
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} did not answer (exit status {self.process.poll()})\n{tail}")
        return json.loads(box[0])

    def ask(self, line: str) -> dict[str, Any]:
        """Send one line, read one JSON line back."""
        with self._lock:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            return self._read_json(10.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)


class AgentProcess:
    """`pam-gateway agent` in its own process; started once the router welcomed it (its log says so)."""

    def __init__(self, config: Path, name: str, router_url: str) -> None:
        self.name = name
        self.process = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.gateway", "agent",
                                         "--config", str(config),
                                         "--router", router_url],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._online = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._online.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"gateway {name} did not come online:\n" + "\n".join(self.log))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:  # drained always, so the agent never blocks on its log
            self.log.append(line.rstrip())
            if f"gateway {self.name} online" in line:
                self._online.set()

    def cpu_seconds(self) -> float:
        """User + system CPU time the agent has used so far (every thread)."""
        return process_cpu_seconds(self.process.pid)

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class GatewaySpec:
    """One gateway agent to run: its name and capability override (None: the current version's)."""

    name: str
    capabilities: list[str] | None = None
    suffix: str = ""  # appended to its resource names, so two gateways' resources stay apart


class Stack:
    """Targets, router, latency proxies and gateway agents; a client runtime on demand. Context manager."""

    def __init__(self, workdir: Path, gateways: Sequence[GatewaySpec], *, ssh: bool = True,
                 gateway_addresses: Sequence[str] = ("127.0.0.1",),
                 router_settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.router_settings = dict(router_settings or {})  # e.g. max_conversations_per_user
        self.specs = list(gateways)
        self.ssh = ssh
        self.gateway_addresses = tuple(gateway_addresses)
        self.token = secrets.token_urlsafe(24)
        self.children: list[JsonChild] = []
        self.agents: dict[str, AgentProcess] = {}
        # The standard loop: LatencyProxy's teardown (write_eof on a closed peer) is quiet there.
        self.proxy_loop = LoopThread("bench-proxies").start()
        self.proxies: list[LatencyProxy] = []
        self.router: JsonChild | None = None
        self.tcp_ports: dict[str, int] = {}
        self.client_url = ""

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        tcp = self._child([str(HERE / "tcp_target.py")], "tcp target")
        self.tcp_ports = tcp.info
        ssh = self._child([str(HERE / "ssh_target.py")], "ssh target") if self.ssh else None
        gateway_tokens = {spec.name: secrets.token_urlsafe(24) for spec in self.specs}
        router_config = write_toml(self.workdir / "router.toml", [
            # Benchmarks fire many actions at once (50 tunnels, per-candidate legacy): lift the rate limit.
            ("[router]", {"listen": "127.0.0.1:0", "rate_limit": 10000, "rate_burst": 10000,
                          **self.router_settings}),
            ("[[users]]", {"name": USER, "token": self.token}),
            *(("[[gateways]]", {"name": name, "token": token}) for name, token in gateway_tokens.items())])
        self.router = self._child([str(HERE / "router_process.py"), "--config", str(router_config)], "router")
        router_host, router_port = self.router.info["url"].rsplit("//", 1)[1].rsplit(":", 1)
        client_proxy = self._proxy(router_host, int(router_port))
        gateway_proxy = self._proxy(router_host, int(router_port))
        self.client_url = f"http://127.0.0.1:{client_proxy.port}"
        for spec in self.specs:
            resources = [("[[resources]]", {"name": "echo" + spec.suffix, "kind": "tcp", "host": "127.0.0.1",
                                            "port": tcp.info["echo"]}),
                         ("[[resources]]", {"name": "bulk" + spec.suffix, "kind": "tcp", "host": "127.0.0.1",
                                            "port": tcp.info["bulk"]})]
            if ssh is not None:
                resources.append(("[[resources]]", {
                    "name": "ssh" + spec.suffix, "kind": "ssh", "host": "127.0.0.1", "port": ssh.info["port"],
                    "username": ssh.info["username"], "password": ssh.info["password"],
                    "insecure_skip_host_key_check": True}))
            config = write_toml(self.workdir / f"{spec.name}.toml", [
                ("[[users]]", {"name": USER, "token": self.token}),
                ("[gateway]", {"name": spec.name, "token": gateway_tokens[spec.name],
                               "host_addresses": list(self.gateway_addresses), "capabilities": spec.capabilities,
                               "recordings_dir": str(self.workdir / "recordings"),
                               # its own control socket: stacks side by side in one run (a stock and
                               # a tuned path) name their gateways alike, and one socket per name
                               # is all a machine gets by default
                               "control_socket": str(self.workdir / "control" / f"{spec.name}.sock")}),
                *resources])
            self.agents[spec.name] = AgentProcess(config, spec.name, f"http://127.0.0.1:{gateway_proxy.port}")

    def _child(self, argv: list[str], name: str) -> JsonChild:
        child = JsonChild([sys.executable, *argv], name, self.workdir / f"{name.replace(' ', '-')}.log")
        self.children.append(child)
        return child

    def _proxy(self, host: str, port: int) -> LatencyProxy:
        proxy = self.proxy_loop.run(LatencyProxy(host, port, 0.0).start(), 10)
        self.proxies.append(proxy)
        return proxy

    def set_one_way(self, seconds: float) -> None:
        """The injected one-way delay on both signaling legs; applies to every chunk read from now on."""
        async def apply() -> None:
            for proxy in self.proxies:
                proxy.one_way_s = seconds
        self.proxy_loop.run(apply(), 5)

    def runtime(self, addresses: Sequence[str]) -> PamRuntime:
        """A fresh client runtime (own loop thread, own router session): a freshly started shell."""
        return PamRuntime(PamConfig(router_url=self.client_url, token=self.token, host_addresses=tuple(addresses)))

    def router_stats(self) -> dict[str, Any]:
        assert self.router is not None
        return self.router.ask("stats")

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for child in reversed(self.children):
            child.stop()
        if self.proxies:
            try:
                self.proxy_loop.run(_close_all(self.proxies), 10)
            except Exception:
                pass
        self.proxy_loop.stop()


async def _close_all(proxies: Sequence[LatencyProxy]) -> None:
    for proxy in proxies:
        await proxy.close()


# --- the client side of one connect -------------------------------------------------------------

def refresh_resources(runtime: PamRuntime, max_age_s: float = 30.0) -> None:
    """Keep the runtime's resource list warm (a shell that resolved a moment ago)."""
    runtime.router().resources(max_age_s=max_age_s)


def open_tunnel(runtime: PamRuntime, resource: str, options: ConnectOptions,
                timing: ConnectTiming | None = None) -> Tunnel:
    """`pam tunnel start RESOURCE` as the runtime runs it, with explicit connect options."""
    ref = runtime.resolve(None, resource)
    return runtime.start_tunnel(None, ref, "127.0.0.1", 0, trickle=options.trickle, timing=timing,
                                options=options)


def first_echo(port: int) -> socket.socket:
    """Connect to the tunnel, send one byte, wait for its echo; returns the open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=READY_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"\x01")
    if sock.recv(1) != b"\x01":
        sock.close()
        raise RuntimeError("the tunnel did not echo the first byte")
    return sock


def close_tunnel(runtime: PamRuntime, tunnel: Tunnel) -> None:
    runtime.stop_tunnel(tunnel.id)


def close_all(tunnels: Iterable[tuple[PamRuntime, Tunnel]], runtimes: Iterable[PamRuntime]) -> None:
    """A benchmark's teardown: every tunnel stopped (one that fails does not keep the rest open),
    then every runtime shut down."""
    for runtime, tunnel in tunnels:
        try:
            close_tunnel(runtime, tunnel)
        except Exception:
            pass
    for runtime in runtimes:
        runtime.shutdown()


def open_launch(runtime: PamRuntime, resource: str, options: ConnectOptions,
                timing: ConnectTiming | None = None) -> tuple[Session, float]:
    """`pam launch RESOURCE` up to ready_for_prompt: (session, perf_counter when the first remote byte
    could be on the screen)."""
    ref = runtime.resolve(None, resource)
    first = threading.Event()
    stamp: list[float] = []

    def on_peer(peer: Any) -> None:
        def on_message(message: Any) -> None:
            if isinstance(message, bytes) and not first.is_set():
                stamp.append(time.perf_counter())
                first.set()
        peer.terminal.on("message", on_message)

    request = protocol.SessionRequest(mode="terminal", term="xterm-256color", cols=80, rows=24, pty=True)
    session = runtime.connect(None, ref, request, trickle=options.trickle, timing=timing, options=options,
                              on_peer=on_peer)
    connected = time.perf_counter()
    if not first.wait(READY_TIMEOUT_S):
        session.close()
        raise RuntimeError(f"no output from {resource} within {READY_TIMEOUT_S:g} s")
    # pam launch shows output only once connect() has returned (earlier bytes wait in a buffer):
    # a first byte that beat it is on the screen when connect() returns, not before.
    return session, max(stamp[0], connected)


def emit(result: dict[str, Any], print_report: Callable[[dict[str, Any]], None], json_path: str | None) -> None:
    """Every benchmark's ending: its report, one line per target (met or MISS), the JSON file."""
    print_report(result)
    for name, met in result["targets"].items():
        print(f"  {'met ' if met else 'MISS'} {name}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """name=value in this process's environment for the block (agents started in it inherit it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..count-1) on `count` threads released together; results (or exceptions) in order."""
    results: list[Any] = [None] * count
    gate = threading.Barrier(count)

    def run(index: int) -> None:
        gate.wait()
        try:
            results[index] = work(index)
        except Exception as exc:  # reported by the caller, with the others' results
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
