"""The shell side of the agent: what `pam tunnel start --background`, `list` and `stop` send it."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import PamError
from . import client


def start_background(hook: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Ask the agent (started if need be) to open the tunnel; returns its record once it is ready.

    The host's vault (pam_resolve_resource) is asked here, in the shell; without an answer the
    agent resolves the name with its own router (no router is started in this process).
    """
    if args.run:
        raise PamError("--run keeps the tunnel for CMD's lifetime in this shell; it cannot be --background",
                       status=2)
    record = hook.pam_resolve_resource(name=args.resource) if hook is not None else None
    gateway = str(record["gateway"]) if isinstance(record, dict) and record.get("gateway") else None
    message: dict[str, Any] = {"op": "start", "resource": args.resource, "gateway": gateway,
                               "host": args.host, "port": args.port, "trickle": not args.no_trickle_ice}
    if args.timeout:
        message["timeout"] = args.timeout
    for key in ("reason", "ticket", "wait_timeout"):  # governance: the agent's offer carries them
        if getattr(args, key, None) is not None:
            message[key] = getattr(args, key)
    answer = client.request(message, start=True)
    assert answer is not None
    return dict(answer["tunnel"])


def agent_tunnels() -> list[dict[str, Any]]:
    """Every tunnel the user's agent holds; none when no agent runs (a list never starts one)."""
    answer = client.request({"op": "list"})
    return list(answer["tunnels"]) if answer else []


def stop(which: str | None, stop_all: bool) -> list[dict[str, Any]]:
    """Stop tunnels in the agent by id or resource name, or all; [] when no agent runs."""
    message: dict[str, Any] = {"op": "stop", "all": True} if stop_all else {"op": "stop", "id": which}
    answer = client.request(message)
    return list(answer["stopped"]) if answer else []


def write_pid_file(path: str, pid: int) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(f"{pid}\n")
    except OSError as exc:
        raise PamError(f"cannot write the pid file {path}: {exc.strerror or exc}") from None


def remove_pid_file(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
