"""Router and gateway settings from one TOML file (or a dict), validated up front.

Every mistake is reported as one line naming the file and the key, so an operator can fix it
without reading a traceback. Credentials (tokens, passwords, private keys) live only here and
never appear in a repr, so a logged config object cannot leak them.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import rtc
from ..protocol import ALL_CAPABILITIES, MAX_CONVERSATIONS_PER_USER, check_name
from .limits import GatewayLimits, limits_from_table
from .policy import (GOVERNANCE_KEYS, AccessRules, GovernanceSettings, access_from_table,
                     governance_from_table, supplied_secrets)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_LISTEN = ("127.0.0.1", 8470)
DEFAULT_RATE = 50.0
DEFAULT_BURST = 100
DEFAULT_REPLY_TIMEOUT_S = 15.0
# A client that vanishes before its peer connects is freed this long after its offer (after
# connecting, ICE consent notices in about 3 s); an honest connect needs well under 1 s here.
DEFAULT_ICE_TIMEOUT_S = 8.0
# A conversation with no stream, no connected peer and no action for this long is freed, so a
# client that vanished without `close` (or one that only ever sent candidates) gives its slot back.
DEFAULT_CONVERSATION_TIMEOUT_S = 120.0
# A router node's keys in Redis expire this long after the node stops refreshing them.
DEFAULT_STATE_TTL_S = 6.0
RESOURCE_KINDS = ("tcp", "ssh")
MIN_TOKEN_LENGTH = 16


class ConfigError(ValueError):
    """A configuration mistake: the message is one line, 'FILE: KEY: what is wrong'."""


@dataclass(frozen=True)
class User:
    name: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class GatewayIdentity:
    """A gateway the router accepts: its name, the token it must present, and the resources the
    config gives it. With `only_listed` it may serve exactly those; without, also any name that
    the config gives to no gateway (so a config that lists nothing behaves as before)."""

    name: str
    token: str = field(repr=False)
    resources: tuple[str, ...] = ()
    only_listed: bool = False


@dataclass(frozen=True)
class Resource:
    """Something behind the gateway; credentials stay on the gateway side."""

    name: str
    kind: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)  # key text, never a path
    users: tuple[str, ...] | None = None
    record: bool = False
    known_hosts: str | None = None
    insecure_skip_host_key_check: bool = False
    access: AccessRules = field(default_factory=AccessRules)  # [resources.access], policy.py
    # pam launch resume (docs/PROTOCOL.md section 7): how long a lost client's SSH session is held,
    # and how much output it may produce meanwhile before the session ends; grace 0 turns it off.
    resume_grace_s: float = 120.0
    resume_buffer_bytes: int = 1024 * 1024

    def allows(self, user: str) -> bool:
        return self.users is None or user in self.users

    def public(self, gateway: str) -> dict[str, str]:
        """What a user may see about this resource (never host or credentials)."""
        return {"name": self.name, "kind": self.kind, "gateway": gateway}

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.private_key) if s)


@dataclass(frozen=True)
class RouterSettings:
    host: str = DEFAULT_LISTEN[0]
    port: int = DEFAULT_LISTEN[1]
    users: tuple[User, ...] = ()
    gateways: tuple[GatewayIdentity, ...] = ()
    rate_limit: float = DEFAULT_RATE
    rate_burst: int = DEFAULT_BURST
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT_S
    conversation_timeout: float = DEFAULT_CONVERSATION_TIMEOUT_S
    max_conversations_per_user: int = MAX_CONVERSATIONS_PER_USER
    tls_cert: Path | None = None  # with tls_key: serve HTTPS/WSS (gateway/tls.py)
    tls_key: Path | None = None
    # Scale-out (docs/GATEWAY.md): a redis:// URL shared by every router node; None: in memory.
    state_url: str | None = field(default=None, repr=False)  # may hold a Redis password
    node: str | None = None  # this node's name among them (default: random per start)
    state_ttl: float = DEFAULT_STATE_TTL_S

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    def may_serve(self, gateway: str, resource: str) -> bool:
        """Ownership is configuration: what a gateway announces counts only where this says yes.
        Several gateways may list one name: they serve it as a pool (the router picks one)."""
        identity = next((g for g in self.gateways if g.name == gateway), None)
        if identity is None:
            return False
        if resource in identity.resources:
            return True
        return not identity.only_listed and not any(resource in g.resources for g in self.gateways)


@dataclass(frozen=True)
class GatewaySettings:
    name: str
    token: str = field(repr=False)
    router_url: str | None = None
    legacy: bool = False
    capabilities: tuple[str, ...] | None = None  # None: what the version implies
    host_addresses: tuple[str, ...] = rtc.DEFAULT_HOST_ADDRESSES
    ice_servers: tuple[Any, ...] = ()
    ice_transport_policy: str = "all"  # "relay": only TURN-relayed candidates leave the gateway
    router_ca_file: Path | None = None  # CA bundle that signs the router's certificate (wss://)
    recordings_dir: Path = Path("recordings")
    ice_timeout: float = DEFAULT_ICE_TIMEOUT_S
    resources: tuple[Resource, ...] = ()
    limits: GatewayLimits = field(default_factory=GatewayLimits)  # [gateway.limits], see limits.py
    router_urls: tuple[str, ...] = ()  # every router node (router_url = a list); the agent rotates
    governance: GovernanceSettings = field(default_factory=GovernanceSettings)  # plugins, audit, control

    def __post_init__(self) -> None:
        if not self.router_urls and self.router_url:
            object.__setattr__(self, "router_urls", (self.router_url,))

    def resource(self, name: str) -> Resource | None:
        return next((r for r in self.resources if r.name == name), None)

    def secrets(self) -> tuple[str, ...]:
        turn = tuple(e["credential"] for e in self.ice_servers if isinstance(e, dict) and e.get("credential"))
        return (self.token,) + turn + tuple(s for r in self.resources for s in r.secrets())

    def redact(self, text: str) -> str:
        """Belt and braces for text that leaves the gateway: no credential survives it."""
        for secret in self.secrets() + supplied_secrets():  # and any a credential plugin supplied
            if secret in text:
                text = text.replace(secret, "***")
        return text


@dataclass(frozen=True)
class Config:
    source: str
    router: RouterSettings
    gateway: GatewaySettings | None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Reader:
    """Typed access to one table, turning every mistake into a 'FILE: KEY: reason' line."""

    def __init__(self, source: str, table: Mapping[str, Any], prefix: str, base: Path) -> None:
        self.source, self.table, self.prefix, self.base = source, table, prefix, base

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}: {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.error(key, "is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(key, f"must be {_kind_name(kind)}")
        return value

    def name(self, key: str) -> str:
        value = self.get(key, str, required=True)
        try:
            return check_name(value, key)
        except Exception:
            raise self.error(key, "must be 1-64 characters of letters, digits, '.', '_' or '-'") from None

    def token(self, key: str) -> str:
        value = self.get(key, str, required=True)
        if len(value) < MIN_TOKEN_LENGTH or any(c.isspace() for c in value) or not value.isascii():
            raise self.error(key, f"must be at least {MIN_TOKEN_LENGTH} printable ASCII characters")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.get(key, (int, float), default)
        if not low <= value <= high:
            raise self.error(key, f"must be between {low:g} and {high:g}")
        return float(value)

    def path(self, key: str, default: str | None = None) -> Path | None:
        value = self.get(key, str, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def tables(self, key: str) -> list[_Reader]:
        items = self.get(key, list, [])
        readers = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.error(f"{key}[{index}]", "must be a table")
            readers.append(_Reader(self.source, item, f"{self.prefix}{key}[{index}].", self.base))
        return readers

    def table_at(self, key: str) -> _Reader | None:
        value = self.get(key, dict)
        return None if value is None else _Reader(self.source, value, f"{self.prefix}{key}.", self.base)

    def reject_unknown(self, known: set[str]) -> None:
        for key in self.table:
            if key not in known:
                raise self.error(key, "is not a known setting")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _listen(reader: _Reader) -> tuple[str, int]:
    value = reader.get("listen", str, f"{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}")
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise reader.error("listen", "must be ADDRESS:PORT, e.g. 127.0.0.1:8470") from None
    if not sep or not 0 <= port <= 65535:
        raise reader.error("listen", "must be ADDRESS:PORT with a port from 0 to 65535")
    if address.is_unspecified:
        raise reader.error("listen", f"{host} listens everywhere; name the one address to serve on")
    return str(address), port


def _users(root: _Reader) -> tuple[User, ...]:
    users: list[User] = []
    for reader in root.tables("users"):
        reader.reject_unknown({"name", "token"})
        user = User(reader.name("name"), reader.token("token"))
        if any(u.name == user.name for u in users):
            raise reader.error("name", f"user {user.name!r} is listed twice")
        users.append(user)
    tokens = [u.token for u in users]
    if len(set(tokens)) != len(tokens):
        raise root.error("users", "two users share one token")
    return tuple(users)


def _router(root: _Reader, gateway: GatewaySettings | None) -> RouterSettings:
    reader = root.table_at("router") or _Reader(root.source, {}, "router.", root.base)
    reader.reject_unknown({"listen", "rate_limit", "rate_burst", "reply_timeout", "conversation_timeout",
                           "max_conversations_per_user", "tls_cert", "tls_key", "state", "node", "state_ttl"})
    tls_cert, tls_key = _existing_file(reader, "tls_cert"), _existing_file(reader, "tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise reader.error("tls_cert" if tls_cert is None else "tls_key", "tls_cert and tls_key go together")
    host, port = _listen(reader)
    # The process's own [gateway] is given its own [[resources]]: no other gateway may serve them.
    gateways = [GatewayIdentity(gateway.name, gateway.token, tuple(r.name for r in gateway.resources))] \
        if gateway else []
    for item in root.tables("gateways"):
        item.reject_unknown({"name", "token", "resources"})
        served = _served(item)
        identity = GatewayIdentity(item.name("name"), item.token("token"), served or (), served is not None)
        if any(g.name == identity.name for g in gateways):
            raise item.error("name", f"gateway {identity.name!r} is defined twice")
        gateways.append(identity)
    burst = reader.get("rate_burst", int, DEFAULT_BURST)
    if not 1 <= burst <= 100_000:
        raise reader.error("rate_burst", "must be between 1 and 100000")
    per_user = reader.get("max_conversations_per_user", int, MAX_CONVERSATIONS_PER_USER)
    if not 1 <= per_user <= 100_000:
        raise reader.error("max_conversations_per_user", "must be between 1 and 100000")
    users = _users(root)
    _refuse_shared_tokens(root, users, gateways)
    return RouterSettings(host, port, users, tuple(gateways),
                          reader.number("rate_limit", DEFAULT_RATE, 0.1, 100_000), burst,
                          reader.number("reply_timeout", DEFAULT_REPLY_TIMEOUT_S, 0.05, 600),
                          reader.number("conversation_timeout", DEFAULT_CONVERSATION_TIMEOUT_S, 0.1, 86_400),
                          per_user, tls_cert, tls_key, *_scaleout(reader))


def _scaleout(reader: _Reader) -> tuple[str | None, str | None, float]:
    """[router] state (a redis:// URL), node (this node's name) and state_ttl."""
    url = reader.get("state", str)
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise reader.error("state", "must be a redis://, rediss:// or unix:// URL")
    if url is not None and importlib.util.find_spec("redis") is None:
        raise reader.error("state", "needs the redis package: pip install 'commander-pam-plugin[scaleout]'")
    node = reader.name("node") if reader.get("node", str) is not None else None
    return url, node, reader.number("state_ttl", DEFAULT_STATE_TTL_S, 1.0, 600)


def _served(item: _Reader) -> tuple[str, ...] | None:
    """A [[gateways]] entry's `resources`: the names it may serve (absent: any name no list names)."""
    names = item.get("resources", list)
    if names is None:
        return None
    for index, name in enumerate(names):
        try:
            check_name(name, "resource")
        except Exception:
            raise item.error(f"resources[{index}]", "must be a resource name") from None
    return tuple(names)


def _refuse_shared_tokens(root: _Reader, users: tuple[User, ...], gateways: list[GatewayIdentity]) -> None:
    """A gateway token that is also a user token would let that user act as the gateway (and the
    gateway as the user): refused at start, naming both and quoting neither token."""
    for gateway in gateways:
        for user in users:
            if gateway.token == user.token:
                raise root.error("gateways", f"gateway {gateway.name!r} has the same token as user {user.name!r}; "
                                             f"give every gateway and user a token of its own")


def _private_key(reader: _Reader) -> str | None:
    """Inline key text or a path to it; parsed now so a bad key fails at startup, not at launch."""
    import asyncssh

    value = reader.get("private_key", str)
    if value is None:
        return None
    if "-----BEGIN" in value:
        text = value
    else:
        path = reader.path("private_key")
        try:
            with open(path, encoding="utf-8") as handle:
                _require_private(handle.fileno(), path, "a private key")
                text = handle.read()
        except OSError as exc:
            raise reader.error("private_key", f"cannot read {path} ({exc.strerror})") from None
        except ConfigError as exc:
            raise reader.error("private_key", str(exc)) from None
        except UnicodeDecodeError:
            raise reader.error("private_key", "is not a readable unencrypted private key") from None
    try:
        asyncssh.import_private_key(text)
    except Exception:
        raise reader.error("private_key", "is not a readable unencrypted private key") from None
    return text


def _resume_settings(reader: _Reader) -> dict[str, Any]:
    grace = reader.get("resume_grace_s", (int, float), 120.0)
    if isinstance(grace, bool) or not 0 <= grace <= 86400:
        raise reader.error("resume_grace_s", "must be a number of seconds from 0 to 86400")
    bound = reader.get("resume_buffer_bytes", int, 1024 * 1024)
    if not 1024 <= bound <= 64 * 1024 * 1024:
        raise reader.error("resume_buffer_bytes", "must be from 1024 to 67108864 bytes")
    return {"resume_grace_s": float(grace), "resume_buffer_bytes": bound}


def _resource(reader: _Reader) -> Resource:
    reader.reject_unknown({"name", "kind", "host", "port", "username", "password", "private_key", "users",
                           "record", "known_hosts", "insecure_skip_host_key_check", "access", "resume_grace_s",
                           "resume_buffer_bytes"})
    name = reader.name("name")
    kind = reader.get("kind", str, required=True)
    if kind not in RESOURCE_KINDS:
        raise reader.error("kind", f"must be one of {', '.join(RESOURCE_KINDS)}")
    host = reader.get("host", str, required=True)
    if not host or len(host) > 255 or any(c.isspace() for c in host):
        raise reader.error("host", "must be a host name or address")
    port = reader.get("port", int, required=True)
    if not 1 <= port <= 65535:
        raise reader.error("port", "must be from 1 to 65535")
    users = reader.get("users", list)
    if users is not None:
        if not all(isinstance(u, str) for u in users):
            raise reader.error("users", "must be a list of user names")
        users = tuple(users)
    resource = Resource(name=name, kind=kind, host=host, port=port,
                        username=reader.get("username", str), password=reader.get("password", str),
                        private_key=_private_key(reader), users=users,
                        record=reader.get("record", bool, False),
                        known_hosts=str(reader.path("known_hosts")) if "known_hosts" in reader.table else None,
                        insecure_skip_host_key_check=reader.get("insecure_skip_host_key_check", bool, False),
                        access=access_from_table(reader.table_at("access")),
                        **_resume_settings(reader))
    if kind == "ssh":
        if not resource.username:
            raise reader.error("username", "is required for an ssh resource")
        if not (resource.password or resource.private_key or resource.access.credentials_from_plugin):
            raise reader.error("password", "an ssh resource needs a password or a private_key")
    return resource


def _existing_file(reader: _Reader, key: str) -> Path | None:
    path = reader.path(key)
    if path is not None and not path.is_file():
        raise reader.error(key, f"no such file: {path}")
    return path


def _gateway(root: _Reader) -> GatewaySettings | None:
    reader = root.table_at("gateway")
    if reader is None:
        if root.get("resources", list):
            raise root.error("resources", "resources need a [gateway] table")
        return None
    reader.reject_unknown({"name", "token", "router_url", "legacy", "capabilities", "host_addresses",
                           "ice_servers", "recordings_dir", "ice_timeout", "limits", "ice_transport_policy",
                           "router_ca_file", *GOVERNANCE_KEYS})
    try:
        policy = rtc.check_policy(reader.get("ice_transport_policy", str, "all"))
    except ValueError as exc:
        raise reader.error("ice_transport_policy", str(exc)) from None
    router_urls = _router_urls(reader)
    router_url = router_urls[0] if router_urls else None
    capabilities = reader.get("capabilities", list)
    if capabilities is not None:
        unknown = [c for c in capabilities if c not in ALL_CAPABILITIES]
        if unknown:
            raise reader.error("capabilities", f"unknown capability {unknown[0]!r}; known: "
                                               f"{', '.join(ALL_CAPABILITIES)}")
        capabilities = tuple(capabilities)
    try:
        addresses = rtc.check_host_addresses(reader.get("host_addresses", list, list(rtc.DEFAULT_HOST_ADDRESSES)),
                                             allow_empty=policy == "relay")
    except ValueError as exc:
        raise reader.error("host_addresses", str(exc)) from None
    ice_servers = tuple(reader.get("ice_servers", list, []))
    try:
        rtc.ice_servers_from_config(ice_servers)
    except ValueError as exc:
        raise reader.error("ice_servers", str(exc)) from None
    resources: list[Resource] = []
    for item in root.tables("resources"):
        resource = _resource(item)
        if any(r.name == resource.name for r in resources):
            raise item.error("name", f"resource {resource.name!r} is defined twice")
        resources.append(resource)
    return GatewaySettings(name=reader.name("name"), token=reader.token("token"), router_url=router_url,
                           legacy=reader.get("legacy", bool, False), capabilities=capabilities,
                           host_addresses=addresses, ice_servers=ice_servers, ice_transport_policy=policy,
                           router_ca_file=_existing_file(reader, "router_ca_file"),
                           recordings_dir=reader.path("recordings_dir", "recordings"),
                           ice_timeout=reader.number("ice_timeout", DEFAULT_ICE_TIMEOUT_S, 0.1, 600),
                           resources=tuple(resources), limits=limits_from_table(reader.table_at("limits")),
                           router_urls=router_urls, governance=governance_from_table(reader))


def _router_urls(reader: _Reader) -> tuple[str, ...]:
    """gateway.router_url: one URL, or a list of router nodes' URLs (scale-out)."""
    value = reader.get("router_url", (str, list))
    urls = [value] if isinstance(value, str) else list(value or [])
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise reader.error("router_url", "must start with http:// or https://")
    return tuple(urls)


def config_from_dict(data: Mapping[str, Any], source: str = "<config>", base: Path | None = None) -> Config:
    """Validate a parsed config; relative paths are taken from `base` (the file's folder)."""
    root = _Reader(source, data, "", base or Path.cwd())
    root.reject_unknown({"router", "users", "gateways", "gateway", "resources"})
    gateway = _gateway(root)
    return Config(source, _router(root, gateway), gateway)


def _require_private(fd: int, path: Path, holds: str) -> None:
    """Refuse a file holding secrets that group or others may read or write, as ssh does."""
    mode = os.fstat(fd).st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} holds {holds} but group or others can access it "
                          f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")


def _holds_secrets(data: Mapping[str, Any]) -> bool:
    """Tokens ([[users]], [[gateways]], [gateway]) or credentials inline in [[resources]]."""
    tables = [*(data.get("users") or []), *(data.get("gateways") or []), data.get("gateway") or {}]
    resources = data.get("resources") or []
    return (any(isinstance(t, dict) and "token" in t for t in tables)
            or any(isinstance(r, dict) and ("password" in r or "-----BEGIN" in str(r.get("private_key", "")))
                   for r in resources))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; one that holds a secret must be private (0600)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
            try:
                data = tomllib.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: not valid TOML ({exc})") from None
            if _holds_secrets(data):
                _require_private(handle.fileno(), path, "tokens or credentials")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    return config_from_dict(data, str(path), path.resolve().parent)
