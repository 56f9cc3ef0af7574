"""Narrow unit tests of governance's parts: the audit file, plugin loading, the policy's edges."""
from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from commander_pam_plugin.gateway.audit import AuditTrail
from commander_pam_plugin.gateway.config import ConfigError, config_from_dict
from commander_pam_plugin.gateway.governance import Governor
from commander_pam_plugin.gateway.plugins import load_plugins
from gateway_support import make_config


def _settings(resources: list[dict], **gateway: object):
    return config_from_dict(make_config(resources, **gateway)).gateway


def test_the_audit_trail_is_private_append_only_rotated_by_size_and_writes_only_named_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    trail = AuditTrail(path, max_bytes=250, keep=2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for n in range(12):
        trail.record("open", user="alice", resource=f"r{n}", password="hunter2-secret", token="tok-secret")
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]  # keep=2: the oldest are gone
    lines = [json.loads(line) for p in sorted(path.parent.iterdir()) for line in p.read_text().splitlines()]
    assert all(set(line) == {"ts", "kind", "user", "resource"} for line in lines)
    assert all(p.stat().st_size <= 250 for p in path.parent.iterdir())
    assert json.loads(path.read_text().splitlines()[-1])["resource"] == "r11"  # the newest, in the live file
    assert len(lines) < 12 and "r0" not in {line["resource"] for line in lines}  # the oldest rotated away
    assert "secret" not in "".join(p.read_text() for p in path.parent.iterdir())
    with pytest.raises(ValueError):
        trail.record("whatever")


def test_a_misspelt_gateway_hook_fails_at_start(tmp_path: Path) -> None:
    plugin = tmp_path / "typo.py"
    plugin.write_text("from commander_pam_plugin.gateway.hookspecs import hookimpl\n\n"
                      "@hookimpl\ndef pam_gateway_decid(request):\n    return None\n")
    with pytest.raises(ConfigError, match="pam_gateway_decid"):
        load_plugins((), [plugin])
    with pytest.raises(ConfigError, match="no installed gateway plugin has that name"):
        load_plugins(("not-installed",), [])


def test_a_failing_policy_plugin_denies_and_a_resume_line_is_written(tmp_path: Path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text("from commander_pam_plugin.gateway.hookspecs import hookimpl\n\n"
                      "@hookimpl\ndef pam_gateway_decide(request):\n    raise RuntimeError('vault down')\n")
    settings = _settings([{"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": 9}],
                         plugin_files=[str(plugin)], audit_log=str(tmp_path / "audit.jsonl"))

    async def scenario() -> list[dict]:
        governor = Governor(settings)
        request = governor.access_request("alice", settings.resource("db"), "conv-1", "tunnel",
                                          {"access": {"reason": "  two\nlines  ", "ticket": 7}})
        assert (request.reason, request.ticket) == ("two lines", None)
        decision = governor.decide(request)
        assert (decision.verdict, decision.reason) == ("deny", "the gateway's access policy failed")
        governor.opened(SimpleNamespace(conversation_id="conv-1"), request)
        assert governor.record_resume("conv-1")["kind"] == "resume"
        assert governor.record_resume("no-such") is None
        return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    lines = asyncio.run(scenario())
    assert [(e["kind"], e.get("verdict")) for e in lines] == [("decision", "deny"), ("open", None), ("resume", None)]


@pytest.mark.parametrize("access, message", [
    ({"aprovers": ["bob"]}, "resources[0].access.aprovers: is not a known setting"),
    ({"approvers": "bob"}, "resources[0].access.approvers: must be a list"),
    ({"max_duration_s": 0}, "resources[0].access.max_duration_s: must be between"),
    ({"credentials": "vault"}, "resources[0].access.credentials: must be 'config' or 'plugin'"),
])
def test_bad_access_rules_are_one_line_naming_the_key(access: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        _settings([{"name": "db", "kind": "tcp", "host": "127.0.0.1", "port": 9, "access": access}])


def test_a_plugin_credential_resource_needs_no_password_in_the_file() -> None:
    ssh = {"name": "box", "kind": "ssh", "host": "127.0.0.1", "port": 22, "username": "u"}
    with pytest.raises(ConfigError, match="needs a password or a private_key"):
        _settings([ssh])
    assert _settings([{**ssh, "access": {"credentials": "plugin"}}]).resource("box").password is None


def test_control_commands_without_a_running_gateway_and_bad_control_requests_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from commander_pam_plugin.gateway.__main__ import main
    from commander_pam_plugin.gateway.control import ControlServer
    from commander_pam_plugin.protocol import ProtocolError

    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\nname = "gw"\ntoken = "{"t" * 24}"\ncontrol_socket = "{tmp_path / "c" / "gw.sock"}"\n')
    config.chmod(0o600)
    assert main(["sessions", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pam-gateway: error: no running gateway answers on "), err

    async def bad_requests() -> list[str]:
        control = ControlServer(tmp_path / "unused.sock", Governor(_settings([])))
        messages = []
        for request in ({"op": "reboot"}, ["sessions"], {"op": "terminate"}, {"op": "approve", "request": "x"},
                        {"op": "terminate", "id": "nope"}):
            try:
                await control.handle(request, "root")
            except ProtocolError as exc:
                messages.append(exc.message)
        return messages
    assert asyncio.run(bad_requests()) == [
        "unknown op; expected one of sessions, pending, terminate, approve, deny",
        "unknown op; expected one of sessions, pending, terminate, approve, deny",
        "terminate needs a session id",
        "approve needs --as APPROVER (a user the resource names as approver)",
        "no live session 'nope'"]


def test_a_control_socket_folder_open_to_others_is_refused_at_start(tmp_path: Path) -> None:
    from commander_pam_plugin.gateway.control import ControlServer

    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)

    async def start() -> None:
        await ControlServer(folder / "gw.sock", Governor(_settings([]))).start()
    with pytest.raises(OSError, match="is open to other users"):
        asyncio.run(start())


@pytest.mark.parametrize("argv, expected", [
    (["terminate", "-dWjI5y", "--reason", "x", "--config", "c"], ["terminate", "--reason", "x", "--config", "c",
                                                                  "--", "-dWjI5y"]),
    (["terminate", "--config=c", "--reason", "-odd reason", "-id"], ["terminate", "--config=c", "--reason",
                                                                     "-odd reason", "--", "-id"]),
    (["approve", "ab12", "--as", "bob", "--config", "c"], ["approve", "--as", "bob", "--config", "c", "--", "ab12"]),
    (["sessions", "--config", "c"], ["sessions", "--config", "c"]),
])
def test_a_session_id_that_starts_with_a_dash_is_still_the_id(argv: list, expected: list) -> None:
    from commander_pam_plugin.gateway.__main__ import _id_last, build_parser

    assert _id_last(argv) == expected
    if argv[0] != "sessions":
        assert build_parser().parse_args(_id_last(argv)).id == expected[-1]
