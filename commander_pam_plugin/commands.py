"""Bodies of the pam commands; plugin.py parses arguments and calls these.

Each takes (ctx, args): the shell's CommandContext and the parsed Namespace, and returns an
exit status or raises PamError with one clear line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from typing import Any, Callable

from .errors import PamError
from .runtime import get_runtime, shutdown_runtime
from .timing import ConnectTiming, format_table
from .tunnel import Tunnel


def _out(ctx: Any) -> Any:
    return getattr(ctx, "stdout", None) or sys.stdout


def _err(ctx: Any) -> Any:
    return getattr(ctx, "stderr", None) or sys.stderr


def _session_event(ctx: Any, kind: str, command: str, resource: str, session_id: str,
                   reason: str | None = None) -> None:
    from .hookspecs import SessionEvent

    ctx.hook.pam_session_event(event=SessionEvent(kind=kind, command=command, resource=resource,
                                                  session_id=session_id, reason=reason))


def connect_options(runtime: Any, args: argparse.Namespace) -> Any:
    """How to negotiate for this command: --no-trickle-ice, and --timeout over the configured one."""
    from .negotiation import ConnectOptions

    timeout = getattr(args, "timeout", None) or runtime.config.connect_timeout_s
    return ConnectOptions(trickle=not args.no_trickle_ice, timeout_s=timeout, reason=getattr(args, "reason", None),
                          ticket=getattr(args, "ticket", None), wait_timeout_s=getattr(args, "wait_timeout", 300.0))


def wants_json(args: argparse.Namespace) -> bool:
    """--json or --format json (Keeper's spelling); the two must not contradict each other."""
    fmt = getattr(args, "format", None)
    if args.json and fmt == "table":
        raise PamError("--json and --format table contradict each other; give one", status=2)
    return bool(args.json or fmt == "json")


def launch(ctx: Any, args: argparse.Namespace) -> int:
    from .launch import run_launch

    return run_launch(ctx, args)


def tunnel_start(ctx: Any, args: argparse.Namespace) -> int:
    if getattr(args, "background", False):
        return _start_in_agent(ctx, args)
    runtime = get_runtime()
    runtime.router()  # may start the embedded default: not part of the connect time
    total = ConnectTiming("pam-tunnel:total", hook=ctx.hook)
    timing = total.child("pam-tunnel:webrtc-tunnel")
    ref = runtime.resolve(ctx.hook, args.resource)
    timing.checkpoint("resource_resolved")
    lost = threading.Event()

    def on_lost(tunnel: Tunnel) -> None:
        lost.set()
        _session_event(ctx, "failed", "pam tunnel start", tunnel.resource, tunnel.id, tunnel.reason)
        if ctx.interactive:
            print(f"\ntunnel {tunnel.id} to {tunnel.resource} lost: {tunnel.reason}", file=_err(ctx), flush=True)

    try:
        tunnel = runtime.start_tunnel(ctx.hook, ref, args.host, args.port,
                                      trickle=not args.no_trickle_ice, timing=timing, on_lost=on_lost,
                                      options=connect_options(runtime, args))
    except PamError as exc:
        _session_event(ctx, "failed", "pam tunnel start", ref.name, "", exc.message)
        raise
    total.summary("ready")
    _session_event(ctx, "opened", "pam tunnel start", ref.name, tunnel.id)
    _print_started(ctx, args, tunnel, total)
    pid_file = getattr(args, "pid_file", None)
    if pid_file:
        from .agent.cli import write_pid_file
        write_pid_file(pid_file, os.getpid())
    if args.run:
        try:
            return _run_through(ctx, runtime, tunnel, args.run)
        finally:
            _remove_pid_file(pid_file)
    if ctx.interactive:
        return 0  # the tunnel stays in this shell: so does its pid file
    try:
        return _foreground(ctx, runtime, tunnel, lost)
    finally:
        _remove_pid_file(pid_file)


def _remove_pid_file(path: str | None) -> None:
    from .agent.cli import remove_pid_file

    remove_pid_file(path)


def _start_in_agent(ctx: Any, args: argparse.Namespace) -> int:
    """--background: the user's agent holds the tunnel; print its record and return at once."""
    from .agent import cli

    try:
        record = cli.start_background(ctx.hook, args)
    except PamError as exc:
        _session_event(ctx, "failed", "pam tunnel start", args.resource, "", exc.message)
        raise
    _session_event(ctx, "opened", "pam tunnel start", record["resource"], record["id"])
    if getattr(args, "pid_file", None):
        cli.write_pid_file(args.pid_file, int(record["agent_pid"]))
    if args.json:
        print(json.dumps(record), file=_out(ctx), flush=True)
    else:
        print(f"tunnel {record['id']}: {record['local_address']} -> {record['resource']} "
              f"(via {record['gateway']}, in the background: agent pid {record['agent_pid']}; "
              f"'pam tunnel stop {record['id']}' ends it)", file=_out(ctx), flush=True)
    return 0


def _print_started(ctx: Any, args: argparse.Namespace, tunnel: Tunnel, total: ConnectTiming) -> None:
    out = _out(ctx)
    if args.json:
        record = tunnel.describe()
        record["timing"] = [{"label": e.label, "phase": e.phase, "step_ms": round(e.step_ms, 2),
                             "total_ms": round(e.total_ms, 2)} for e in total.events]
        print(json.dumps(record), file=out, flush=True)
    else:
        print(f"tunnel {tunnel.id}: {tunnel.host}:{tunnel.port} -> {tunnel.resource} "
              f"(via {tunnel.gateway}, ready in {total.events[-1].total_ms:.0f} ms)", file=out, flush=True)
    if args.timing:
        print(format_table(total.events), file=_err(ctx) if args.json else out, flush=True)


def _run_through(ctx: Any, runtime: Any, tunnel: Tunnel, command: str) -> int:
    """Run CMD with {host}/{port} filled in (and PAM_TUNNEL_HOST/PORT set); its status is ours."""
    # Only these two placeholders: CMD may hold other braces (curl -w '%{http_code}', shell ${VAR}).
    line = command.replace("{host}", tunnel.host).replace("{port}", str(tunnel.port))
    env = dict(os.environ, PAM_TUNNEL_HOST=tunnel.host, PAM_TUNNEL_PORT=str(tunnel.port))
    try:
        status = subprocess.call(line, shell=True, env=env)
    except KeyboardInterrupt:
        status = 130
    finally:
        _close(ctx, runtime, tunnel)
    return status


def _foreground(ctx: Any, runtime: Any, tunnel: Tunnel, lost: threading.Event) -> int:
    """One-shot mode: keep the tunnel until Ctrl-C (status 0) or until it is lost (status 1)."""
    # In a -c chain this holds the shell: say so, so that a later -c command is not a mystery.
    print("press Ctrl-C to close the tunnel (it holds this shell: later -c commands run after it; "
          "--background returns at once)", file=_err(ctx), flush=True)
    try:
        lost.wait()
    except KeyboardInterrupt:
        _close(ctx, runtime, tunnel)
        return 0
    reason = tunnel.reason
    _close(ctx, runtime, tunnel)
    raise PamError(f"tunnel {tunnel.id} to {tunnel.resource} lost: {reason}")


def _close(ctx: Any, runtime: Any, tunnel: Tunnel) -> None:
    if tunnel.id in runtime.tunnels:
        runtime.stop_tunnel(tunnel.id)
        _session_event(ctx, "closed", "pam tunnel start", tunnel.resource, tunnel.id)


def tunnel_list(ctx: Any, args: argparse.Namespace) -> int:
    from .agent.cli import agent_tunnels

    records = [t.describe() for t in get_runtime().tunnels.values()] + agent_tunnels()
    _print_listing(ctx, wants_json(args), records, "no tunnels",
                   ("ID", "RESOURCE", "LOCAL", "STATE", "CONNS", "BYTES OUT", "BYTES IN", "AGE"),
                   lambda r: (r["id"], r["resource"], r["local_address"],
                              r["state"] + (f" ({r['reason']})" if r["reason"] else ""),
                              str(r["connections"]), str(r["bytes_out"]), str(r["bytes_in"]),
                              f"{r['age_s']:.0f}s"))
    return 0


def _print_listing(ctx: Any, as_json: bool, records: list[dict[str, Any]], empty: str,
                   header: tuple[str, ...], row: Callable[[dict[str, Any]], tuple[str, ...]]) -> None:
    """A list command's output: the records as JSON, a line saying there are none, or a table."""
    out = _out(ctx)
    if as_json:
        print(json.dumps(records), file=out)
    elif not records:
        print(empty, file=out)
    else:
        _print_table(out, header, [row(record) for record in records])


def _print_table(out: Any, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip(), file=out)


def tunnel_stop(ctx: Any, args: argparse.Namespace) -> int:
    from .agent import cli

    runtime = get_runtime()
    in_agent = cli.stop(args.id, bool(args.all))  # the agent's tunnels ("a1"), then this shell's
    here = args.all or any(args.id in (t.id, t.resource) for t in list(runtime.tunnels.values()))
    if not here:
        if not in_agent:
            runtime.stop_tunnel(args.id)  # raises: no such tunnel, with the open ones named
        stopped = []
    elif args.all:
        stopped = runtime.stop_all()
    elif args.id in runtime.tunnels:
        stopped = [runtime.stop_tunnel(args.id)]
    elif args.id:  # Keeper's habit: a resource name stops every tunnel to it
        ids = [t.id for t in list(runtime.tunnels.values()) if t.resource == args.id]
        if not ids:
            runtime.stop_tunnel(args.id)  # raises: no such tunnel, with the open ones named
        stopped = [runtime.stop_tunnel(i) for i in ids]
    else:
        raise PamError("name a tunnel ID or use --all", status=2)
    for tunnel in stopped:
        _session_event(ctx, "closed", "pam tunnel start", tunnel.resource, tunnel.id)
    for record in in_agent:
        _session_event(ctx, "closed", "pam tunnel start", record["resource"], record["id"])
    count = len(stopped) + len(in_agent)
    print(f"stopped {count} tunnel{'s' if count != 1 else ''}", file=_out(ctx))
    return 0


def tunnel_diagnose(ctx: Any, args: argparse.Namespace) -> int:
    from . import diagnose

    return diagnose.main(get_runtime(), ctx.hook, args.resource, args.json, _out(ctx))


def resources(ctx: Any, args: argparse.Namespace) -> int:
    listed = get_runtime().router().resources()
    # A name listed by several gateways is a pool (docs/GATEWAY.md): POOL says how many serve it.
    pool = {name: sum(1 for r in listed if r.get("name") == name) for name in {r.get("name") for r in listed}}
    _print_listing(ctx, wants_json(args), listed, "no resources available to you",
                   ("NAME", "KIND", "GATEWAY", "POOL"),
                   lambda r: (str(r.get("name")), str(r.get("kind")), str(r.get("gateway")), str(pool[r.get("name")])))
    return 0


def shutdown() -> None:
    """Close every tunnel, peer and thread the plugin owns (called on shell exit)."""
    shutdown_runtime()
