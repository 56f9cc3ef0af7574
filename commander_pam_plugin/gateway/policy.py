"""The built-in access policy: a resource's `[resources.access]` rules from the TOML, as a plugin.

It is registered like any gateway plugin and answers last (trylast), so a team's plugin can
decide first; with no plugin it is the whole policy. The settings it reads are parsed here too,
so config.py only hands over the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hookspecs import AccessRequest, Decision, hookimpl

MAX_REASON = 200  # characters of --reason / --ticket kept (they go to logs and the audit trail)
DEFAULT_WARN_BEFORE_S = 60.0
DEFAULT_AUDIT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_AUDIT_KEEP = 5
DEFAULT_APPROVAL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class AccessRules:
    """One resource's governance: who approves, what a request must carry, how long it may last."""

    approvers: tuple[str, ...] = ()
    require_reason: bool = False
    require_ticket: bool = False
    max_duration_s: float | None = None
    idle_timeout_s: float | None = None
    warn_before_s: float = DEFAULT_WARN_BEFORE_S
    approval_timeout_s: float = DEFAULT_APPROVAL_TIMEOUT_S
    credentials_from_plugin: bool = False  # a pam_gateway_credentials plugin supplies them


@dataclass(frozen=True)
class GovernanceSettings:
    """Gateway-wide: plugins, the audit trail, the local control socket."""

    plugins: tuple[str, ...] | None = None  # entry-point names allowed; None: every installed one
    plugin_files: tuple[Path, ...] = ()
    audit_log: Path | None = None
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    audit_keep: int = DEFAULT_AUDIT_KEEP
    control_socket: Path | None = None


ACCESS_KEYS = {"approvers", "require_reason", "require_ticket", "max_duration_s", "idle_timeout_s",
               "warn_before_s", "approval_timeout_s", "credentials"}
GOVERNANCE_KEYS = {"plugins", "plugin_files", "audit_log", "audit_max_bytes", "audit_keep", "control_socket"}


def access_from_table(reader: Any) -> AccessRules:
    """`[resources.access]` (a config._Reader, or None for no rules)."""
    if reader is None:
        return AccessRules()
    reader.reject_unknown(ACCESS_KEYS)
    approvers = reader.get("approvers", list, [])
    if not all(isinstance(a, str) and a for a in approvers):
        raise reader.error("approvers", "must be a list of user names")
    credentials = reader.get("credentials", str, "config")
    if credentials not in ("config", "plugin"):
        raise reader.error("credentials", "must be 'config' or 'plugin'")

    def seconds(key: str, default: float | None) -> float | None:
        return reader.number(key, default, 0.1, 30 * 86400) if key in reader.table else default

    return AccessRules(approvers=tuple(approvers), require_reason=reader.get("require_reason", bool, False),
                       require_ticket=reader.get("require_ticket", bool, False),
                       max_duration_s=seconds("max_duration_s", None), idle_timeout_s=seconds("idle_timeout_s", None),
                       warn_before_s=seconds("warn_before_s", DEFAULT_WARN_BEFORE_S) or DEFAULT_WARN_BEFORE_S,
                       approval_timeout_s=seconds("approval_timeout_s", DEFAULT_APPROVAL_TIMEOUT_S)
                       or DEFAULT_APPROVAL_TIMEOUT_S,
                       credentials_from_plugin=credentials == "plugin")


def governance_from_table(reader: Any) -> GovernanceSettings:
    """The governance keys of `[gateway]` (plugins, plugin_files, audit_*, control_socket)."""
    plugins = reader.get("plugins", list)
    if plugins is not None and not all(isinstance(p, str) and p for p in plugins):
        raise reader.error("plugins", "must be a list of entry-point plugin names")
    files = reader.get("plugin_files", list, [])
    if not all(isinstance(f, str) and f for f in files):
        raise reader.error("plugin_files", "must be a list of paths to .py files")
    paths = []
    for value in files:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else reader.base / path
        if not path.is_file():
            raise reader.error("plugin_files", f"no such file: {path}")
        paths.append(path)
    return GovernanceSettings(plugins=None if plugins is None else tuple(plugins), plugin_files=tuple(paths),
                              audit_log=reader.path("audit_log"),
                              audit_max_bytes=int(reader.number("audit_max_bytes", DEFAULT_AUDIT_MAX_BYTES,
                                                                1024, 2 ** 40)),
                              audit_keep=int(reader.number("audit_keep", DEFAULT_AUDIT_KEEP, 1, 1000)),
                              control_socket=reader.path("control_socket"))


class BuiltinPolicy:
    """The TOML's rules: a required reason or ticket, else hold for the named approvers, else allow."""

    @hookimpl(trylast=True)
    def pam_gateway_decide(self, request: AccessRequest) -> Decision:
        rules: AccessRules = request.resource.access
        name = request.resource.name
        if rules.require_reason and not request.reason:
            return Decision.deny(f"{name} requires a reason: add --reason TEXT")
        if rules.require_ticket and not request.ticket:
            return Decision.deny(f"{name} requires a ticket: add --ticket ID")
        if rules.approvers:
            return Decision.hold(rules.approvers)
        return Decision.allow()


_SUPPLIED_SECRETS: set[str] = set()
MAX_SUPPLIED_SECRETS = 4096


def remember_secret(secret: str) -> None:
    """A credential a plugin supplied at connect time: GatewaySettings.redact hides it too."""
    if secret and len(_SUPPLIED_SECRETS) < MAX_SUPPLIED_SECRETS:
        _SUPPLIED_SECRETS.add(secret)


def supplied_secrets() -> tuple[str, ...]:
    return tuple(_SUPPLIED_SECRETS)
