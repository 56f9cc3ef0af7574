"""Process faults: gateway killed, router restarted, client killed."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from client_support import echo_roundtrip
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.embedded import LoopThread
from commander_pam_plugin.runtime import ResourceRef
from gateway_support import EchoServer, demo_ssh_server, free_port, make_config, ssh_resource
from latency_proxy import LatencyProxy
from .stack import (Gateway, Proc, Row, SHELL, WAIT, client_env, echo_resource, runtime, serve,
                    shell_for, token, wait_until, write_config)


def _launch_cat(env: dict[str, str], resource: str) -> Proc:
    """`pam launch RESOURCE --command cat` in pipe mode (stdin is a pipe), proven live by one echoed line."""
    launch = Proc([*SHELL, "pam", "launch", resource, "--command", "cat"], env=env, stdin=True)
    assert launch.proc.stdin is not None
    launch.proc.stdin.write("alive\n")
    launch.proc.stdin.flush()
    launch.wait_for("^alive$")
    return launch


def gateway_killed(runs: int, folder: Path) -> Row:
    """kill -9 the gateway under a live tunnel and a live launch; both say so; a new tunnel works once it is back."""
    row = Row("fault: gateway killed mid-session", "", runs, "")
    tunnel_s: list[float] = []
    launch_s: list[float] = []
    reasons: set[str] = set()
    with EchoServer() as echo, demo_ssh_server() as ssh:
        # Resume off (grace 0): this row is about the loss being reported at once. With resume on, a
        # launch re-establishes until its gateway answers again, and a restarted one no longer has
        # the session (held sessions live in the gateway process): tests/test_netlab_resume.py.
        config = make_config([echo_resource(echo), ssh_resource(ssh, "ssh", resume_grace_s=0)])
        port = free_port()
        url, alice = f"http://127.0.0.1:{port}", token(config, "alice")
        env = client_env(url, alice, folder)
        for run in range(runs):
            gateway = serve(config, folder, port)
            launch = None
            try:
                with shell_for(url, alice, folder) as shell:
                    status, out, err = shell.run("pam tunnel start echo --json")
                    tunnel_port = json.loads(out)["port"]
                    assert echo_roundtrip(tunnel_port, b"before") == b"before"
                    launch = _launch_cat(env, "ssh")
                    gateway.kill()
                    killed = time.monotonic()
                    noticed = wait_until(lambda: "lost:" in shell.err.getvalue())
                    tunnel_s.append(noticed - killed)
                    launch.proc.wait(WAIT)
                    launch_s.append(launch.lines[-1][0] - killed if launch.lines else WAIT)
                    reasons.add(shell.err.getvalue().strip().splitlines()[-1])
                    reasons.add(launch.text("err").strip().splitlines()[-1])
                    if launch.proc.returncode == 0 or "lost" not in launch.text("err"):
                        row.fail(f"run {run}: launch ended with {launch.proc.returncode}: {launch.text('err')[-200:]}")
                    gateway = serve(config, folder, port)
                    status, out, err = shell.run("pam tunnel start echo --json")
                    if status != 0 or echo_roundtrip(json.loads(out)["port"], b"after") != b"after":
                        row.fail(f"run {run}: no new tunnel once the gateway was back: {err.strip()}")
            except (TimeoutError, AssertionError, KeyError, ValueError) as exc:
                row.fail(f"run {run}: {exc.__class__.__name__}: {str(exc)[:200]}")
            finally:
                gateway.stop()
                if launch is not None:
                    launch.kill()
    row.tried = "kill -9 of `pam-gateway serve` under a live tunnel and a live `pam launch`, then restart it"
    row.survived = (f"tunnel reported it {len(tunnel_s)}/{runs} (max {max(tunnel_s, default=0):.1f} s), launch "
                    f"{len(launch_s)}/{runs} (max {max(launch_s, default=0):.1f} s, non-zero exit); a new "
                    f"`pam tunnel start` worked each time the gateway was back")
    row.figures = {"tunnel_detect_s": tunnel_s, "launch_detect_s": launch_s, "lines": sorted(reasons)}
    return row


def router_restarted(runs: int, folder: Path) -> Row:
    """kill -9 the router (gateway agent apart); the agent redials with backoff; tunnels keep working."""
    row = Row("fault: router restarted", "", runs, "")
    reconnect_s: list[float] = []
    gaps: list[list[float]] = []
    with EchoServer() as echo:
        config = make_config([echo_resource(echo)])
        port = free_port()
        config["router"]["listen"] = f"127.0.0.1:{port}"
        path = write_config(config, folder, "split.toml")
        url, name = f"http://127.0.0.1:{port}", config["gateway"]["name"]
        router = Gateway("router", path)
        router.wait_for("router listening")
        agent = Gateway("agent", path, "--router", url)
        client = runtime(url, token(config, "alice"))
        ref = ResourceRef("echo", name, "tcp")
        try:
            agent.wait_for(f"gateway {name} online at")
            tunnel = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
            for run in range(runs):
                mark = len(agent.lines)
                router.kill()
                agent.wait_for("lost the router link", since=mark)
                router = Gateway("router", path)
                _, _, listening = router.wait_for("router listening")
                index, _, online = agent.wait_for(f"gateway {name} online at", since=mark)
                reconnect_s.append(online - listening)
                gaps.append([round(b - a, 3) for a, b in zip(*(lambda t: (t, t[1:]))(
                    agent.stamps("lost the router link|unreachable|online at", mark)))])
                if echo_roundtrip(tunnel.port, b"old tunnel %d" % run) != b"old tunnel %d" % run:
                    row.fail(f"run {run}: the tunnel opened before the restart stopped passing data")
                fresh = client.start_tunnel(None, ref, "127.0.0.1", 0, trickle=True)
                if echo_roundtrip(fresh.port, b"new tunnel") != b"new tunnel":
                    row.fail(f"run {run}: a tunnel opened after the restart did not pass data")
                client.stop_tunnel(fresh.id)
        except (TimeoutError, PamError, OSError) as exc:
            row.fail(f"{exc.__class__.__name__}: {str(exc)[:200]}")
        finally:
            client.shutdown()
            agent.stop()
            router.stop()
    redials = sorted({len(g) - 1 for g in gaps})
    growing = sum(1 for g in gaps if all(a < b for a, b in zip(g, g[1:])))
    row.tried = "kill -9 of `pam-gateway router` and a restart on the same port, the agent running apart"
    row.survived = (f"the agent redialled by itself {len(reconnect_s)}/{runs} (online {max(reconnect_s, default=0):.2f} s "
                    f"at most after the router was back; {'-'.join(map(str, redials))} redials, gaps growing in "
                    f"{growing}/{len(gaps)} runs); the open tunnel and a new one passed data")
    row.figures = {"reconnect_after_router_ready_s": reconnect_s, "gaps_between_redials_s": gaps}
    return row


def client_killed(runs: int, folder: Path, one_way_s: float = 1.0, ice_timeout: float | None = None) -> Row:
    """kill -9 a `pam tunnel start` client mid-session and mid-negotiation; the gateway frees its peer.

    ice_timeout: the gateway's setting (None: its default, which the full run measures).
    """
    row = Row("fault: client killed", "", runs * 2, "")
    freed: dict[str, list[float]] = {"mid-session": [], "mid-negotiation": []}
    with EchoServer() as echo:
        extra = {} if ice_timeout is None else {"ice_timeout": ice_timeout}
        config = make_config([echo_resource(echo)], **extra)
        port = free_port()
        gateway = serve(config, folder, port)
        proxy_thread = LoopThread("latency-proxy").start()
        proxy = proxy_thread.run(LatencyProxy("127.0.0.1", port, one_way_s).start(), WAIT)
        alice = token(config, "alice")
        try:
            for run in range(runs):
                for phase, url in (("mid-session", f"http://127.0.0.1:{port}"),
                                   ("mid-negotiation", f"http://127.0.0.1:{proxy.port}")):
                    mark = len(gateway.lines)
                    client = Proc([*SHELL, "pam", "tunnel", "start", "echo", "--json"], env=client_env(url, alice, folder))
                    try:
                        _, opened, _ = gateway.wait_for(r"conversation (\S+) \(alice, echo\) opened", since=mark)
                        if phase == "mid-session":
                            _, line, _ = client.wait_for(r'^\{.*"port"')
                            data = b"x" * 4096
                            if echo_roundtrip(json.loads(line.string)["port"], data) != data:
                                row.fail(f"run {run}: the tunnel did not work before the kill")
                        elif any(n == "out" for _, n, _ in client.lines):
                            row.fail(f"run {run}: the client connected before the kill (not mid-negotiation)")
                        client.kill()
                        killed = time.monotonic()
                        cid = re.escape(opened.group(1))
                        _, ended, at = gateway.wait_for(rf"conversation {cid} .* (closed|failed): ", since=mark,
                                                        timeout=WAIT * 2)
                        freed[phase].append(at - killed)
                    except (TimeoutError, ValueError) as exc:
                        row.fail(f"run {run} {phase}: {str(exc)[:200]}")
                    finally:
                        client.kill()
            if gateway.live_sessions():
                row.fail(f"sessions still live at the gateway: {sorted(gateway.live_sessions())}")
        finally:
            proxy_thread.run(proxy.close(), WAIT)
            proxy_thread.stop()
            gateway.stop()
    row.tried = (f"kill -9 of a `pam tunnel start` client mid-session and mid-negotiation (its offer applied, "
                 f"the answer held back {one_way_s:g} s by a latency proxy)")
    row.survived = (f"the gateway freed the peer each time: mid-session max {max(freed['mid-session'], default=0):.1f} s, "
                    f"mid-negotiation max {max(freed['mid-negotiation'], default=0):.1f} s; no session left")
    row.figures = {f"{k}_freed_s": v for k, v in freed.items()}
    return row
