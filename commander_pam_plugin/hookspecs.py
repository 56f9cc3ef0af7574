"""The contract between a Commander-style host, this plugin and customization plugins.

`commander_*` hooks are what a host offers every plugin; `pam_*` hooks let a user's plugin
observe or steer the pam commands. Hooks that make a decision are firstresult: the first
plugin with an opinion (a non-None answer) wins, and None means "no opinion".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pluggy

hookspec = pluggy.HookspecMarker("commander")
hookimpl = pluggy.HookimplMarker("commander")


@dataclass(frozen=True)
class SessionEvent:
    """A pam session changed state; `reason` says why it failed or closed, when known."""

    kind: Literal["opened", "closed", "failed", "resumed"]  # resumed: pam launch came back after a network loss
    command: str
    resource: str
    session_id: str
    reason: str | None = None


# Host hooks ---------------------------------------------------------------------------------

@hookspec
def commander_register_commands(registry: Any) -> None:
    """Add commands with registry.add("pam tunnel start", handler, configure, help).

    Hosts that support aliases also offer registry.alias("pam tunnel", "t"): another spelling
    for the last word of a path (check with getattr: not every host has it).
    """


@hookspec
def commander_startup(context: Any) -> None:
    """The host is ready; context carries its streams, hook and logging setup (context.log)."""


@hookspec
def commander_shutdown() -> None:
    """The host is exiting: close every tunnel, peer and thread the plugin owns."""


# Customization hooks ------------------------------------------------------------------------

@hookspec
def pam_connect_timing(event: Any) -> None:
    """A connect-phase checkpoint or summary was recorded (a timing.TimingEvent)."""


@hookspec(firstresult=True)
def pam_before_connect(resource: str, command: str) -> str | None:
    """Return a reason string to refuse connecting `command` to `resource`, or None to allow."""


@hookspec(firstresult=True)
def pam_ice_host_addresses(addresses: list[str]) -> list[str] | None:
    """Return a replacement for the configured ICE host-address list, or None to keep it."""


@hookspec(firstresult=True)
def pam_resolve_resource(name: str) -> dict[str, str] | None:
    """Return a resource record {"name", "gateway", "kind"} for `name`, or None if unknown."""


@hookspec
def pam_session_event(event: SessionEvent) -> None:
    """A session was opened, closed or failed."""
