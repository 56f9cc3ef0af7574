"""The host contract through real connects: debug-file timing lines, hook files, vault resolution and
session events, with the real shell, router, gateway and aiortc peers on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, free_port, make_config

ROOT = Path(__file__).parent.parent
SHELL = [sys.executable, "-m", "commander_pam_plugin.shell"]
TIMING_LINE = "pam-tunnel:webrtc-tunnel | "


REFUSED_LINE = "connection refused: "  # the tunnel's one INFO record (tunnel.py), logged per refused connection
# A local client of the tunnel that reads to EOF: the tunnel logs the refusal before it closes us.
READ_TO_EOF = f"{sys.executable} {ROOT / 'tests' / 'tools' / 'read_to_eof.py'} {{port}}"


@pytest.fixture(scope="module")
def gateway():
    with EchoServer() as echo:
        with EmbeddedGateway(make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1", "port": echo.port},
                                          {"name": "closed", "kind": "tcp", "host": "127.0.0.1",
                                           "port": free_port()}])) as gw:
            yield gw


def _run(gateway, tmp_path: Path, *argv: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAM_")}
    env.update(HOME=str(tmp_path), PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"),
               **env_extra)
    return subprocess.run([*SHELL, *argv], env=env, capture_output=True, text=True, timeout=60)


def test_debug_file_with_connect_timing_gets_the_lines_and_no_info_records(gateway, tmp_path: Path) -> None:
    log_file = tmp_path / "debug.log"
    result = _run(gateway, tmp_path, "-c", f"debug --file={log_file}", "-c", "pam tunnel start echo --run true",
                  PAM_CONNECT_TIMING="1")
    assert result.returncode == 0, result.stderr
    text = log_file.read_text()
    assert TIMING_LINE in text and "pam-tunnel:total | ready | " in text
    assert " - DEBUG - commander_pam_plugin.timing - " in text
    assert TIMING_LINE not in result.stdout + result.stderr  # the console stays at INFO


def test_debug_file_leaves_out_the_info_record_the_console_shows(gateway, tmp_path: Path) -> None:
    """A tunnel to a refusing target logs one INFO record: on the console, never in the debug file."""
    log_file = tmp_path / "debug.log"
    result = _run(gateway, tmp_path, "-c", f"debug --file={log_file}", "-c",
                  f"pam tunnel start closed --run '{READ_TO_EOF}'")
    assert result.returncode == 0, result.stderr
    assert REFUSED_LINE in result.stdout + result.stderr  # the command really logged it, at INFO
    text = log_file.read_text()
    assert " - DEBUG - " in text  # the file did receive this run's records
    assert REFUSED_LINE not in text and " - INFO - " not in text  # the host's filter keeps INFO out


def test_no_timing_line_without_the_variable_or_debug(gateway, tmp_path: Path) -> None:
    result = _run(gateway, tmp_path, "pam", "tunnel", "start", "echo", "--run", "true")
    assert result.returncode == 0, result.stderr
    assert TIMING_LINE not in result.stdout + result.stderr


def test_timing_jsonl_hook_file_receives_structured_events(gateway, tmp_path: Path) -> None:
    sink = tmp_path / "timing.jsonl"
    result = _run(gateway, tmp_path, "--plugin", str(ROOT / "hooks" / "timing_jsonl.py"),
                  "pam", "tunnel", "start", "echo", "--run", "true", PAM_TIMING_JSONL=str(sink))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in sink.read_text().splitlines()]
    phases = [(e["label"], e["phase"]) for e in events]
    assert ("pam-tunnel:webrtc-tunnel", "data_channel_open") in phases
    assert ("pam-tunnel:total", "ready") in phases and events[-1]["summary"] is True
    assert all(e["total_ms"] >= 0 and e["step_ms"] >= 0 for e in events)


def test_vault_resolution_and_session_events_reach_plugins(gateway, tmp_path: Path) -> None:
    events_file = tmp_path / "events.jsonl"
    result = _run(gateway, tmp_path, "--plugin", str(ROOT / "tests" / "plugins" / "vault_and_events.py"),
                  "pam", "tunnel", "start", "vault-echo", "--run", "true", PAM_TEST_EVENTS=str(events_file))
    assert result.returncode == 0, result.stderr
    assert "-> echo (via gw-test" in result.stdout  # resolved by the plugin, not the router's list
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["kind"] for e in events] == ["opened", "closed"]
    assert {e["resource"] for e in events} == {"echo"} and events[0]["command"] == "pam tunnel start"


def test_veto_stops_a_real_connect_before_any_signaling(gateway, tmp_path: Path) -> None:
    offers = gateway.router.stats["offer"]
    result = _run(gateway, tmp_path, "--plugin", str(ROOT / "hooks" / "approval_prompt.py"),
                  "pam", "tunnel", "start", "echo", PAM_DENY="echo")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: connection to echo refused by policy")
    assert gateway.router.stats["offer"] == offers
