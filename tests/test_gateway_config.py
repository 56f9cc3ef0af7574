"""Gateway config validation and the pam-gateway CLI (init, serve, router + agent apart)."""
from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from gateway_support import make_config, new_token

from commander_pam_plugin.gateway.config import ConfigError, config_from_dict, load_config

WAIT = 20.0


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)  # it holds tokens: pam-gateway refuses it otherwise
    return path


GOOD = f"""
[router]
listen = "127.0.0.1:0"

[[users]]
name = "alice"
token = "{new_token()}"

[gateway]
name = "gw"
token = "{new_token()}"

[[resources]]
name = "web-1"
kind = "ssh"
host = "127.0.0.1"
port = 22
username = "deploy"
password = "hunter2-hunter2"
users = ["alice"]
record = true
"""


def test_a_good_config_loads_and_its_repr_hides_secrets(tmp_path):
    config = load_config(write_toml(tmp_path / "gw.toml", GOOD))
    assert config.router.port == 0 and [u.name for u in config.router.users] == ["alice"]
    assert config.gateway.resource("web-1").allows("alice") and not config.gateway.resource("web-1").allows("bob")
    assert config.gateway.recordings_dir == tmp_path / "recordings"
    assert [g.name for g in config.router.gateways] == ["gw"]
    text = repr(config)
    assert "hunter2" not in text and config.gateway.token not in text and config.router.users[0].token not in text
    assert config.gateway.redact("x hunter2-hunter2 y") == "x *** y"


@pytest.mark.parametrize("change, key", [
    (lambda d: d["users"][0].update(token="short"), "users[0].token"),
    (lambda d: d["resources"].append({"name": "db", "kind": "tcp", "host": "h", "port": "5432"}),
     "resources[0].port"),
    (lambda d: d["resources"].append({"name": "db", "kind": "ftp", "host": "h", "port": 21}), "resources[0].kind"),
    (lambda d: d["resources"].append({"name": "s", "kind": "ssh", "host": "h", "port": 22, "username": "u"}),
     "resources[0].password"),
    (lambda d: d["resources"].append({"name": "s", "kind": "ssh", "host": "h", "port": 22, "username": "u",
                                      "private_key": "/no/such/key"}), "resources[0].private_key"),
    (lambda d: d["resources"].append({"name": "../etc", "kind": "tcp", "host": "h", "port": 1}),
     "resources[0].name"),
    (lambda d: d["gateway"].update(host_addresses=["0.0.0.0"]), "gateway.host_addresses"),
    (lambda d: d["gateway"].update(capabilities=["warp"]), "gateway.capabilities"),
    (lambda d: d["gateway"].update(legacy="yes"), "gateway.legacy"),
    (lambda d: d["gateway"].update(ice_servers=[42]), "gateway.ice_servers"),
    (lambda d: d["router"].update(listen="0.0.0.0:8470"), "router.listen"),
    (lambda d: d["router"].update(listen="localhost"), "router.listen"),
    (lambda d: d["router"].update(rate_limit=0), "router.rate_limit"),
    (lambda d: d.update(resourcs=[]), "resourcs"),
    (lambda d: d["users"].append(dict(d["users"][0])), "users[3].name"),
    # a new name with alice's token: only the token is shared, so only the token rule can refuse it
    (lambda d: d["users"].append({"name": "mallory", "token": d["users"][0]["token"]}), "users"),
])
def test_config_mistakes_are_one_line_naming_the_key(change, key):
    data = make_config()
    change(data)
    with pytest.raises(ConfigError) as error:
        config_from_dict(data, "site.toml")
    message = str(error.value)
    assert message.startswith(f"site.toml: {key}: ") and "\n" not in message
    for user in data["users"]:
        assert user["token"] not in message


GROUP_AND_OTHER_BITS = [0o040, 0o020, 0o010, 0o004, 0o002, 0o001]  # every bit the 0600 rule forbids


@pytest.mark.parametrize("bit", GROUP_AND_OTHER_BITS, ids=lambda bit: f"{0o600 | bit:04o}")
def test_a_config_with_tokens_is_refused_for_any_group_or_other_bit(tmp_path, bit):
    path = write_toml(tmp_path / "gw.toml", GOOD)
    path.chmod(0o600 | bit)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"run: chmod 600 {path}" in str(error.value) and f"mode {0o600 | bit:04o}" in str(error.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_a_config_with_tokens_loads_with_owner_only_bits(tmp_path, mode):
    path = write_toml(tmp_path / "gw.toml", GOOD)
    path.chmod(mode)
    assert [u.name for u in load_config(path).router.users] == ["alice"]


@pytest.mark.parametrize("secret", [
    '[[users]]\nname = "alice"\ntoken = "t"\n',
    '[[gateways]]\nname = "gw"\ntoken = "t"\n',
    '[gateway]\nname = "gw"\ntoken = "t"\n',
    '[[resources]]\nname = "s"\npassword = "p"\n',
    '[[resources]]\nname = "s"\nprivate_key = "-----BEGIN OPENSSH PRIVATE KEY-----"\n',
], ids=["user token", "gateway token in [[gateways]]", "[gateway] token", "ssh password", "inline private key"])
def test_each_kind_of_secret_alone_makes_the_file_private(tmp_path, secret):
    """The privacy check runs before validation, so each secret is tried alone in a minimal file."""
    path = write_toml(tmp_path / "gw.toml", secret)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="run: chmod 600"):
        load_config(path)


def test_a_key_file_path_is_not_itself_a_secret_in_the_config(tmp_path):
    path = write_toml(tmp_path / "gw.toml", '[[resources]]\nname = "s"\nprivate_key = "/etc/keys/s"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError) as error:  # refused later, for what it is, not for its mode
        load_config(path)
    assert "chmod 600" not in str(error.value)


def test_a_config_without_secrets_may_be_shared(tmp_path):
    path = write_toml(tmp_path / "gw.toml", '[router]\nlisten = "127.0.0.1:0"\n')
    path.chmod(0o644)
    assert load_config(path).router.port == 0


def test_a_duplicate_user_and_a_shared_token_say_which_rule(tmp_path):
    twice = make_config()
    twice["users"].append({"name": "alice", "token": new_token()})
    with pytest.raises(ConfigError, match=r"^site\.toml: users\[3\]\.name: user 'alice' is listed twice$"):
        config_from_dict(twice, "site.toml")
    shared = make_config()
    shared["users"].append({"name": "mallory", "token": shared["users"][0]["token"]})
    with pytest.raises(ConfigError, match=r"^site\.toml: users: two users share one token$"):
        config_from_dict(shared, "site.toml")


def test_unparsable_toml_names_the_file(tmp_path):
    path = write_toml(tmp_path / "broken.toml", "[router\nlisten = 1")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(path)


# --- CLI ------------------------------------------------------------------------------------------

def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commander_pam_plugin.gateway", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=WAIT)


class Process:
    """A pam-gateway subprocess whose stderr lines we can wait for (an event, not a sleep)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "commander_pam_plugin.gateway", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_line(self, pattern: str) -> re.Match:
        while True:
            line = self.lines.get(timeout=WAIT)
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT)


def test_help_everywhere():
    for args in ([], ["serve"], ["router"], ["agent"], ["init"]):
        result = cli(*args, "--help")
        assert result.returncode == 0 and "usage: pam-gateway" in result.stdout


def test_init_writes_a_private_config_that_serve_accepts(tmp_path):
    path = tmp_path / "pam-gateway.toml"
    result = cli("init", "--path", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_config(path)
    assert config.router.users[0].token not in result.stdout + result.stderr

    again = cli("init", "--path", str(path))
    assert again.returncode == 1 and "--force" in again.stderr
    assert load_config(path).router.users[0].token == config.router.users[0].token
    os.chmod(path, 0o644)
    assert cli("init", "--path", str(path), "--force").returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fresh = load_config(path)
    assert fresh.router.users[0].token != config.router.users[0].token

    # serve it on a free port instead of the default 8470 (nothing else changes)
    path.write_text(path.read_text().replace('listen = "127.0.0.1:8470"', 'listen = "127.0.0.1:0"'))
    serve = Process("serve", "--config", str(path))
    try:
        url = serve.wait_line(r"router listening on (http://\S+)").group(1)
        serve.wait_line(r"gateway gateway-1 online")
        token = fresh.router.users[0].token
        reply = requests.get(f"{url}/api/v1/gateways/gateway-1", headers={"Authorization": f"Bearer {token}"},
                             timeout=WAIT)
        assert reply.status_code == 200 and reply.json()["online"] is True
    finally:
        assert serve.stop() == 0


def test_router_and_agent_run_apart(tmp_path):
    data_path = write_toml(tmp_path / "gw.toml", GOOD)
    config = load_config(data_path)
    router = Process("router", "--config", str(data_path))
    agent = None
    try:
        url = router.wait_line(r"router listening on (http://\S+)").group(1)
        agent = Process("agent", "--config", str(data_path), "--router", url)
        agent.wait_line(r"gateway gw online")
        token = config.router.users[0].token
        reply = requests.get(f"{url}/api/v1/resources", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT)
        assert reply.json() == {"ok": True, "resources": [{"name": "web-1", "kind": "ssh", "gateway": "gw"}]}
        assert "hunter2" not in reply.text
    finally:
        if agent is not None:
            assert agent.stop() == 0
        assert router.stop() == 0


def test_a_bad_config_is_one_line_and_exit_2(tmp_path):
    path = write_toml(tmp_path / "bad.toml", GOOD.replace("port = 22", 'port = "ssh"'))
    result = cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "bad.toml: resources[0].port: must be an integer" in result.stderr
    missing = cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml: cannot read" in missing.stderr
    no_router = write_toml(tmp_path / "agent.toml", GOOD)
    result = cli("agent", "--config", str(no_router))
    assert result.returncode == 2 and "router_url" in result.stderr
