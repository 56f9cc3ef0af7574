"""The plugin inside the real Keeper Commander (keepercommander 18.x, its own venv): keeper-pam
one-shot, script files and the interactive `keeper shell` in a pseudo-terminal, against a real
router/gateway on 127.0.0.1. No Keeper login; a guard refuses anything beyond loopback."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

import keeper_support as ks
from commander_pam_plugin.gateway.embedded import EmbeddedGateway
from gateway_support import EchoServer, free_port, make_config

TESTS = Path(__file__).parent
ECHO_CHECK = TESTS / "tools" / "echo_check.py"
FIXTURE = TESTS / "plugins" / "fixture_commands.py"
PROMPT = "Not logged in> "
TIMING_LINE = "pam-tunnel:webrtc-tunnel | "


@pytest.fixture(scope="module", autouse=True)
def keeper_venv() -> Path:
    return ks.ensure_keeper_venv()


@pytest.fixture(scope="module")
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(echo):
    with EmbeddedGateway(make_config([{"name": "echo", "kind": "tcp", "host": "127.0.0.1",
                                       "port": echo.port}])) as gw:
        yield gw


def _env(tmp_path: Path, gateway=None, **extra: str) -> dict[str, str]:
    env = ks.keeper_env(tmp_path, **extra)
    if gateway is not None:
        env.update(PAM_ROUTER_URL=gateway.router_url, PAM_TOKEN=gateway.user_token("alice"))
    return env


def _no_network(tmp_path: Path) -> None:
    assert ks.network_attempts(tmp_path) == []


# One-shot ----------------------------------------------------------------------------------

def test_tunnel_run_carries_checked_data_and_returns_the_commands_status(gateway, tmp_path: Path) -> None:
    check = f"{sys.executable} {ECHO_CHECK} {{port}} 8"
    result = ks.run("keeper-pam", "pam-x", "tunnel", "start", "echo", "-R", f"{check} && exit 3",
                    env=_env(tmp_path, gateway))
    assert "sha256 match" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().endswith("pam-x tunnel start: exit status 3")
    ok = ks.run("keeper-pam", "pam-x", "t", "s", "echo", "--run", check, env=_env(tmp_path, gateway))
    assert ok.returncode == 0 and "sha256 match" in ok.stdout, ok.stderr
    _no_network(tmp_path)


def test_one_shot_run_string_reaches_the_shell_unchanged(gateway, tmp_path: Path) -> None:
    """keeper CMD keeps quoted whitespace and ${VAR}; only Keeper's prompt collapses whitespace."""
    result = ks.run("keeper-pam", "pam-x", "tunnel", "start", "echo", "--run",
                    "printf '[%s]' 'a   b' \"${PAM_TUNNEL_PORT}\"", env=_env(tmp_path, gateway))
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[a   b\]\[\d+\]", result.stdout), result.stdout


@pytest.mark.parametrize("argv, line", [
    (["pam-x", "tunnel", "start", "echo", "--bogus"], "pam-x tunnel start: unrecognized arguments: --bogus"),
    (["pam-x", "t", "s", "echo", "-p", "70000"], "pam-x tunnel start: argument --port/-p: port must be 0-65535"),
    (["pam-x", "tunnel", "strat"], "unknown command 'pam-x tunnel strat'; did you mean 'pam-x tunnel start'?"),
    (["pam-x", "tunnel", "list", "--json", "--format", "table"], "--json and --format table contradict"),
    (["pam-x", "launch", "demo", "--timeout", "0"], "pam-x launch: argument --timeout: timeout must be more"),
])
def test_usage_errors_give_status_2_and_one_line(tmp_path: Path, argv: list[str], line: str) -> None:
    result = ks.run("keeper-pam", *argv, env=_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert line in result.stderr


def test_failed_plugin_commands_keep_their_status_and_say_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "shutdown.txt"
    env = _env(tmp_path, COMMANDER_PLUGIN_PATHS=str(FIXTURE), FIXTURE_SHUTDOWN_FILE=str(marker))
    failed = ks.run("keeper-pam", "demo", "fail", "--status", "4", env=env)
    assert failed.returncode == 4 and failed.stderr.strip() == "demo fail: it failed"
    crashed = ks.run("keeper-pam", "demo", "crash", env=env)
    assert crashed.returncode == 1
    assert crashed.stderr.strip() == "demo crash: unexpected RuntimeError: boom (turn on 'debug' to see the traceback)"
    unknown = ks.run("keeper-pam", "pam-x", "tunnel", "stop", "t9", env=env)
    assert unknown.returncode == 1 and "pam-x tunnel stop: no tunnel 't9'" in unknown.stderr
    assert marker.read_text().count("shutdown") == 3  # commander_shutdown once per run, failed or not


def test_the_group_name_is_a_setting_and_never_replaces_a_keeper_command(tmp_path: Path) -> None:
    renamed = ks.run("keeper-pam", "wpam", "t", "l", env=_env(tmp_path, PAM_KEEPER_GROUP="wpam"))
    assert renamed.returncode == 0 and renamed.stdout.strip() == "no tunnels", renamed.stderr
    clash = ks.run("keeper-pam", "ls", env=_env(tmp_path, PAM_KEEPER_GROUP="ls"))
    assert "not added: Keeper Commander has a command of that name" in clash.stderr
    assert "Email:" in clash.stdout + clash.stderr  # still Keeper's ls, which needs a login
    bad = ks.run("keeper-pam", "--version", env=_env(tmp_path, PAM_KEEPER_GROUP="Bad Name"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: PAM_KEEPER_GROUP='Bad Name'")
    allowed = ks.run("keeper-pam", "pam-x", "t", "l", env=_env(tmp_path, COMMANDER_PLUGINS="pam"))
    assert allowed.returncode == 0 and allowed.stdout.strip() == "no tunnels"
    unknown = ks.run("keeper-pam", "--version", env=_env(tmp_path, COMMANDER_PLUGINS="nosuch"))
    assert unknown.returncode == 2 and "COMMANDER_PLUGINS names 'nosuch'" in unknown.stderr


def test_help_names_the_full_command_path(tmp_path: Path) -> None:
    result = ks.run("keeper-pam", "pam-x", "tunnel", "start", "--help", env=_env(tmp_path))
    assert result.returncode == 0
    assert result.stdout.startswith("usage: pam-x tunnel start [-h]")
    assert "--run CMD, -R CMD" in result.stdout and "--no-trickle-ice, -nti" in result.stdout
    via_help = ks.run("keeper-pam", "help", "pam-x", env=_env(tmp_path))
    assert via_help.returncode == 0 and "tunnel" in via_help.stdout and "launch" in via_help.stdout


def test_keeper_help_and_keepers_own_commands_are_unchanged(tmp_path: Path) -> None:
    env = _env(tmp_path)
    plain, adapted = ks.run("keeper", "--help", env=env), ks.run("keeper-pam", "--help", env=env)
    assert plain.returncode == adapted.returncode == 0
    assert adapted.stdout == plain.stdout and "Usage: keeper" in plain.stdout
    listing = ks.run("keeper-pam", "help", env=env)
    assert "pam-x" in listing.stdout  # listed beside Keeper's own, which are all still there
    for line in ks.run("keeper", "help", env=env).stdout.splitlines():
        assert line in listing.stdout
    table = ks.run("python", "-c", _TABLE_PROBE, env=env)
    assert table.returncode == 0, table.stderr
    before, after, takeover = (json.loads(line) for line in table.stdout.splitlines())
    assert after["keeper"] == before["keeper"]  # every Keeper command: same object type, same login rule
    assert after["pam"] == before["pam"] and after["pam_tunnel"] == before["pam_tunnel"]
    assert {"pam-x launch", "pam-x tunnel start", "pam-x tunnel list", "pam-x tunnel stop",
            "pam-x resources"} <= set(after["added"])
    assert all(path.startswith("pam-x ") for path in after["added"])
    # PAM_KEEPER_TAKEOVER=1: ours replace pam launch / tunnel start|list|stop, Keeper's others stay
    assert set(takeover["pam_tunnel"]) == {"start", "list", "stop", "edit", "diagnose"}
    assert takeover["pam_tunnel"]["edit"] == before["pam_tunnel"]["edit"]
    assert takeover["pam_tunnel"]["start"] == ["PluginCommand", False]
    assert takeover["pam"]["gateway"] == before["pam"]["gateway"]
    assert takeover["pam"]["launch"] == ["PluginCommand", False]


_TABLE_PROBE = """
import json, os, pluggy
from commander_pam_plugin.hosts import keeper as k
from commander_pam_plugin.shell import load_plugins
cli = k.keeper_cli

def shape(table):
    return {name: [type(c).__name__, c.is_authorised()] for name, c in sorted(table.items())}

def snapshot(added=()):
    return {"keeper": shape({n: c for n, c in cli.commands.items() if not n.startswith("pam")}),
            "pam": shape(cli.commands["pam"].subcommands),
            "pam_tunnel": shape(cli.commands["pam"].subcommands["tunnel"].subcommands), "added": list(added)}

print(json.dumps(snapshot()))
host = k.KeeperHost(load_plugins(), k.KeeperSettings())
print(json.dumps(snapshot(host.install())))
host.uninstall()
host = k.KeeperHost(load_plugins(), k.KeeperSettings(takeover=True))
host.install()
print(json.dumps(snapshot()))
"""


def test_a_keeper_command_that_needs_a_login_still_asks_for_one(tmp_path: Path) -> None:
    for program in ("keeper-pam", "keeper"):
        result = ks.run(program, "pam", "tunnel", "list", env=_env(tmp_path))
        assert "Email:" in result.stdout + result.stderr, result.stdout + result.stderr
        assert "no tunnels" not in result.stdout
    taken_over = ks.run("keeper-pam", "pam", "gateway", "list", env=_env(tmp_path, PAM_KEEPER_TAKEOVER="1"))
    assert "Email:" in taken_over.stdout + taken_over.stderr
    ours = ks.run("keeper-pam", "pam", "tunnel", "list", env=_env(tmp_path, PAM_KEEPER_TAKEOVER="1"))
    assert ours.returncode == 0 and ours.stdout.strip() == "no tunnels"
    _no_network(tmp_path)


def test_debug_file_gets_the_timing_lines_and_the_console_does_not(gateway, tmp_path: Path) -> None:
    log_file = tmp_path / "debug.log"
    script = tmp_path / "commands.txt"
    script.write_text(f"debug --file={log_file}\npam-x tunnel start echo --run true\n")
    result = ks.run("keeper-pam", str(script), env=_env(tmp_path, gateway, PAM_CONNECT_TIMING="1"))
    assert result.returncode == 0, result.stderr
    text = log_file.read_text()
    assert TIMING_LINE in text and "pam-tunnel:total | ready | " in text
    assert " - DEBUG - commander_pam_plugin.timing - " in text
    assert TIMING_LINE not in result.stdout + result.stderr
    # Keeper's plain `debug` turns its console to DEBUG: then the plugin's lines show there too
    script.write_text("debug\npam-x tunnel start echo --run true\n")
    shown = ks.run("keeper-pam", str(script), env=_env(tmp_path, gateway, PAM_CONNECT_TIMING="1"))
    assert shown.returncode == 0 and TIMING_LINE in shown.stderr, shown.stderr


# Interactive shell -------------------------------------------------------------------------

def _shell(env: dict[str, str]) -> pexpect.spawn:
    # --proxy to a closed loopback port: the shell's start-up version check cannot leave the machine.
    child = pexpect.spawn(str(ks.BIN / "keeper-pam"), ["--proxy", f"http://127.0.0.1:{free_port()}", "shell"],
                          env=env, encoding="utf-8", timeout=ks.WAIT, cwd=env["HOME"], dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def test_shell_keeps_tunnels_in_the_background_lists_stops_and_closes_them_on_sigterm(gateway, tmp_path: Path,
                                                                                     caplog) -> None:
    marker = tmp_path / "shutdown.txt"
    env = _env(tmp_path, gateway, COMMANDER_PLUGIN_PATHS=str(FIXTURE), FIXTURE_SHUTDOWN_FILE=str(marker))
    caplog.set_level(logging.INFO, logger="commander_pam_plugin.gateway.answerer")  # how each one ended
    child = _shell(env)
    try:
        child.sendline("pam-x t s echo")
        child.expect(r"tunnel (t\d+): 127\.0\.0\.1:(\d+) -> echo")
        first = child.match.group(1)
        child.expect_exact(PROMPT)
        child.sendline("pam-x tunnel start echo -p 0")
        child.expect(r"tunnel (t\d+): 127\.0\.0\.1:(\d+) -> echo")
        child.expect_exact(PROMPT)
        child.sendline("pam-x tunnel list --format json")
        child.expect_exact(PROMPT)
        listing = json.loads(child.before[child.before.index("["):])
        assert [(r["resource"], r["state"]) for r in listing] == [("echo", "up"), ("echo", "up")]
        assert listing[0]["id"] == first
        child.sendline("pam-x t x echo")  # by resource name: both
        child.expect_exact("stopped 2 tunnels")
        child.expect_exact(PROMPT)
        child.sendline("pam-x t s echo")
        child.expect(r"tunnel (t\d+): ")
        child.expect_exact(PROMPT)
        child.sendline("pam-x t l")
        child.expect(r"t\d+\s+echo\s+127\.0\.0\.1:\d+\s+up")
        child.expect_exact(PROMPT)
        assert len(gateway.agent.sessions) == 1
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 128 + signal.SIGTERM
    assert marker.read_text().count("shutdown") == 1
    deadline = time.monotonic() + 10
    while gateway.agent.sessions and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the gateway's state with a bound, not waiting for a race to pass
    assert not gateway.agent.sessions
    ended = [r.getMessage() for r in caplog.records if r.name.endswith("answerer")]
    assert sum("closed: closed by client" in line for line in ended) == 3, ended
    assert not any("lost" in line for line in ended), ended
    _no_network(tmp_path)


def test_launch_demo_runs_a_command_in_a_pseudo_terminal_and_returns_its_status(tmp_path: Path) -> None:
    """No router configured: the embedded default (router, gateway, demo SSH on 127.0.0.1)."""
    env = _env(tmp_path, TERM="xterm-256color")
    script = f"{ks.BIN / 'keeper-pam'} pam-x l demo --command 'test -t 0 && echo on-a-tty; exit 7'; echo EXIT=$?"
    child = pexpect.spawn("/bin/sh", ["-c", script], env=env, encoding="utf-8", timeout=ks.WAIT, cwd=str(tmp_path))
    child.expect_exact("on-a-tty")
    child.expect(r"EXIT=(\d+)")
    assert child.match.group(1) == "7"
    child.expect(pexpect.EOF)
    _no_network(tmp_path)


def test_plain_keeper_loads_the_plugins_only_after_the_hook_is_installed(tmp_path: Path) -> None:
    env = _env(tmp_path)
    before = ks.run("keeper", "pam-x", "tunnel", "list", env=env)
    assert "no tunnels" not in before.stdout  # Keeper alone: unknown command, its help listing
    installed = ks.run("keeper-pam-hook", "install", env=env)
    try:
        assert installed.returncode == 0 and "installed" in installed.stdout
        assert "installed:" in ks.run("keeper-pam-hook", "status", env=env).stdout
        hooked = ks.run("keeper", "pam-x", "tunnel", "list", env=env)
        assert hooked.returncode == 0 and hooked.stdout.strip() == "no tunnels", hooked.stderr
        bad = ks.run("keeper", "pam-x", "tunnel", "list", "--bogus", env=env)
        assert bad.returncode == 2
    finally:
        removed = ks.run("keeper-pam-hook", "uninstall", env=env)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert "no tunnels" not in ks.run("keeper", "pam-x", "tunnel", "list", env=env).stdout
    assert "not installed" in ks.run("keeper-pam-hook", "status", env=env).stdout


def test_sighup_runs_the_plugins_shutdown_too(gateway, tmp_path: Path) -> None:
    marker = tmp_path / "shutdown.txt"
    child = _shell(_env(tmp_path, gateway, COMMANDER_PLUGIN_PATHS=str(FIXTURE), FIXTURE_SHUTDOWN_FILE=str(marker)))
    try:
        child.sendline("demo mode")
        child.expect_exact("interactive=True")
        child.expect_exact(PROMPT)
        # Keeper's prompt collapses runs of whitespace, inside quotes too (docs/KEEPER.md)
        child.sendline("pam-x t s echo --run \"printf '[%s]' 'a   b'\"")
        child.expect(r"\[(a +b)\]")
        assert child.match.group(1) == "a b"
        child.expect_exact(PROMPT)
        child.kill(signal.SIGHUP)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 128 + signal.SIGHUP
    assert marker.read_text().count("shutdown") == 1


def test_a_plugin_failing_at_start_up_is_one_line_and_status_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("from commander_pam_plugin.hookspecs import hookimpl\n\n"
                      "@hookimpl\ndef commander_startup(context):\n    raise RuntimeError('nope')\n")
    result = ks.run("keeper-pam", "pam-x", "t", "l", env=_env(tmp_path, COMMANDER_PLUGIN_PATHS=str(broken)))
    assert result.returncode == 2
    assert result.stderr == "error: plugin start-up failed: RuntimeError: nope\n"


def test_launch_at_keepers_prompt_hands_the_terminal_over_and_back(tmp_path: Path) -> None:
    env = _env(tmp_path, TERM="xterm-256color")
    child = pexpect.spawn(str(ks.BIN / "keeper-pam"), ["--proxy", f"http://127.0.0.1:{free_port()}", "shell"],
                          env=env, encoding="utf-8", timeout=ks.WAIT, cwd=str(tmp_path))
    try:
        child.expect_exact("Not logged in>")  # prompt_toolkit draws the space as a cursor move here
        child.sendline("pam-x l demo")
        child.expect(r"[#$] ")
        child.sendline("echo MARK$((40+2)); exit 5")
        child.expect_exact("MARK42")
        child.expect_exact("pam-x launch: exit status 5")
        child.expect_exact("Not logged in>")  # Keeper's prompt is back after the remote shell ended
        child.sendline("q")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5  # the last command's status, as commander-shell gives it
    _no_network(tmp_path)


def test_a_plugin_warning_before_keeper_sets_up_logging_still_prints(tmp_path: Path) -> None:
    early = tmp_path / "early_plugin.py"
    early.write_text("import logging\nfrom commander_pam_plugin.hookspecs import hookimpl\n\n"
                     "@hookimpl\ndef commander_startup(context):\n"
                     "    logging.getLogger('commander_pam_plugin.early').warning('early warning')\n")
    env = _env(tmp_path, COMMANDER_PLUGIN_PATHS=str(early))
    # The second run: the first one in a fresh HOME has Keeper write a file and log (which sets up
    # Python's default handler); after that, no handler exists until Keeper's main() makes one.
    for _ in range(2):
        result = ks.run("keeper-pam", "pam-x", "t", "l", env=env)
    assert result.returncode == 0 and result.stdout == "no tunnels\n"
    assert result.stderr.startswith("early warning\n"), result.stderr


def test_sigterm_to_a_one_shot_foreground_tunnel_closes_it_cleanly(gateway, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="commander_pam_plugin.gateway.answerer")
    proc = subprocess.Popen([str(ks.BIN / "keeper-pam"), "pam-x", "tunnel", "start", "echo"],
                            env=_env(tmp_path, gateway), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert re.match(r"tunnel t\d+: 127\.0\.0\.1:\d+ -> echo", proc.stdout.readline())
        assert len(gateway.agent.sessions) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=ks.WAIT) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 10
    while gateway.agent.sessions and time.monotonic() < deadline:
        time.sleep(0.05)  # bounded poll of the gateway's state
    ended = [r.getMessage() for r in caplog.records if r.name.endswith("answerer")]
    assert len(ended) == 1 and "closed: closed by client" in ended[0], ended
