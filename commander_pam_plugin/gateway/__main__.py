"""`pam-gateway`: run the router, the gateway agent, or both; write a starter config.

A bad config is one line on stderr and exit status 2; Ctrl-C and SIGTERM shut down cleanly
(sessions closed, sockets released) with status 0.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

from ..loop import run_main
from ..errors import PamError
from .config import ConfigError, load_config

log = logging.getLogger("pam_gateway")
DEFAULT_CONFIG = "pam-gateway.toml"

STARTER = """\
# pam-gateway configuration (docs/GATEWAY.md). Keep this file private: it holds tokens
# and the credentials of your resources. Written with mode 0600.

[router]
listen = "127.0.0.1:8470"

[[users]]
name = "{user}"
token = "{user_token}"

[gateway]
name = "gateway-1"
token = "{gateway_token}"
router_url = "http://127.0.0.1:8470"
host_addresses = ["127.0.0.1"]
ice_servers = []
recordings_dir = "recordings"

# A TCP resource for `pam tunnel start`:
# [[resources]]
# name = "db"
# kind = "tcp"
# host = "127.0.0.1"
# port = 5432

# An SSH resource for `pam launch` (the user never sees the password):
# [[resources]]
# name = "web-1"
# kind = "ssh"
# host = "127.0.0.1"
# port = 22
# username = "deploy"
# password = "..."              # or private_key = "/path/to/key"
# known_hosts = "~/.ssh/known_hosts"
# users = ["{user}"]
# record = true
"""


def _starter_user() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "user"
    return name if name.isascii() and name.replace("-", "").replace("_", "").replace(".", "").isalnum() else "user"


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        print(f"pam-gateway: error: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pam-gateway: error: cannot write {path} ({exc.strerror})", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, 0o600)
        handle.write(STARTER.format(user=_starter_user(), user_token=secrets.token_urlsafe(32),
                                    gateway_token=secrets.token_urlsafe(32)))
    print(f"wrote {path} (mode 0600); start it with: pam-gateway serve --config {path}")
    return 0


async def _until_signal(start: Callable[[], Awaitable[Callable[[], Awaitable[None]]]]) -> int:
    """Run what start() starts until SIGINT/SIGTERM, then await the stop it returned."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        close = await start()
    except OSError as exc:
        print(f"pam-gateway: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await close()
    return 0


def _load(args: argparse.Namespace, need_gateway: bool):
    config = load_config(args.config)
    if need_gateway and config.gateway is None:
        raise ConfigError(f"{config.source}: gateway: this command needs a [gateway] table")
    if config.gateway is not None and config.gateway.governance.control_socket is None:
        import dataclasses

        from .control import default_socket_path

        governance = dataclasses.replace(config.gateway.governance,
                                         control_socket=default_socket_path(config.gateway.name))
        config = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, governance=governance))
    return config


def _control(args: argparse.Namespace, message: dict) -> dict:
    """One request to the running gateway's control socket (the one its config names)."""
    from .control import request

    config = _load(args, need_gateway=True)
    return request(config.gateway.governance.control_socket, message)


def cmd_sessions(args: argparse.Namespace) -> int:
    import json
    import time

    sessions = _control(args, {"op": "sessions"})["sessions"]
    if args.json:
        print(json.dumps(sessions))
        return 0
    if not sessions:
        print("no live sessions")
        return 0
    header = ("ID", "USER", "RESOURCE", "MODE", "SINCE", "BYTES", "REASON", "TICKET")
    rows = [header] + [(s["id"], s["user"], s["resource"], s["mode"],
                        time.strftime("%H:%M:%S", time.localtime(s["since"])), str(s["bytes"]),
                        s.get("reason") or "-", s.get("ticket") or "-") for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


def cmd_pending(args: argparse.Namespace) -> int:
    import json

    pending = _control(args, {"op": "pending"})["pending"]
    if args.json:
        print(json.dumps(pending))
    elif not pending:
        print("no pending requests")
    for item in [] if args.json else pending:
        print(f"{item['id']}  {item['user']} -> {item['resource']} ({item['mode']})  approvers: "
              f"{', '.join(item['approvers'])}  reason: {item.get('reason') or '-'}  ticket: {item.get('ticket') or '-'}")
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    _control(args, {"op": "terminate", "id": args.id, "reason": args.reason})
    print(f"terminated {args.id}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    _control(args, {"op": args.command, "request": args.id, "approver": args.approver,
                    "reason": getattr(args, "reason", None)})
    print(f"request {args.id} {'approved' if args.command == 'approve' else 'denied'} by {args.approver}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .embedded import start_stack

    config = _load(args, need_gateway=True)

    async def start():
        stack = await start_stack(config)
        return stack.close

    return run_main(_until_signal(start))


def cmd_router(args: argparse.Namespace) -> int:
    from .embedded import start_stack

    config = _load(args, need_gateway=False)

    async def start():
        stack = await start_stack(config, with_agent=False)
        return stack.close

    return run_main(_until_signal(start))


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent import GatewayAgent

    config = _load(args, need_gateway=True)
    url = args.router or config.gateway.router_url
    if not url:
        raise ConfigError(f"{config.source}: gateway.router_url: is required (or pass --router URL)")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--router: {url!r} must start with http:// or https://")

    async def start():
        agent = GatewayAgent(config.gateway, args.router or None)  # None: every gateway.router_url
        await agent.start_control()
        task = asyncio.ensure_future(agent.run())

        async def close() -> None:
            await agent.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return close

    return run_main(_until_signal(start))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pam-gateway",
                                     description="Reference signaling router and gateway for pam launch/tunnel.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG (never logs secrets)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", required=True, metavar="FILE", help="TOML config (see docs/GATEWAY.md)")
        return sub

    with_config("serve", "run the router and the gateway agent in one process").set_defaults(func=cmd_serve)
    with_config("router", "run only the router").set_defaults(func=cmd_router)
    agent = with_config("agent", "run only the gateway agent, dialling a router")
    agent.add_argument("--router", metavar="URL", help="router base URL (default: gateway.router_url)")
    agent.set_defaults(func=cmd_agent)
    sessions = with_config("sessions", "list the running gateway's live sessions")
    sessions.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sessions.set_defaults(func=cmd_sessions)
    pending = with_config("pending", "list the requests waiting for an approver")
    pending.add_argument("--json", action="store_true", help="print JSON instead of lines")
    pending.set_defaults(func=cmd_pending)
    terminate = with_config("terminate", "end a live session; its user reads the reason")
    terminate.add_argument("id", metavar="ID", help="session id, as 'pam-gateway sessions' lists it")
    terminate.add_argument("--reason", required=True, metavar="TEXT", help="why (the user sees it; audited)")
    terminate.set_defaults(func=cmd_terminate)
    for verb in ("approve", "deny"):
        decide = with_config(verb, f"{verb} a held request (as an approver the resource names)")
        decide.add_argument("id", metavar="ID", help="request id, as 'pam-gateway pending' lists it")
        decide.add_argument("--as", dest="approver", required=True, metavar="USER",
                            help="the approver you act as (never the requester)")
        if verb == "deny":
            decide.add_argument("--reason", metavar="TEXT", help="why (the user sees it; audited)")
        decide.set_defaults(func=cmd_decide)
    init = commands.add_parser("init", help="write a starter config with fresh random tokens",
                               description="write a starter config with fresh random tokens (mode 0600)")
    init.add_argument("--path", default=DEFAULT_CONFIG, metavar="FILE", help=f"where (default: {DEFAULT_CONFIG})")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)
    return parser


ID_COMMANDS = ("terminate", "approve", "deny")
VALUE_OPTIONS = ("--config", "--reason", "--as")


def _id_last(argv: list[str]) -> list[str]:
    """Session ids are URL-safe tokens and may start with '-': for the commands that take an ID,
    the first word that is neither an option nor an option's value goes last, after '--'."""
    if not argv or argv[0] not in ID_COMMANDS or "--" in argv:
        return argv
    rest, index = argv[1:], 0
    while index < len(rest):
        word = rest[index]
        if word in VALUE_OPTIONS:
            index += 2
        elif word in ("-h", "--help") or word.startswith(tuple(f"{o}=" for o in VALUE_OPTIONS)):
            index += 1
        else:
            return [argv[0], *rest[:index], *rest[index + 1:], "--", word]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-v", "--verbose"):
        args = build_parser().parse_args(argv[:1] + _id_last(argv[1:]))
    else:
        args = build_parser().parse_args(_id_last(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"pam-gateway: error: {exc}", file=sys.stderr)
        return 2
    except PamError as exc:  # a control command the running gateway refused, or no gateway answers
        print(f"pam-gateway: error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
