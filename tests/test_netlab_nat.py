"""Real networks: client and gateway each behind a NAT, router and coturn in between (tests/netlab).

Root only (network namespaces, iptables); every address is in 100.64.0.0/10 inside namespaces
this run creates and deletes. The router speaks HTTPS with a CA made for the run; the client is
the real `pam` shell inside the client's namespace.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from netlab import coturn
from netlab.lab import unavailable_reason
from netlab.stack import LabStack

_reason = unavailable_reason() or (None if coturn.available() else "the network lab needs coturn (turnserver)")
pytestmark = [pytest.mark.netlab, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


def test_host_only_across_nats_fails_within_the_timeout_pointing_at_ice_servers_and_diagnose(tmp_path: Path) -> None:
    with LabStack(tmp_path, gateway_ice_timeout=3.0, with_turn=False) as stack:
        config = stack.client_config(timeout_s=10)
        started = time.monotonic()
        result = stack.client(config, "tunnel", "start", "echo", "--run", stack.echo_check_command(1))
        elapsed = time.monotonic() - started
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr
    assert "configure ice_servers" in error[0] and "pam tunnel diagnose echo" in error[0]
    assert elapsed < 10 + 5  # within the connect timeout (plus the shell's start), never a hang


def test_stun_connects_across_cone_nats(tmp_path: Path) -> None:
    with LabStack(tmp_path, gateway_ice=["stun"]) as stack:
        result = stack.client(stack.client_config(ice=["stun"]), "tunnel", "start", "echo",
                              "--run", stack.echo_check_command(1))
        types = stack.relayed_candidate_types()
    assert result.returncode == 0, result.stderr
    assert "sha256 match" in result.stdout
    assert "srflx" in types["out"] and "srflx" in types["in"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_turn_connects_across_symmetric_nats_with_32_mib_intact_each_way(tmp_path: Path, transport: str) -> None:
    with LabStack(tmp_path, client_nat="symmetric", gateway_nat="symmetric",
                  gateway_ice=["stun", f"turn-{transport}"]) as stack:
        result = stack.client(stack.client_config(ice=["stun", f"turn-{transport}"]), "tunnel", "start", "echo",
                              "--run", stack.echo_check_command(32))
    assert result.returncode == 0, result.stderr
    assert "received 33554432 sha256 match" in result.stdout


def test_turn_over_tls_connects_across_symmetric_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # turns: is verified against the system's CAs; SSL_CERT_FILE names the run's CA for both sides.
    with LabStack(tmp_path, client_nat="symmetric", gateway_nat="symmetric", gateway_ice=["turns"]) as stack:
        monkeypatch.setenv("SSL_CERT_FILE", str(stack.ca.ca_file))
        result = stack.client(stack.client_config(ice=["turns"]), "tunnel", "start", "echo",
                              "--run", stack.echo_check_command(1))
    assert result.returncode == 0, result.stderr
    assert "sha256 match" in result.stdout


def test_stun_alone_does_not_connect_across_symmetric_nats(tmp_path: Path) -> None:
    """The counter-case for the TURN tests: the lab's symmetric NAT really defeats STUN."""
    with LabStack(tmp_path, client_nat="symmetric", gateway_nat="symmetric", gateway_ice=["stun"],
                  gateway_ice_timeout=3.0) as stack:
        result = stack.client(stack.client_config(ice=["stun"], timeout_s=10), "tunnel", "start", "echo",
                              "--run", stack.echo_check_command(1))
    assert result.returncode != 0 and "pam tunnel diagnose echo" in result.stderr


def test_relay_policy_connects_and_the_router_relayed_no_host_or_srflx_candidate(tmp_path: Path) -> None:
    with LabStack(tmp_path, gateway_ice=["stun", "turn-udp"], gateway_policy="relay") as stack:
        result = stack.client(stack.client_config(ice=["stun", "turn-udp"], policy="relay"), "tunnel", "start",
                              "echo", "--run", stack.echo_check_command(1))
        types = stack.relayed_candidate_types()
    assert result.returncode == 0, result.stderr
    assert types["out"] and types["in"], "the router relayed no candidate"
    assert set(types["out"]) == {"relay"} and set(types["in"]) == {"relay"}, types
