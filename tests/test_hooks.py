"""The hook contract and the example plugins in hooks/, loaded the way a user loads them (--plugin)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest

from commander_pam_plugin import shell
from commander_pam_plugin.errors import PamError

ROOT = Path(__file__).parent.parent
FIXTURE = str(ROOT / "tests" / "plugins" / "fixture_commands.py")
TIMING_JSONL = str(ROOT / "hooks" / "timing_jsonl.py")
APPROVAL = str(ROOT / "hooks" / "approval_prompt.py")
CANDIDATES = str(ROOT / "hooks" / "candidate_policy.py")
SHELL = str(Path(sys.executable).with_name("commander-shell"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("COMMANDER_PLUGINS", "PAM_CONNECT_TIMING", "PAM_DENY", "PAM_APPROVE_PROMPT",
                 "PAM_ICE_ALLOW", "PAM_TIMING_JSONL"):
        monkeypatch.delenv(name, raising=False)


def test_decision_hooks_are_firstresult():
    hook = shell.load_plugins(environ={"COMMANDER_PLUGINS": ""}).hook
    firstresult = {name for name in dir(hook) if not name.startswith("_")
                   and getattr(hook, name).spec.opts["firstresult"]}
    assert firstresult == {"pam_before_connect", "pam_ice_host_addresses", "pam_resolve_resource"}


def test_timing_jsonl_plugin_receives_structured_events(monkeypatch, tmp_path):
    out = tmp_path / "timing.jsonl"
    monkeypatch.setenv("PAM_TIMING_JSONL", str(out))
    assert shell.main(["--plugin", FIXTURE, "--plugin", TIMING_JSONL, "demo", "connect", "web-1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["label"], r["phase"], r["summary"]) for r in records] == [
        ("pam-launch:webrtc-tunnel", "offer_sent", False),
        ("pam-launch:webrtc-tunnel", "data_channel_open", False),
        ("pam-launch:total", "ready_for_prompt", True),
    ]
    for record in records:
        assert set(record) == {"label", "phase", "step_ms", "total_ms", "summary", "time"}
        assert 0 <= record["step_ms"] <= record["total_ms"]


@pytest.mark.parametrize("command", [["pam", "launch"], ["pam", "tunnel", "start"]])
def test_veto_stops_a_connect_command_with_its_reason(capsys, monkeypatch, command):
    monkeypatch.setenv("PAM_DENY", "prod-db, x")
    status = shell.main(["--plugin", APPROVAL, *command, "x"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err == "error: connection to x refused by policy: x is listed in PAM_DENY\n"


def test_approval_prompt_asks_on_a_terminal(tmp_path):
    env = {**os.environ, "PAM_APPROVE_PROMPT": "1", "HOME": str(tmp_path)}
    child = pexpect.spawn(SHELL, ["--plugin", APPROVAL, "pam", "launch", "web-1"], env=env,
                          encoding="utf-8", timeout=30)
    try:
        child.expect_exact("pam launch web-1: connect? [y/N] ")
        child.sendline("n")
        child.expect_exact("error: connection to web-1 refused by policy: not approved at the prompt")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1


def test_candidate_policy_filters_host_addresses(monkeypatch):
    hook = shell.load_plugins([CANDIDATES], environ={"COMMANDER_PLUGINS": ""}).hook
    addresses = ["127.0.0.1", "127.0.0.2", "10.1.2.3"]
    assert hook.pam_ice_host_addresses(addresses=addresses) is None  # no allow-list: no opinion
    monkeypatch.setenv("PAM_ICE_ALLOW", "127.0.0.2,10.")
    assert hook.pam_ice_host_addresses(addresses=addresses) == ["127.0.0.2", "10.1.2.3"]
    monkeypatch.setenv("PAM_ICE_ALLOW", "192.168.")
    with pytest.raises(PamError, match="matches none of the ICE host addresses"):
        hook.pam_ice_host_addresses(addresses=addresses)
