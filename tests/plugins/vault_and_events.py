"""Test plugin: a host 'vault' that resolves the alias `vault-echo` to gateway gw-test's `echo`, and
a session-event recorder that appends each event to $PAM_TEST_EVENTS as one JSON line."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from commander_pam_plugin.hookspecs import hookimpl


@hookimpl
def pam_resolve_resource(name: str) -> dict[str, str] | None:
    if name == "vault-echo":
        return {"name": "echo", "gateway": "gw-test", "kind": "tcp"}
    return None


@hookimpl
def pam_session_event(event: Any) -> None:
    with open(os.environ["PAM_TEST_EVENTS"], "a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(event)) + "\n")
