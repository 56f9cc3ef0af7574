"""The reference shell through its real entry points: main() in-process, the console script, a pty."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

import commander_pam_plugin.plugin
from commander_pam_plugin import shell
from commander_pam_plugin.errors import PamError

TESTS = Path(__file__).parent
FIXTURE = str(TESTS / "plugins" / "fixture_commands.py")
SHELL = str(Path(sys.executable).with_name("commander-shell"))
PAM_COMMANDS = ["pam launch", "pam tunnel start", "pam tunnel list", "pam tunnel stop", "pam resources"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in ("COMMANDER_PLUGINS", "PAM_CONNECT_TIMING", "PAM_DENY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FIXTURE_SHUTDOWN_FILE", str(tmp_path / "shutdown.txt"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = shell.main(["--plugin", FIXTURE, *argv])
    out, err = capsys.readouterr()
    return status, out, err


def shutdowns(tmp_path: Path) -> int:
    marker = tmp_path / "shutdown.txt"
    return marker.read_text().count("shutdown") if marker.exists() else 0


def test_console_script_help_lists_every_command():
    done = subprocess.run([SHELL, "help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    listed = [line.strip().split("  ")[0] for line in done.stdout.splitlines()[1:]]
    for path in PAM_COMMANDS + ["debug", "help"]:
        assert path in listed


@pytest.mark.parametrize("path", PAM_COMMANDS + ["debug", "help"])
def test_every_command_has_help(capsys, path):
    status, out, err = run(capsys, *path.split(), "--help")
    assert (status, err) == (0, "")
    assert out.startswith(f"usage: {path} ")
    assert run(capsys, "help", *path.split()) == (0, out, "")


def test_plugin_is_found_through_its_entry_point():
    pm = shell.load_plugins(environ={})
    assert pm.get_plugin("pam") is commander_pam_plugin.plugin
    assert ("pam", commander_pam_plugin.plugin) in pm.list_name_plugin()


def test_allow_list_selects_entry_points():
    assert shell.load_plugins(environ={"COMMANDER_PLUGINS": ""}).get_plugin("pam") is None
    assert shell.load_plugins(environ={"COMMANDER_PLUGINS": " pam "}).get_plugin("pam") is not None
    with pytest.raises(PamError, match="no installed plugin has that name") as caught:
        shell.load_plugins(environ={"COMMANDER_PLUGINS": "pam,nope"})
    assert caught.value.status == 2


def test_empty_allow_list_leaves_only_host_commands(capsys, monkeypatch):
    monkeypatch.setenv("COMMANDER_PLUGINS", "")
    status, out, _ = run(capsys, "help")
    assert status == 0 and "pam launch" not in out and "demo connect" in out


def test_group_prints_its_sub_commands(capsys):
    status, out, err = run(capsys, "pam", "tunnel")
    assert (status, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["diagnose", "list", "start", "stop"]
    assert run(capsys, "pam", "tunnel", "--help")[1] == out


@pytest.mark.parametrize("argv, expected", [
    (["frobnicate"], "error: unknown command 'frobnicate' (see 'help')"),
    (["pam", "tunnel", "strat"], "error: unknown command 'pam tunnel strat'; did you mean 'pam tunnel start'?"),
    (["help", "pam", "nope"], "error: unknown command 'pam nope'"),
    (["pam", "tunnel", "list", "--bogus"], "error: pam tunnel list: unrecognized arguments: --bogus"),
    (["pam", "tunnel", "start", "db", "--port", "70000"], "error: pam tunnel start: argument --port/-p: port must be 0-65535"),
    (["pam", "tunnel", "start", "db", "--port", "-1"], "error: pam tunnel start: argument --port/-p: port must be 0-65535"),
    (["pam", "tunnel", "start", "db", "--port", "http"], "error: pam tunnel start: argument --port/-p: port must be a number"),
    (["pam", "tunnel", "start", "db", "--host", "0.0.0.0"], "error: pam tunnel start: argument --host/-o: 0.0.0.0 listens on every"),
    (["pam", "tunnel", "stop"], "error: pam tunnel stop: one of the arguments ID --all is required"),
    (["pam", "tunnel", "stop", "t1", "--all"], "error: pam tunnel stop: argument --all: not allowed with argument ID"),
    (["pam", "launch"], "error: pam launch: the following arguments are required: RESOURCE"),
])
def test_usage_errors_are_one_line_and_status_2(capsys, argv, expected):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_top_level_usage_errors(capsys):
    assert shell.main(["--bogus"]) == 2
    assert capsys.readouterr().err.startswith("error: commander-shell: unrecognized arguments: --bogus")
    assert shell.main(["-c", "help", "help"]) == 2
    assert capsys.readouterr().err == "error: give either -c COMMAND or command words, not both\n"
    assert shell.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: commander-shell")


def test_pam_error_prints_its_message_and_status(capsys, tmp_path):
    assert run(capsys, "demo", "fail", "--status", "3") == (3, "", "error: it failed\n")
    assert shutdowns(tmp_path) == 1


def test_unexpected_exception_is_one_line_with_traceback_only_at_debug(capsys, tmp_path):
    status, _, err = run(capsys, "demo", "crash")
    assert status == 1
    assert err == ("error: unexpected RuntimeError in 'demo crash': boom "
                   "(turn on 'debug' to see the traceback)\n")
    status, out, err = run(capsys, "-c", "debug", "-c", "demo crash")
    assert status == 1 and "console logging: DEBUG" in out
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert shutdowns(tmp_path) == 2


def test_interrupted_one_shot_command_exits_130(capsys, tmp_path):
    assert run(capsys, "demo", "interrupt") == (130, "", "interrupted\n")
    assert shutdowns(tmp_path) == 1


def test_dash_c_runs_in_order_and_stops_at_first_failure(capsys):
    status, out, err = run(capsys, "-c", "demo mode", "-c", "demo fail --status 4", "-c", "demo mode")
    assert (status, out, err) == (4, "interactive=False\n", "error: it failed\n")
    assert run(capsys, "-c", 'demo connect "unbalanced')[0] == 2
    assert run(capsys, "-c", "exit", "-c", "demo mode") == (0, "", "")


def test_debug_toggles_console_and_main_restores_logging(capsys):
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    status, out, _ = run(capsys, "-c", "debug", "-c", "debug")
    assert status == 0
    assert out == "console logging: DEBUG\nconsole logging: INFO\n"
    assert (root.level, root.handlers) == (level, handlers)


def test_debug_file_that_cannot_be_opened(capsys, tmp_path):
    status, _, err = run(capsys, "debug", f"--file={tmp_path}/missing-dir/debug.log")
    assert status == 1 and err.startswith("error: cannot open debug file") and err.count("\n") == 1


@pytest.mark.parametrize("source, expected", [
    (None, "not a readable Python file"),
    ("def broken(:\n", "SyntaxError"),
    ("from commander_pam_plugin.hookspecs import hookimpl\n"
     "@hookimpl\ndef commander_no_such_hook():\n    pass\n", "unknown hook 'commander_no_such_hook'"),
    ("from commander_pam_plugin.hookspecs import hookimpl\n"
     "@hookimpl\ndef commander_register_commands(registry):\n    registry.add('help', print)\n",
     "plugin start-up failed: ValueError: command 'help' is registered twice"),
])
def test_bad_plugin_file_is_one_line_and_status_2(capsys, tmp_path, source, expected):
    path = tmp_path / "plugin.py"
    if source is not None:
        path.write_text(source)
    status = shell.main(["--plugin", str(path), "help"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and expected in err, err


def test_piped_prompt_runs_lines_until_end_of_input(tmp_path):
    done = subprocess.run([SHELL, "--plugin", FIXTURE], input="demo mode\n\nfrobnicate\n",
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "FIXTURE_SHUTDOWN_FILE": str(tmp_path / "shutdown.txt")})
    assert done.stdout == "interactive=False\n"
    assert done.stderr.startswith("error: unknown command 'frobnicate'")
    assert done.returncode == 2  # the last command's status
    assert shutdowns(tmp_path) == 1


def test_sigterm_at_the_prompt_still_shuts_plugins_down(tmp_path):
    proc = subprocess.Popen([SHELL, "--plugin", FIXTURE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "FIXTURE_SHUTDOWN_FILE": str(tmp_path / "shutdown.txt")})
    try:
        proc.stdin.write("demo mode\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "interactive=False\n"  # now blocked reading the next line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert shutdowns(tmp_path) == 1


def test_interactive_prompt_with_history(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "FIXTURE_SHUTDOWN_FILE": str(tmp_path / "shutdown.txt")}
    child = pexpect.spawn(SHELL, ["--plugin", FIXTURE], env=env, encoding="utf-8", timeout=30)
    try:
        child.expect_exact(shell.PROMPT)
        child.sendline("demo mode")
        child.expect_exact("interactive=True")
        child.expect_exact(shell.PROMPT)
        child.sendline("frobnicate")
        child.expect_exact("error: unknown command 'frobnicate'")
        child.expect_exact(shell.PROMPT)
        child.sendline("demo interrupt")  # Ctrl-C inside a command: back to the prompt
        child.expect_exact("interrupted")
        child.expect_exact(shell.PROMPT)
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt
        child.expect_exact(shell.PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130  # the last command's status
    assert "demo mode" in (tmp_path / ".commander_pam_history").read_text()
    assert shutdowns(tmp_path) == 1
