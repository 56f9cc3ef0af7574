"""Access control: every way in that must be refused, and private files."""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from client_support import to_toml
from commander_pam_plugin import protocol
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.gateway.embedded import LoopThread
from gateway_support import EchoServer, RouterClient, connect, free_port, make_config
from test_fuzz_validators import real_offer_sdp
from .stack import Row, WAIT, echo_resource, token


def _action_body(kind: str, conversation_id: str | None, data: Any = None) -> bytes:
    body: dict[str, Any] = {"kind": kind, "data": data or {}}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return json.dumps(body).encode()


def _offer(resource: str) -> dict[str, Any]:
    return {"type": "offer", "sdp": real_offer_sdp(), "resource": resource}  # call it off the loop first (cached)


async def _access_attempts(stack: Any, config: dict[str, Any], port: int, row: Row, refused: Counter) -> None:
    """Every way in that must be refused, at the router and (after a router restart) at the gateway."""
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.router import Router

    url, name = stack.router.url, config["gateway"]["name"]
    actions = f"/api/v1/gateways/{name}/actions"

    async def attempt(what: str, client: RouterClient, method: str, path: str, body: bytes | None,
                      expected: int) -> None:
        status, reply, _ = await client.request(method, path, body=body)
        row.times += 1
        if status != expected:
            row.fail(f"{what}: HTTP {status}, expected {expected} ({str(reply)[:120]})")
        else:
            refused[expected] += 1

    async with RouterClient(url, token(config, "bob")) as bob, RouterClient(url, token(config, "alice")) as alice, \
            RouterClient(url, token(config, "carol")) as carol, RouterClient(url, None) as nobody, \
            RouterClient(url, "x" * 43) as stranger:
        session = await connect(bob, name, "echo")
        cid = session.conversation_id
        stream_path = f"/api/v1/conversations/{cid}/stream"
        for what, client, method, path, body, expected in [
            ("another user closes bob's conversation", alice, "POST", actions, _action_body("close", cid), 403),
            ("another user sends candidates into it", alice, "POST", actions,
             _action_body("icecandidate", cid, {"candidates": []}), 403),
            ("another user offers on it", alice, "POST", actions, _action_body("offer", cid, _offer("echo")), 403),
            ("another user opens its stream", alice, "GET", stream_path, None, 403),
            ("a resource outside the allow list", alice, "POST", actions,
             _action_body("offer", "conv-" + "a" * 16, _offer("bob-only")), 403),
            ("no token", nobody, "POST", actions, _action_body("ping", None), 401),
            ("a wrong token", stranger, "POST", actions, _action_body("ping", None), 401),
            ("a wrong token lists resources", stranger, "GET", "/api/v1/resources", None, 401),
            ("a wrong token opens a stream", stranger, "GET", stream_path, None, 401),
            ("a wrong token asks for a gateway", stranger, "GET", f"/api/v1/gateways/{name}", None, 401),
        ]:
            await attempt(what, client, method, path, body, expected)
        status, listing = await alice.get("/api/v1/resources")
        row.times += 1
        if "bob-only" in json.dumps(listing):
            row.fail("the allow list did not hide bob-only from alice's resource list")
        else:
            refused["hidden"] += 1
        # carol goes over her action budget; alice, on her own token, does not notice
        over = 0
        for _ in range(config["router"]["rate_burst"] + 5):
            status, _, headers = await carol.request("POST", actions, body=_action_body("ping", None))
            if status == 429:
                over += 1
                retry_after = int(headers.get("Retry-After", "0"))
        row.times += over
        if not over or retry_after < 1:
            row.fail("a token over its action budget was not refused with 429 and Retry-After")
        else:
            refused[429] += over
        status, _, _ = await alice.request("POST", actions, body=_action_body("ping", None))
        if status != 200:
            row.fail(f"alice was limited by carol's budget: HTTP {status}")
        # The router restarts and forgets every binding; the gateway still refuses alice on bob's session.
        await stack.router.stop()
        stack.router = Router(config_from_dict(config).router)
        await stack.router.start("127.0.0.1", port)
        await asyncio.wait_for(stack.agent.online.wait(), WAIT)
        await attempt("another user closes bob's conversation after a router restart", alice, "POST", actions,
                      _action_body("close", cid), 403)
        channel, reply = await session.peer.open_stream(protocol.FIRST_STREAM_ID + 2)
        channel.send(b"still mine")
        if reply.get("op") != "opened" or await channel.receive() != b"still mine":
            row.fail("bob's session stopped passing data")
        await bob.action(name, cid, "close")
        await session.peer.close()


def _private_files(folder: Path, config: dict[str, Any], row: Row, refused: Counter) -> None:
    """Files holding secrets that others could read are refused, with the fix in the message."""
    import asyncssh

    from commander_pam_plugin.config import load_config as load_client_config
    from commander_pam_plugin.gateway.config import ConfigError, config_from_dict, load_config

    gateway_file = folder / "shared-gateway.toml"
    gateway_file.write_text(to_toml(config))
    key_file = folder / "shared-key"
    key_file.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    client_file = folder / "shared-client.toml"
    client_file.write_text(f'router_url = "http://127.0.0.1:9"\ntoken = "{token(config, "alice")}"\n')
    for path in (gateway_file, key_file, client_file):
        path.chmod(0o644)
    key_config = {**config, "resources": [{"name": "k", "kind": "ssh", "host": "127.0.0.1", "port": 22,
                                           "username": "u", "private_key": str(key_file)}]}
    for what, load in (("a gateway config others can read", lambda: load_config(gateway_file)),
                       ("a private key others can read", lambda: config_from_dict(key_config)),
                       ("a client config others can read", lambda: load_client_config({"PAM_CONFIG": str(client_file)}))):
        row.times += 1
        try:
            load()
        except (ConfigError, PamError) as exc:
            message = str(exc)
            if "chmod 600" in message and "\n" not in message and token(config, "alice") not in message:
                refused["private"] += 1
                continue
            row.fail(f"{what}: unclear refusal: {message[:160]}")
            continue
        row.fail(f"{what} was accepted")


def access_control(folder: Path) -> Row:
    """Tokens, allow lists, conversation ownership (router and gateway), rate limits, private files."""
    from commander_pam_plugin.gateway.config import config_from_dict
    from commander_pam_plugin.gateway.embedded import start_stack

    row = Row("access: tokens, allow lists, ownership, rate limit, private files", "", 0, "")
    refused: Counter[Any] = Counter()
    with EchoServer() as echo:
        resources = [echo_resource(echo), {**echo_resource(echo, "bob-only"), "users": ["bob"]}]
        config = make_config(resources, router={"rate_limit": 2, "rate_burst": 20})
        real_offer_sdp()  # made (and cached) here: it runs its own event loop
        port, thread = free_port(), LoopThread("access").start()
        try:
            stack = thread.run(start_stack(config_from_dict(config), "127.0.0.1", port), WAIT)
            thread.run(stack.wait_online(WAIT), WAIT + 1)
            thread.run(_access_attempts(stack, config, port, row, refused), WAIT * 3)
            thread.run(stack.close(), WAIT)
        finally:
            thread.stop()
        _private_files(folder, config, row, refused)
    row.tried = ("another user's conversation (close, candidates, offer, stream; again at the gateway after a "
                 "router restart), a resource outside the allow list, missing and wrong tokens, a token over its "
                 "action budget, secret files readable by others")
    row.survived = (f"all refused: 403×{refused[403]}, 401×{refused[401]}, 429×{refused[429]} (with Retry-After; "
                    f"another token unaffected), allow list hid the resource, {refused['private']} files refused "
                    "with 'chmod 600'; the owner's session kept passing data")
    return row
