"""Test plugin (loaded with --plugin): small `demo` commands that exercise the shell and timing.

`demo connect` records timing the way a pam connect does, through the real hook and logger,
plus one INFO line, so tests can see where each kind of record lands.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from commander_pam_plugin import timing
from commander_pam_plugin.errors import PamError
from commander_pam_plugin.hookspecs import hookimpl

log = logging.getLogger("fixture.demo")


def _connect(ctx: Any, args: argparse.Namespace) -> None:
    total = timing.ConnectTiming(timing.LAUNCH_TOTAL, hook=ctx.hook)
    tunnel = total.child(timing.LAUNCH_TUNNEL)
    tunnel.checkpoint("offer_sent")
    tunnel.checkpoint("data_channel_open")
    total.summary(timing.LAUNCH_READY)
    log.info("demo connected to %s", args.resource)
    if args.timing:
        print(timing.format_table(total.events), file=ctx.stdout)


def _configure_connect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource")
    parser.add_argument("--timing", action="store_true")


def _fail(ctx: Any, args: argparse.Namespace) -> None:
    raise PamError("it failed", status=args.status)


def _crash(ctx: Any, args: argparse.Namespace) -> None:
    raise RuntimeError("boom")


def _interrupt(ctx: Any, args: argparse.Namespace) -> None:
    raise KeyboardInterrupt


def _mode(ctx: Any, args: argparse.Namespace) -> None:
    print(f"interactive={ctx.interactive}", file=ctx.stdout, flush=True)


@hookimpl
def commander_register_commands(registry: Any) -> None:
    registry.add("demo connect", _connect, _configure_connect, help="record connect timing and log one INFO line")
    registry.add("demo fail", _fail, lambda p: p.add_argument("--status", type=int, default=1),
                 help="fail with a PamError")
    registry.add("demo crash", _crash, help="raise an unexpected exception")
    registry.add("demo interrupt", _interrupt, help="behave like Ctrl-C during a command")
    registry.add("demo mode", _mode, help="print whether the shell is interactive")


@hookimpl
def commander_shutdown() -> None:
    marker = os.environ.get("FIXTURE_SHUTDOWN_FILE")
    if marker:
        with open(marker, "a", encoding="utf-8") as f:
            f.write("shutdown\n")
