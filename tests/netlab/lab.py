"""Network namespaces with NATs between them: the client behind one NAT, the gateway behind
another, the router and coturn in a 'public' namespace in the middle. Root only.

    cli 100.100.1.2 -- natA (100.100.1.1 | 100.64.1.2) -- pub 100.64.1.1
    gw  100.100.2.2 -- natB (100.100.2.1 | 100.64.2.2) -- pub 100.64.2.1
    pub: services on 100.64.0.1 (lo), default route to a sink namespace that forwards nothing
         (coturn drops a whole allocation on ENETUNREACH; a sink makes unroutable peers silent)

Every address is in 100.64.0.0/10 and lives only inside namespaces this run creates; every
veth is created with both ends already in lab namespaces, so nothing is attached to the host's
own namespace. Names carry a per-run id; close() deletes them all (also after a failure).

NAT kinds: "cone" is MASQUERADE (endpoint-independent mapping; unsolicited WAN input is dropped
in INPUT so that no UNREPLIED conntrack entry can make MASQUERADE remap a port), "symmetric" is
MASQUERADE --random-fully (a new public port per destination).

Threads can join a namespace (setns is per thread on Linux, and threads they start inherit it),
so the router and gateway run in this process (tests read the router's frames) on loops whose
threads live in 'pub' and 'gw'; the client runs as `ip netns exec` subprocesses.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Sequence, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SERVICE_IP = "100.64.0.1"
CLIENT_IP, GATEWAY_IP = "100.100.1.2", "100.100.2.2"
NAT_A_WAN, NAT_B_WAN = "100.64.1.2", "100.64.2.2"
NAT_KINDS = ("none", "cone", "symmetric")


def unavailable_reason() -> str | None:
    """None when a lab can be built here, else the one-line reason to skip."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the network lab needs {tool} (CI installs it in .ci/run)"
    return None


def _sh(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip() or result.returncode}")


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
    finally:
        os.close(fd)


def run_in_netns(name: str, function: Callable[[], T]) -> T:
    """function() on a fresh thread inside `name` (threads it starts stay there too)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(name)
            box["value"] = function()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class NetnsLoop:
    """An asyncio loop on a thread inside a namespace; run(coro) from any thread."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self._entered = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"loop-{netns}", daemon=True)
        self._thread.start()
        self._entered.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            enter_netns(self.netns)
        except BaseException as exc:
            self._error = exc
            self._entered.set()
            return
        self._entered.set()
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            async def leftovers() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            try:
                self.run(leftovers(), 10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class Lab:
    """One lab; `ns(role)` is the namespace name for 'cli', 'natA', 'gw', 'natB', 'pub', 'sink'."""

    client_nat: str = "cone"
    gateway_nat: str = "cone"
    # Delay bridge on the client's uplink (delay.py): one-way ms for UDP (media) and TCP (signaling).
    delay_udp_ms: float | None = None
    delay_tcp_ms: float = 0.0
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"pl{self.run_id}-{role}"

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def _in(self, role: str, *args: str) -> None:
        _sh(*self.exec_prefix(role), *args)

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        # Both ends are created directly inside lab namespaces: nothing touches the host's.
        _sh("ip", "link", "add", a_if, "netns", self.ns(a), "type", "veth", "peer", "name", b_if,
            "netns", self.ns(b))

    def build(self) -> "Lab":
        if self.client_nat not in NAT_KINDS or self.gateway_nat not in NAT_KINDS:
            raise ValueError(f"NAT kinds are {NAT_KINDS}")
        try:
            roles = ["cli", "natA", "gw", "natB", "pub", "sink"] + (["dly"] if self.delay_udp_ms is not None else [])
            for role in roles:
                _sh("ip", "netns", "add", self.ns(role))
                self.created.append(self.ns(role))
                self._in(role, "ip", "link", "set", "lo", "up")
            self._veth("cli", "lan0", "natA", "lan0")
            if self.delay_udp_ms is None:
                self._veth("natA", "wan0", "pub", "a0")
            else:  # natA wan0 -- [ea0 | delay.py | eb0] -- pub a0
                self._veth("natA", "wan0", "dly", "ea0")
                self._veth("dly", "eb0", "pub", "a0")
            self._veth("gw", "lan0", "natB", "lan0")
            self._veth("natB", "wan0", "pub", "b0")
            self._veth("pub", "sink0", "sink", "sink0")
            self._addr("cli", "lan0", f"{CLIENT_IP}/24")
            self._addr("natA", "lan0", "100.100.1.1/24")
            self._addr("natA", "wan0", f"{NAT_A_WAN}/30")
            self._addr("pub", "a0", "100.64.1.1/30")
            self._addr("gw", "lan0", f"{GATEWAY_IP}/24")
            self._addr("natB", "lan0", "100.100.2.1/24")
            self._addr("natB", "wan0", f"{NAT_B_WAN}/30")
            self._addr("pub", "b0", "100.64.2.1/30")
            self._addr("pub", "sink0", "100.64.3.1/30")
            self._addr("sink", "sink0", "100.64.3.2/30")
            self._in("pub", "ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
            self._in("cli", "ip", "route", "add", "default", "via", "100.100.1.1")
            self._in("gw", "ip", "route", "add", "default", "via", "100.100.2.1")
            self._in("natA", "ip", "route", "add", "default", "via", "100.64.1.1")
            self._in("natB", "ip", "route", "add", "default", "via", "100.64.2.1")
            self._in("pub", "ip", "route", "add", "default", "via", "100.64.3.2")
            self._in("pub", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")  # the 'internet' between the NATs
            self._in("sink", "ip", "route", "add", "100.64.0.0/10", "via", "100.64.3.1")
            self._nat("natA", self.client_nat)
            self._nat("natB", self.gateway_nat)
            if self.client_nat == "none" and self.gateway_nat == "none":  # routed: host candidates work
                self._in("pub", "ip", "route", "add", "100.100.1.0/24", "via", NAT_A_WAN)
                self._in("pub", "ip", "route", "add", "100.100.2.0/24", "via", NAT_B_WAN)
            if self.delay_udp_ms is not None:
                self._start_delay()
        except BaseException:
            self.close()
            raise
        return self

    def _start_delay(self) -> None:
        """Frames go through user space as they are: no offloads, so each is a real, checksummed one."""
        for role, dev in (("natA", "wan0"), ("dly", "ea0"), ("dly", "eb0"), ("pub", "a0")):
            subprocess.run([*self.exec_prefix(role), "ethtool", "-K", dev, "tx", "off", "rx", "off",
                            "tso", "off", "gso", "off", "gro", "off"], capture_output=True)
        for dev in ("ea0", "eb0"):
            self._in("dly", "ip", "link", "set", dev, "promisc", "on")
            self._in("dly", "ip", "link", "set", dev, "up")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delay.py")
        import sys
        self.delay_process = subprocess.Popen(
            [*self.exec_prefix("dly"), sys.executable, script, "ea0", "eb0", "--udp-ms", str(self.delay_udp_ms),
             "--tcp-ms", str(self.delay_tcp_ms)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        if self.delay_process.stdout is None or self.delay_process.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay bridge did not start")

    def _addr(self, role: str, dev: str, cidr: str) -> None:
        self._in(role, "ip", "addr", "add", cidr, "dev", dev)
        self._in(role, "ip", "link", "set", dev, "up")

    def _nat(self, role: str, kind: str) -> None:
        """Routing, and NAT of the LAN behind wan0 unless kind is 'none' (then a plain router)."""
        self._in(role, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        if kind == "none":
            return
        masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"]
        if kind == "symmetric":
            masquerade.append("--random-fully")
        self._in(role, *masquerade)
        self._in(role, "iptables", "-A", "INPUT", "-i", "wan0", "-m", "conntrack", "--ctstate",
                 "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self._in(role, "iptables", "-A", "INPUT", "-i", "wan0", "-j", "DROP")
        # Nothing unsolicited from the WAN reaches the LAN either (a NAT, not a router).
        self._in(role, "iptables", "-A", "FORWARD", "-i", "wan0", "-m", "conntrack", "--ctstate",
                 "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self._in(role, "iptables", "-A", "FORWARD", "-i", "wan0", "-j", "DROP")

    def close(self) -> None:
        """Delete every namespace this lab made (their veths and iptables rules go with them)."""
        process = getattr(self, "delay_process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split():
                try:
                    os.kill(int(pid), 9)  # only processes inside this run's own namespace
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.created.clear()

    def __enter__(self) -> "Lab":
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def ping(lab: Lab, role: str, address: str) -> bool:
    result = subprocess.run([*lab.exec_prefix(role), "ping", "-c", "1", "-W", "1", address],
                            capture_output=True)
    return result.returncode == 0


def exec_args(lab: Lab, role: str, args: Sequence[str]) -> list[str]:
    return [*lab.exec_prefix(role), *args]
