"""`pam tunnel diagnose`: the real shell against a real router and gateway; on loopback (every
machine) and in the network lab (root), one test per verdict case."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commander_pam_plugin import rtc
from commander_pam_plugin.diagnose import Report, verdict
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, free_port, make_config
from netlab import coturn
from netlab.lab import unavailable_reason
from netlab.loopback import StunServer
from netlab.stack import LabStack, _toml

_lab_reason = unavailable_reason() or (None if coturn.available() else "the network lab needs coturn (turnserver)")


def _diagnose(config: dict, tmp_path: Path, prefix: list[str] = ()) -> tuple[int, dict, str]:
    path = tmp_path / "client.toml"
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
    path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env["PAM_CONFIG"] = str(path)
    result = subprocess.run([*prefix, sys.executable, "-m", "commander_pam_plugin.shell", "pam", "tunnel", "diagnose",
                             "echo", "--json"], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stderr
    return result.returncode, json.loads(lines[-1]), result.stdout + result.stderr


def _checks(report: dict) -> dict[str, bool | None]:
    return {c["name"]: c["ok"] for c in report["checks"]}


def test_loopback_connects_directly_and_names_a_dead_stun_server(tmp_path: Path) -> None:
    with EchoServer() as echo, StunServer(answering=False) as dead, EmbeddedGateway(
            make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}])) as gw:
        status, report, _ = _diagnose({"router_url": gw.router_url, "token": gw.user_token("alice"),
                                       "ice_servers": [dead.url]}, tmp_path)
    assert status == 0
    checks = _checks(report)
    assert checks["router"] and checks["token"] and checks["gateway"] and checks["trial connection"]
    assert checks[f"ICE server {dead.url}"] is False
    assert report["selected_pair"] == "host -> host"
    assert report["verdict"].startswith("connected directly")


def test_a_refused_token_is_the_verdict_and_is_never_printed(tmp_path: Path) -> None:
    with EchoServer() as echo, EmbeddedGateway(
            make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}])) as gw:
        status, report, output = _diagnose({"router_url": gw.router_url, "token": "not-a-valid-token-xyz"}, tmp_path)
    assert status == 1
    assert _checks(report)["token"] is False and _checks(report)["trial connection"] is None
    assert report["verdict"] == "the router refused the token"
    assert "not-a-valid-token-xyz" not in output


def test_an_unreachable_router_is_the_verdict(tmp_path: Path) -> None:
    status, report, _ = _diagnose({"router_url": f"http://127.0.0.1:{free_port()}", "token": "t"}, tmp_path)
    assert status == 1 and report["verdict"] == "the router cannot be reached"


@pytest.mark.skipif(not coturn.available(), reason="coturn (turnserver) is not installed")
def test_turn_allocation_is_checked_and_the_credential_never_printed(tmp_path: Path) -> None:
    with EchoServer() as echo, coturn.Coturn("127.0.0.1", tmp_path, port=free_port()) as turn, EmbeddedGateway(
            make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port}])) as gw:
        wrong = dict(turn.turn("udp"), credential="wrong-password-123")
        status, report, output = _diagnose({"router_url": gw.router_url, "token": gw.user_token("alice"),
                                            "ice_servers": [turn.turn("udp"), wrong]}, tmp_path)
    details = [c["detail"] for c in report["checks"] if c["name"].startswith("ICE server turn:")]
    assert any("TURN allocation granted" in d for d in details), report
    assert turn.password not in output and "wrong-password-123" not in output


def test_verdicts_for_reports_that_did_not_connect() -> None:
    def failed(*extra: tuple[str, bool | None, str]) -> Report:
        report = Report("echo")
        for name in ("router", "token", "gateway"):
            report.add(name, True, "ok")
        for item in extra:
            report.add(*item)
        report.add("trial connection", False, "ICE did not connect")
        return report

    stun = rtc.ice_servers_from_config(["stun:127.0.0.1:3478"])
    text, fix = verdict(failed(), [], {"stun": False, "turn": False}, "all")
    assert "no ICE server configured" in text and "STUN" in fix
    text, fix = verdict(failed(("ICE server stun:127.0.0.1:3478", True, "answered")), stun,
                        {"stun": True, "turn": False}, "all")
    assert "symmetric NAT" in text and fix.startswith("configure a TURN server")
    text, _ = verdict(failed(("ICE server stun:127.0.0.1:3478", False, "no answer")), stun,
                      {"stun": False, "turn": False}, "all")
    assert text.startswith("no ICE server answered")


# --- the lab: one test per verdict case -------------------------------------------------------

def _lab_diagnose(stack: LabStack, tmp_path: Path, ice: list[str]) -> tuple[int, dict]:
    config = {"router_url": stack.router_url, "token": stack.user_token(), "ca_file": str(stack.ca.ca_file),
              "ice_servers": [stack.ice(s) for s in ice], "host_addresses": ["100.100.1.2"], "connect_timeout_s": 10}
    status, report, _ = _diagnose(config, tmp_path, stack.lab.exec_prefix("cli"))
    return status, report


@pytest.mark.parametrize("case", ["host-only", "stun-cone", "stun-symmetric", "turn-symmetric"])
@pytest.mark.netlab
@pytest.mark.skipif(_lab_reason is not None, reason=_lab_reason or "")
def test_lab_verdicts(tmp_path: Path, case: str) -> None:
    nat = "symmetric" if case.endswith("symmetric") else "cone"
    ice = {"host-only": [], "stun-cone": ["stun"], "stun-symmetric": ["stun"],
           "turn-symmetric": ["stun", "turn-udp"]}[case]
    with LabStack(tmp_path, client_nat=nat, gateway_nat=nat, gateway_ice=ice, gateway_ice_timeout=3.0) as stack:
        status, report = _lab_diagnose(stack, tmp_path, ice)
    checks = _checks(report)
    assert checks["router"] and checks["token"] and checks["gateway"], report
    if case == "host-only":
        assert status == 1 and "no ICE server configured" in report["verdict"]
    elif case == "stun-cone":
        assert status == 0 and "srflx" in report["local_candidates"]
        assert report["verdict"].startswith("connected across NAT with STUN"), report
    elif case == "stun-symmetric":
        assert status == 1 and "symmetric NAT" in report["verdict"], report
        assert report["fix"].startswith("configure a TURN server")
    else:
        assert status == 0 and report["verdict"].startswith("connected through a TURN relay"), report
