"""A gateway plugin file for tests/test_governance.py: a vault, a change freeze and an event log.

The gateway loads it from gateway.plugin_files (never an entry point). The vault is a file
whose path is in PAM_TEST_VAULT_FILE: the password is read at connect time, as a team's own
vault client would fetch it.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from commander_pam_plugin.gateway.hookspecs import Decision, hookimpl

events: list[Any] = []
changed = threading.Condition()


@hookimpl
def pam_gateway_decide(request: Any) -> Decision | None:
    if request.resource.name == "frozen":
        return Decision.deny("change freeze until Monday")
    return None


@hookimpl
def pam_gateway_credentials(resource: Any, user: str) -> dict[str, str] | None:
    if resource.name != "vault-box":
        return None
    with open(os.environ["PAM_TEST_VAULT_FILE"], encoding="utf-8") as handle:
        return {"password": handle.read().strip()}


@hookimpl
def pam_gateway_session_event(event: Any) -> None:
    with changed:
        events.append(event)
        changed.notify_all()


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    """The first event matching predicate (woken by each new event, never polled)."""
    with changed:
        found: list[Any] = []

        def match() -> bool:
            found[:] = [e for e in events if predicate(e)]
            return bool(found)
        if not changed.wait_for(match, timeout):
            raise AssertionError(f"no matching gateway event within {timeout} s; saw {[e.kind for e in events]}")
        return found[0]
