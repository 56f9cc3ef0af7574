"""This package's hookimpls (entry point `pam`): the pam commands and the default timing sink.

Parsing and policy live here; the bodies live in commands.py, imported only when a pam command
runs so that `help` and shell start-up never pay for importing aiortc.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from . import timing
from .errors import PamError
from .hookspecs import hookimpl


def port_number(text: str) -> int:
    """argparse type for --port: 0 (pick a free port) to 65535."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0 = a free port), got {value}")
    return value


def listen_address(text: str) -> str:
    """argparse type for --host: one IP address; a wildcard would expose the tunnel everywhere."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    if address.is_unspecified:
        raise argparse.ArgumentTypeError(
            f"{text} listens on every interface; give one address, e.g. 127.0.0.1")
    return str(address)


def timeout_seconds(text: str) -> float:
    """argparse type for --timeout: seconds, more than 0 and at most the config's ceiling."""
    from .config import MAX_CONNECT_TIMEOUT_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout must be a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_CONNECT_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"timeout must be more than 0 and at most {MAX_CONNECT_TIMEOUT_S:g} s")
    return value


def access_text(text: str) -> str:
    """argparse type for --reason / --ticket: one line of printable text, at most 200 characters."""
    value = " ".join(text.split())
    if not value or len(value) > 200 or not value.isprintable():
        raise argparse.ArgumentTypeError("must be 1-200 printable characters on one line")
    return value


def wait_seconds(text: str) -> float:
    """argparse type for --wait-timeout: seconds to wait for an approver, more than 0, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wait timeout must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("wait timeout must be more than 0 and at most 86400 s")
    return value


def _check_policy(ctx: Any, resource: str, command: str) -> None:
    """Ask pam_before_connect plugins first; the first reason given refuses the connection."""
    reason = ctx.hook.pam_before_connect(resource=resource, command=command)
    if reason is not None:
        raise PamError(f"connection to {resource} refused by policy: {reason}", status=1)


def _add_connect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource", metavar="RESOURCE", help="resource name, as 'pam resources' lists it")
    parser.add_argument("--no-trickle-ice", "-nti", action="store_true",
                        help="send the offer with all candidates in one request (for old gateways)")
    parser.add_argument("--timing", action="store_true", help="print a table of connect-phase timings")
    parser.add_argument("--timeout", type=timeout_seconds, default=None, metavar="S",
                        help="give up connecting after S seconds (default: connect_timeout_s, 15)")
    parser.add_argument("--reason", type=access_text, metavar="TEXT",
                        help="why you connect: sent to the gateway, its policy and its audit trail")
    parser.add_argument("--ticket", type=access_text, metavar="ID",
                        help="the change or incident ticket this access is for (some resources require one)")
    parser.add_argument("--wait-timeout", type=wait_seconds, default=300.0, metavar="S",
                        help="if the resource needs approval, wait up to S seconds for it (default 300)")


def _configure_launch(parser: argparse.ArgumentParser) -> None:
    _add_connect_options(parser)
    parser.add_argument("--command", metavar="CMD",
                        help="run CMD on the resource instead of an interactive shell; exit with its status")


def _configure_tunnel_start(parser: argparse.ArgumentParser) -> None:
    _add_connect_options(parser)
    parser.add_argument("--port", "-p", type=port_number, default=0, metavar="N",
                        help="local port to listen on (default 0: a free port, printed)")
    parser.add_argument("--host", "-o", type=listen_address, default="127.0.0.1", metavar="ADDR",
                        help="local address to listen on (default 127.0.0.1)")
    parser.add_argument("--json", action="store_true", help="print the tunnel record as JSON")
    parser.add_argument("--run", "-R", metavar="CMD",
                        help="run CMD while the tunnel is open, then stop it; exit with CMD's status")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--background", "-bg", action="store_true",
                      help="hand the tunnel to your pam agent and return once it is ready; it outlives this shell")
    mode.add_argument("--foreground", "-fg", action="store_true",
                      help="keep the tunnel in this process until Ctrl-C (the default)")
    parser.add_argument("--pid-file", metavar="PATH",
                        help="write the pid of the process holding the tunnel (the agent with --background)")


def _configure_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--format", choices=("table", "json"), default=None,
                        help="output format, as Keeper Commander spells it (json = --json)")


def _configure_tunnel_stop(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", metavar="ID",
                       help="tunnel id, as 'pam tunnel list' shows it, or a resource name (stops its tunnels)")
    which.add_argument("--all", action="store_true", help="stop every tunnel")


def _launch(ctx: Any, args: argparse.Namespace) -> int:
    _check_policy(ctx, args.resource, "pam launch")
    from . import commands
    return commands.launch(ctx, args)


def _tunnel_start(ctx: Any, args: argparse.Namespace) -> int:
    _check_policy(ctx, args.resource, "pam tunnel start")
    from . import commands
    return commands.tunnel_start(ctx, args)


def _tunnel_list(ctx: Any, args: argparse.Namespace) -> int:
    from . import commands
    return commands.tunnel_list(ctx, args)


def _tunnel_stop(ctx: Any, args: argparse.Namespace) -> int:
    from . import commands
    return commands.tunnel_stop(ctx, args)


def _resources(ctx: Any, args: argparse.Namespace) -> int:
    from . import commands
    return commands.resources(ctx, args)


def _configure_tunnel_diagnose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource", metavar="RESOURCE", help="resource name, as 'pam resources' lists it")
    _configure_json(parser)


def _tunnel_diagnose(ctx: Any, args: argparse.Namespace) -> int:
    _check_policy(ctx, args.resource, "pam tunnel diagnose")  # it opens a trial connection
    from . import commands
    return commands.tunnel_diagnose(ctx, args)


@hookimpl
def commander_register_commands(registry: Any) -> None:
    registry.add("pam launch", _launch, _configure_launch,
                 help="open an interactive terminal on a resource (credentials stay on the gateway)")
    registry.add("pam tunnel start", _tunnel_start, _configure_tunnel_start,
                 help="forward a local TCP port to a resource")
    registry.add("pam tunnel list", _tunnel_list, _configure_json, help="list open tunnels")
    registry.add("pam tunnel stop", _tunnel_stop, _configure_tunnel_stop, help="stop one tunnel or all of them")
    registry.add("pam tunnel diagnose", _tunnel_diagnose, _configure_tunnel_diagnose,
                 help="check router, token, gateway, ICE servers and a trial connection; say what to fix")
    registry.add("pam resources", _resources, _configure_json, help="list the resources you may connect to")
    alias = getattr(registry, "alias", None)  # hosts without aliases still get every command
    if alias is not None:  # Keeper Commander's spellings: pam l, pam t s|l|x
        alias("pam launch", "l")
        alias("pam tunnel", "t")
        alias("pam tunnel start", "s")
        alias("pam tunnel list", "l")
        alias("pam tunnel stop", "x")


@hookimpl
def pam_connect_timing(event: timing.TimingEvent) -> None:
    timing.log_event(event)


@hookimpl
def commander_shutdown() -> None:
    # No pam command ran if commands.py was never imported: nothing to close, nothing to import.
    commands = sys.modules.get(f"{__package__}.commands")
    if commands is not None:
        commands.shutdown()
