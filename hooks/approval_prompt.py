"""Example plugin: refuse connections by policy, or ask first.

    PAM_DENY=prod-db,prod-web commander-shell --plugin hooks/approval_prompt.py pam launch prod-db

Resources listed in $PAM_DENY (comma-separated) are refused with a reason. With
PAM_APPROVE_PROMPT=1 and a terminal on stdin, every other connection asks "[y/N]" first.
"""
from __future__ import annotations

import os
import sys

from commander_pam_plugin.hookspecs import hookimpl


@hookimpl
def pam_before_connect(resource: str, command: str) -> str | None:
    denied = {name.strip() for name in os.environ.get("PAM_DENY", "").split(",") if name.strip()}
    if resource in denied:
        return f"{resource} is listed in PAM_DENY"
    if os.environ.get("PAM_APPROVE_PROMPT") == "1" and sys.stdin.isatty():
        try:
            answer = input(f"{command} {resource}: connect? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            return "not approved at the prompt"
    return None
