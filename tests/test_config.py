"""Client settings: file location, environment precedence, validation, the 0600 rule, a safe repr."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from commander_pam_plugin.config import PamConfig, load_config
from commander_pam_plugin.errors import PamError

TOKEN = "s3cret-token-value"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def fails(environ: dict[str, str], *fragments: str) -> str:
    with pytest.raises(PamError) as caught:
        load_config(environ)
    message = caught.value.message
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_no_file_means_defaults(tmp_path):
    assert load_config({"HOME": str(tmp_path)}) == PamConfig()


def test_default_location_under_home(tmp_path):
    path = write(tmp_path / ".config" / "commander-pam" / "config.toml",
                 f'router_url = "http://127.0.0.1:8470/"\ntoken = "{TOKEN}"\n'
                 'host_addresses = ["127.0.0.2", "127.0.0.1"]\nconnect_timeout_s = 30\n'
                 'ice_servers = ["stun:127.0.0.1:3478"]\n')
    config = load_config({"HOME": str(tmp_path)})
    assert config == PamConfig(router_url="http://127.0.0.1:8470", token=TOKEN,
                               ice_servers=["stun:127.0.0.1:3478"], host_addresses=("127.0.0.2", "127.0.0.1"),
                               connect_timeout_s=30.0, path=str(path))


def test_environment_overrides_the_file_named_by_pam_config(tmp_path):
    path = write(tmp_path / "pam.toml", f'router_url = "http://127.0.0.1:1"\ntoken = "{TOKEN}"\n')
    environ = {"HOME": str(tmp_path / "elsewhere"), "PAM_CONFIG": str(path),
               "PAM_ROUTER_URL": "https://127.0.0.1:2", "PAM_TOKEN": "from-env",
               "PAM_ICE_HOST_ADDRESSES": "127.0.0.3, 127.0.0.4,"}
    config = load_config(environ)
    assert (config.router_url, config.token, config.host_addresses, config.path) == (
        "https://127.0.0.1:2", "from-env", ("127.0.0.3", "127.0.0.4"), str(path))
    assert load_config({**environ, "PAM_TOKEN": ""}).token == TOKEN  # empty means unset


def test_named_file_must_exist(tmp_path):
    fails({"PAM_CONFIG": str(tmp_path / "nope.toml")}, "nope.toml: cannot read")


@pytest.mark.parametrize("text, fragments", [
    ('router_url = "ftp://127.0.0.1"\n', ("router_url", "must be an http:// or https:// URL")),
    ('router_url = "http://"\n', ("router_url", "must be an http:// or https:// URL")),
    ('host_addresses = ["0.0.0.0"]\n', ("host_addresses", "wildcard")),
    ('host_addresses = ["localhost"]\n', ("host_addresses", "not an IP address")),
    ('host_addresses = []\n', ("host_addresses", "at least one")),
    ('host_addresses = "127.0.0.1"\n', ("host_addresses", "must be a list")),
    ("connect_timeout_s = 0\n", ("connect_timeout_s", "must be a number of seconds")),
    ("connect_timeout_s = true\n", ("connect_timeout_s", "must be a number of seconds")),
    ("ice_servers = [{ username = 'u' }]\n", ("ice_servers", "each entry must be")),
    ("routerurl = 'http://127.0.0.1'\n", ("routerurl", "unknown key (known: router_url, token, ice_servers,")),
    ("router_url = \n", ("not valid TOML",)),
    ("token = ''\n", ("token", "non-empty string")),
])
def test_bad_file_values_name_the_file_and_key(tmp_path, text, fragments):
    path = write(tmp_path / "pam.toml", text)
    fails({"PAM_CONFIG": str(path)}, str(path), *fragments)


def test_bad_environment_values_name_the_variable(tmp_path):
    fails({"HOME": str(tmp_path), "PAM_ICE_HOST_ADDRESSES": "127.0.0.1,::"},
          "environment: PAM_ICE_HOST_ADDRESSES", "wildcard")
    fails({"HOME": str(tmp_path), "PAM_ROUTER_URL": "127.0.0.1:8470"},
          "environment: PAM_ROUTER_URL", "http://")


GROUP_AND_OTHER_BITS = [0o040, 0o020, 0o010, 0o004, 0o002, 0o001]  # every bit the 0600 rule forbids


@pytest.mark.parametrize("bit", GROUP_AND_OTHER_BITS, ids=lambda bit: f"{0o600 | bit:04o}")
def test_file_with_a_secret_must_be_private(tmp_path, bit):
    mode = 0o600 | bit
    path = write(tmp_path / "pam.toml", f'token = "{TOKEN}"\n', mode)
    message = fails({"PAM_CONFIG": str(path)}, f"chmod 600 {path}")
    assert TOKEN not in message
    turn = write(tmp_path / "turn.toml",
                 'ice_servers = [{ urls = "turn:127.0.0.1", username = "u", credential = "pw" }]\n', mode)
    fails({"PAM_CONFIG": str(turn)}, "chmod 600")


def test_a_server_url_that_merely_says_credential_is_no_secret(tmp_path):
    shared = write(tmp_path / "shared.toml", 'ice_servers = ["stun:credential.example.org:3478"]\n', 0o644)
    assert load_config({"PAM_CONFIG": str(shared)}).ice_servers


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_private_or_secret_free_files_are_accepted(tmp_path, mode):
    private = write(tmp_path / "private.toml", f'token = "{TOKEN}"\n', mode)  # owner bits are the owner's business
    assert load_config({"PAM_CONFIG": str(private)}).token == TOKEN
    shared = write(tmp_path / "shared.toml", 'router_url = "http://127.0.0.1:8470"\n', 0o644)
    assert load_config({"PAM_CONFIG": str(shared)}).router_url == "http://127.0.0.1:8470"


def test_repr_never_shows_secrets():
    config = PamConfig(router_url="http://127.0.0.1:1", token=TOKEN,
                       ice_servers=[{"urls": "turn:127.0.0.1", "username": "u", "credential": "turn-pw"}])
    for text in (repr(config), str(config), f"{config}"):
        assert TOKEN not in text and "turn-pw" not in text
        assert "token='***'" in text and "'credential': '***'" in text and "http://127.0.0.1:1" in text
    assert "token=None" in repr(PamConfig())
