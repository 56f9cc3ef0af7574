"""Bodies of the pam commands; plugin.py parses arguments and calls these.

Each takes (ctx, args) where ctx is the shell's CommandContext and args the parsed Namespace,
and returns an exit status. Filled in by the tunnel and launch work.
"""
from __future__ import annotations

import argparse
from typing import Any

from .errors import PamError


def _not_yet(name: str) -> int:
    raise PamError(f"{name} is not available yet in this build", status=1)


def launch(ctx: Any, args: argparse.Namespace) -> int:
    return _not_yet("pam launch")


def tunnel_start(ctx: Any, args: argparse.Namespace) -> int:
    return _not_yet("pam tunnel start")


def tunnel_list(ctx: Any, args: argparse.Namespace) -> int:
    return _not_yet("pam tunnel list")


def tunnel_stop(ctx: Any, args: argparse.Namespace) -> int:
    return _not_yet("pam tunnel stop")


def resources(ctx: Any, args: argparse.Namespace) -> int:
    return _not_yet("pam resources")


def shutdown() -> None:
    """Close every tunnel, peer and thread the plugin owns (called on shell exit)."""
