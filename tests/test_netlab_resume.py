"""`pam launch` through a network cut, in the lab: the real CLI on a real pseudo-terminal in the
client's namespace, router (HTTPS) and coturn in 'pub', gateway and demo SSH server in 'gw'.

The cut drops every UDP packet in the client's namespace (an iptables rule there, unique to this
lab and removed in `finally`); signaling (TCP) still works, as on a Wi-Fi that lost its media
path, or a VPN re-keying. Root only; addresses in 100.64.0.0/10 inside namespaces this run makes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from netlab import coturn
from netlab.lab import CLIENT_IP, Lab, unavailable_reason
from netlab.stack import LabStack

_reason = unavailable_reason() or (None if coturn.available() else "the network lab needs coturn (turnserver)")
pytestmark = [pytest.mark.netlab, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

CUT_S = 8.0
NEW_CLIENT_IP = "100.100.1.3"
MARK = "PAM-RESUME"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabStack]:
    with LabStack(tmp_path_factory.mktemp("lab"), client_nat="none", gateway_nat="none", with_turn=True,
                  ssh_target=True, ssh_variants=[{"name": "ssh-brief", "resume_grace_s": 2}]) as lab_stack:
        yield lab_stack


@contextlib.contextmanager
def udp_cut(lab: Lab) -> Iterator[None]:
    """No UDP in or out of the client's namespace for the block (the rules always go again)."""
    tag = f"pam-resume-{lab.run_id}"
    rules = [["INPUT", "-p", "udp"], ["OUTPUT", "-p", "udp"]]
    added = []
    try:
        for rule in rules:
            subprocess.run([*lab.exec_prefix("cli"), "iptables", "-I", *rule, "-m", "comment", "--comment", tag,
                            "-j", "DROP"], check=True, capture_output=True, timeout=20)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run([*lab.exec_prefix("cli"), "iptables", "-D", *rule, "-m", "comment", "--comment", tag,
                            "-j", "DROP"], capture_output=True, timeout=20)


def _launch(stack: LabStack, config: Path, resource: str, events: Path | None = None,
            options: str = "") -> tuple[pexpect.spawn, io.StringIO]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(PAM_CONFIG=str(config), TERM="xterm-256color")
    plugin = ""
    if events is not None:  # the session-event recorder (pam_session_event, one JSON line each)
        env["PAM_TEST_EVENTS"] = str(events)
        plugin = f"--plugin {TESTS / 'plugins' / 'vault_and_events.py'}"
    script = f"{sys.executable} -m commander_pam_plugin.shell {plugin} pam launch {resource} {options}; echo EXIT=$?"
    child = pexpect.spawn("ip", ["netns", "exec", stack.lab.ns("cli"), "/bin/sh", "-c", script], env=env,
                          dimensions=(30, 160), encoding="utf-8", timeout=60)
    transcript = io.StringIO()
    child.logfile_read = transcript
    return child, transcript


def _shell_pid(child: pexpect.spawn) -> str:
    child.sendline(f"echo {MARK}-$$-$((1+1))")
    child.expect(rf"{MARK}-(\d+)-2\r\n")
    return child.match.group(1)


def _cut_for(stack: LabStack, child: pexpect.spawn, seconds: float) -> None:
    """Cut the media path, see the client say it is re-establishing, keep it cut `seconds` in all."""
    started = time.monotonic()
    with udp_cut(stack.lab):
        child.expect(r"re-establishing\.\.\. \(~\. gives up\)", timeout=seconds + 10)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))  # the outage itself: the stimulus


def test_a_cut_mid_loop_resumes_with_every_line_once_in_the_same_shell(stack: LabStack, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    child, transcript = _launch(stack, stack.client_config(), "ssh", events, "--timing")
    try:
        pid = _shell_pid(child)
        child.sendline("for i in $(seq 1 400); do echo line-$i; sleep 0.01; done; echo LOOP-$((40+2))")
        child.expect(r"line-40\r\n")
        _cut_for(stack, child, CUT_S)
        child.expect(r"LOOP-42\r\n", timeout=60)
        assert _shell_pid(child) == pid  # the same remote shell, not a new login
        child.sendline("exit 7")
        child.expect(r"EXIT=(\d+)")
        status = child.match.group(1)
    finally:
        child.close(force=True)
    text = transcript.getvalue()
    lines = [int(n) for n in re.findall(r"(?<![\w$])line-(\d+)\r\n", text)]
    assert lines == list(range(1, 401)), _differences(lines)
    # byte for byte: the loop's output, with only the client's own status lines in between
    start = re.search(r"[\r\n]line-1\r\n", text)
    end = re.search(r"[\r\n]LOOP-42\r\n", text)
    assert start is not None and end is not None
    loop_output = text[start.start() + 1:end.start() + 1]
    seen = re.sub(r"(?<=\n)connection to ssh [^\r\n]*\r\n", "", loop_output)
    expected = "".join(f"line-{i}\r\n" for i in range(1, 401))
    at = next((i for i, (a, b) in enumerate(zip(seen, expected)) if a != b), min(len(seen), len(expected)))
    assert seen == expected, f"differs at {at}: {seen[max(0, at - 40):at + 80]!r}"
    assert "re-established after" in text
    assert status == "7"
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert kinds == ["opened", "resumed", "closed"], kinds
    assert re.search(r"pam-launch:resume\s+resumed\s+[\d.]+", text), text[-2000:]  # --timing, at the end


def test_tilde_dot_while_away_gives_up_at_once_and_typing_is_dropped_with_a_notice(stack: LabStack) -> None:
    """(The gateway cannot be told over a path that is down: it holds the session until its grace ends.)"""
    child, _ = _launch(stack, stack.client_config(), "ssh")
    try:
        _shell_pid(child)
        with udp_cut(stack.lab):
            child.expect(r"re-establishing", timeout=CUT_S + 10)
            child.send("ls")
            child.expect(r"typing is not sent while the connection is being re-established")
            child.send("\r~.")
            child.expect(r"Connection to remote closed\.")
            child.expect(r"EXIT=(\d+)")
            assert child.match.group(1) == "255"
    finally:
        child.close(force=True)


def test_a_new_local_address_during_the_outage_resumes(stack: LabStack) -> None:
    """Relayed (TURN): the client's candidates come from whatever address it has now."""
    config = stack.client_config(ice=["turn-udp"], policy="relay")
    child, transcript = _launch(stack, config, "ssh")
    cli = stack.lab.exec_prefix("cli")
    try:
        pid = _shell_pid(child)
        with udp_cut(stack.lab):
            child.expect(r"re-establishing", timeout=CUT_S + 10)
            subprocess.run([*cli, "sysctl", "-q", "-w", "net.ipv4.conf.lan0.promote_secondaries=1"], check=True)
            subprocess.run([*cli, "ip", "addr", "add", f"{NEW_CLIENT_IP}/24", "dev", "lan0"], check=True)
            subprocess.run([*cli, "ip", "addr", "del", f"{CLIENT_IP}/24", "dev", "lan0"], check=True)
            subprocess.run([*cli, "ip", "route", "replace", "default", "via", "100.100.1.1"], check=True)
        child.expect(r"re-established after", timeout=60)
        addresses = subprocess.run([*cli, "ip", "-4", "-o", "addr", "show", "dev", "lan0"], capture_output=True,
                                   text=True, check=True).stdout
        assert NEW_CLIENT_IP in addresses and f"{CLIENT_IP}/" not in addresses
        assert _shell_pid(child) == pid
        child.sendline("exit")
        child.expect(r"EXIT=(\d+)")
        assert child.match.group(1) == "0"
    finally:
        child.close(force=True)
        subprocess.run([*cli, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "lan0"], capture_output=True)
        subprocess.run([*cli, "ip", "addr", "del", f"{NEW_CLIENT_IP}/24", "dev", "lan0"], capture_output=True)
        subprocess.run([*cli, "ip", "route", "replace", "default", "via", "100.100.1.1"], capture_output=True)
    assert "Traceback" not in transcript.getvalue(), transcript.getvalue()[-4000:]


def test_after_the_grace_period_the_client_says_the_session_is_gone(stack: LabStack) -> None:
    child, transcript = _launch(stack, stack.client_config(), "ssh-brief")
    try:
        _shell_pid(child)
        with udp_cut(stack.lab):
            child.expect(r"re-establishing", timeout=CUT_S + 10)
            child.expect(r"error: [^\r\n]*(grace period)[^\r\n]*\r\n", timeout=30)
            child.expect(r"EXIT=(\d+)")
            assert child.match.group(1) == "255"
    finally:
        child.close(force=True)
    def brief() -> list[str]:
        return [f"{s.session_id} {s.attached} {s.ended}" for s in stack.agent.launch_sessions
                if s.resource.name == "ssh-brief"]
    deadline = time.monotonic() + 20
    while brief() and time.monotonic() < deadline:  # the gateway's own grace passes too
        time.sleep(0.1)
    assert not brief()


def _differences(lines: list[int]) -> str:
    seen: dict[int, int] = {}
    for n in lines:
        seen[n] = seen.get(n, 0) + 1
    missing = [n for n in range(1, 401) if n not in seen]
    doubled = [n for n, count in seen.items() if count > 1]
    return f"{len(lines)} lines; missing {missing[:20]}; doubled {doubled[:20]}"
