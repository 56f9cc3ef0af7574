"""Keeper Commander's command habits in the reference host: aliases, short options, --timeout,
--format. (The same commands inside the real Keeper: test_keeper_adapter.py.)"""
from __future__ import annotations

import argparse

import pytest

from commander_pam_plugin import shell
from commander_pam_plugin.commands import connect_options, wants_json
from commander_pam_plugin.errors import PamError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in ("COMMANDER_PLUGINS", "PAM_CONNECT_TIMING", "PAM_ROUTER_URL", "PAM_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = shell.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv", [["pam", "t", "l"], ["pam", "tunnel", "l"], ["pam", "t", "list"]])
def test_keeper_aliases_reach_the_same_command(capsys, argv):
    assert run(capsys, *argv) == (0, "no tunnels\n", "")


def test_alias_help_names_the_real_command(capsys):
    status, out, _ = run(capsys, "pam", "l", "--help")
    assert status == 0 and out.startswith("usage: pam launch")
    status, out, _ = run(capsys, "help", "pam", "t", "x")
    assert status == 0 and out.startswith("usage: pam tunnel stop")


def test_list_format_json_beside_json(capsys):
    assert run(capsys, "pam", "tunnel", "list", "--format", "json") == (0, "[]\n", "")
    assert run(capsys, "pam", "tunnel", "list", "--format", "table") == (0, "no tunnels\n", "")
    status, out, err = run(capsys, "pam", "tunnel", "list", "--json", "--format", "table")
    assert status == 2 and "contradict" in err


@pytest.mark.parametrize("value", ["0", "-1", "601", "soon"])
def test_timeout_out_of_range_is_a_usage_error(capsys, value):
    status, _, err = run(capsys, "pam", "launch", "demo", "--timeout", value)
    assert status == 2 and err.startswith("error: pam launch: argument --timeout: timeout must be")


def test_timeout_and_no_trickle_become_the_connect_options():
    config = argparse.Namespace(connect_timeout_s=15.0)
    runtime = argparse.Namespace(config=config)
    given = connect_options(runtime, argparse.Namespace(timeout=42.0, no_trickle_ice=True))
    assert (given.timeout_s, given.trickle) == (42.0, False)
    default = connect_options(runtime, argparse.Namespace(timeout=None, no_trickle_ice=False))
    assert (default.timeout_s, default.trickle) == (15.0, True)
    assert wants_json(argparse.Namespace(json=False, format="json"))
    with pytest.raises(PamError):
        wants_json(argparse.Namespace(json=True, format="table"))


def test_short_options_parse_like_the_long_ones():
    registry = shell.CommandRegistry()
    from commander_pam_plugin import plugin

    plugin.commander_register_commands(registry)
    start = {c.path: c for c in registry.commands}["pam tunnel start"].parser
    args = start.parse_args(["db", "-nti", "-p", "5432", "-o", "127.0.0.2", "-R", "psql", "--timeout", "30"])
    assert (args.no_trickle_ice, args.port, args.host, args.run, args.timeout) == (True, 5432, "127.0.0.2", "psql", 30.0)


def test_registry_refuses_aliases_that_clash():
    registry = shell.CommandRegistry()
    registry.add("pam tunnel start", lambda ctx, args: 0)
    registry.add("pam tunnel stop", lambda ctx, args: 0)
    registry.alias("pam tunnel start", "s")
    with pytest.raises(ValueError):
        registry.alias("pam tunnel stop", "s")  # already start's
    with pytest.raises(ValueError):
        registry.alias("pam tunnel stop", "start")  # already a command
    with pytest.raises(ValueError):
        registry.alias("pam nothing", "n")
    assert registry.aliases_of(("pam", "tunnel", "start")) == ["s"]
