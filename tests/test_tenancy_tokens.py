"""A gateway token that is also a user token is refused at start (one line, naming both, quoting
neither), by `pam-gateway serve` and `pam-gateway router` alike; and should a router be given
such settings anyway, that token is never accepted as the user."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from gateway_support import RouterClient, make_config, run

from commander_pam_plugin.gateway.config import ConfigError, GatewayIdentity, config_from_dict
from commander_pam_plugin.gateway.router import Router


def _toml(data: dict) -> str:
    users = "".join(f'[[users]]\nname = "{u["name"]}"\ntoken = "{u["token"]}"\n\n' for u in data["users"])
    gateways = "".join(f'[[gateways]]\nname = "{g["name"]}"\ntoken = "{g["token"]}"\n\n' for g in data["gateways"])
    gateway = data.get("gateway")
    own = f'[gateway]\nname = "{gateway["name"]}"\ntoken = "{gateway["token"]}"\n' if gateway else ""
    return f'[router]\nlisten = "127.0.0.1:0"\n\n{users}{gateways}{own}'


def test_a_gateway_token_equal_to_a_user_token_is_refused_in_one_line():
    data = make_config()
    data["gateway"]["token"] = data["users"][1]["token"]
    with pytest.raises(ConfigError) as refused:
        config_from_dict(data, "gw.toml")
    assert str(refused.value) == ("gw.toml: gateways: gateway 'gw-test' has the same token as user 'bob'; "
                                  "give every gateway and user a token of its own")
    data = make_config()
    data["gateways"][0]["token"] = data["users"][2]["token"]
    with pytest.raises(ConfigError, match="gateway 'offline-gw' has the same token as user 'carol'"):
        config_from_dict(data, "gw.toml")


@pytest.mark.parametrize("command", ["serve", "router"])
def test_pam_gateway_refuses_to_start_with_a_shared_token(tmp_path, command):
    data = make_config()
    shared = data["users"][0]["token"]
    if command == "serve":
        data["gateway"]["token"] = shared
    else:
        data.pop("gateway")
        data["gateways"][0]["token"] = shared
    path = tmp_path / "shared.toml"
    path.write_text(_toml(data))
    path.chmod(0o600)
    result = subprocess.run([sys.executable, "-m", "commander_pam_plugin.gateway", command, "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "has the same token as user 'alice'" in result.stderr
    assert shared not in result.stderr + result.stdout


def test_a_router_never_takes_a_gateway_token_as_a_users():
    data = make_config()
    settings = config_from_dict(data).router
    shared = data["users"][0]["token"]
    # Settings built without the config check (as an embedding program might): the guard still holds.
    settings = dataclasses.replace(settings, gateways=settings.gateways + (GatewayIdentity("gw-twin", shared),))

    async def main() -> tuple[int, int, dict]:
        router = Router(settings)
        url = await router.start("127.0.0.1", 0)
        try:
            async with RouterClient(url, shared) as twin, RouterClient(url, data["users"][1]["token"]) as bob:
                twin_status, body = await twin.get("/api/v1/resources")
                bob_status, _ = await bob.get("/api/v1/resources")
        finally:
            await router.stop()
        return twin_status, bob_status, body

    twin_status, bob_status, body = run(main())
    assert twin_status == 401 and body["error"]["message"] == "invalid token"
    assert bob_status == 200
