"""Client settings: a TOML file plus environment overrides, validated before any connection.

Every mistake is one line naming where the value came from (file and key, or the environment
variable). The token (and any TURN credential) never appears in a repr, and a file holding one
must be private to its owner, as ssh insists for private keys.
"""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from . import rtc
from .errors import PamError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_ENV = "PAM_CONFIG"
DEFAULT_PATH = Path(".config", "commander-pam", "config.toml")  # under the home directory
KEYS = ("router_url", "token", "ice_servers", "host_addresses", "connect_timeout_s", "ice_transport_policy",
        "ca_file", "insecure_http")
MAX_CONNECT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PamConfig:
    """Where the router is, how to authenticate, and which ICE servers and addresses to use."""

    router_url: str | None = None
    token: str | None = None
    ice_servers: list[Any] = field(default_factory=list)
    host_addresses: tuple[str, ...] = rtc.DEFAULT_HOST_ADDRESSES
    connect_timeout_s: float = 15.0
    path: str | None = None
    ice_transport_policy: str = "all"  # "relay": only TURN-relayed candidates leave this machine
    ca_file: str | None = None  # CA bundle that signs the router's certificate (else the system's)
    insecure_http: bool = False  # allow http:// to a router that is not on loopback (token in clear)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["token"] = None if self.token is None else "***"
        shown["ice_servers"] = [_mask_credential(e) for e in self.ice_servers]
        return f"PamConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _mask_credential(entry: Any) -> Any:
    if isinstance(entry, dict) and entry.get("credential") is not None:
        return {**entry, "credential": "***"}
    return entry


def _fail(source: str, key: str, problem: str) -> PamError:
    return PamError(f"{source}: {key}: {problem}")


def _read_file(path: Path) -> dict[str, Any]:
    """Parse the TOML file; refuse it if it holds a secret others can read."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = tomllib.load(f)
    except OSError as err:
        raise PamError(f"{path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise PamError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise _fail(str(path), unknown[0], f"unknown key (known: {', '.join(KEYS)})")
    has_secret = "token" in data or any(isinstance(e, dict) and "credential" in e
                                        for e in data.get("ice_servers") or [])
    if has_secret and os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PamError(f"{path} holds a token but group or others can access it; "
                       f"run: chmod 600 {path}")
    return data


def _config_path(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The file to read and whether the user named it (a named file must exist)."""
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser(), True
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return home / DEFAULT_PATH, False


def _check_router_url(value: Any, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(source, key, "must be a string")
    for url in value.split(","):  # several router nodes: "URL1,URL2" (docs/GATEWAY.md)
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _fail(source, key, f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def is_loopback_url(url: str) -> bool:
    """True for http(s)://127.x.y.z, [::1] or localhost: traffic that never leaves the machine."""
    import ipaddress

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport_security(router_url: str, insecure_http: bool) -> None:
    """Refuse to send a bearer token in clear over a network: http:// only to loopback."""
    if urlsplit(router_url).scheme == "http" and not insecure_http and not is_loopback_url(router_url):
        raise PamError(f"refusing to send the token in clear to {router_url}: use https:// "
                       "(or set insecure_http = true / PAM_INSECURE_HTTP=1 on a trusted network)")


def _check_addresses(value: Any, source: str, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _fail(source, key, "must be a list of IP address strings")
    try:
        return rtc.check_host_addresses(value, allow_empty=allow_empty)
    except ValueError as err:
        raise _fail(source, key, str(err)) from None


def load_config(environ: Mapping[str, str] = os.environ) -> PamConfig:
    """Settings from PAM_CONFIG or ~/.config/commander-pam/config.toml, then PAM_* overrides."""
    path, named = _config_path(environ)
    found = named or path.exists()
    data = _read_file(path) if found else {}
    source = str(path)
    router_url = data.get("router_url")
    if router_url is not None:
        router_url = _check_router_url(router_url, source, "router_url")
    token = data.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise _fail(source, "token", "must be a non-empty string")
    ice_servers = data.get("ice_servers", [])
    if not isinstance(ice_servers, list):
        raise _fail(source, "ice_servers", "must be a list")
    try:
        rtc.ice_servers_from_config(ice_servers)
    except ValueError as exc:
        problem = str(exc) if "needs a username" in str(exc) or "not a stun" in str(exc) \
            else "each entry must be a URL or {urls, username, credential}"
        raise _fail(source, "ice_servers", problem) from None
    policy = data.get("ice_transport_policy", PamConfig.ice_transport_policy)
    if environ.get("PAM_ICE_TRANSPORT_POLICY"):
        policy, policy_source, policy_key = environ["PAM_ICE_TRANSPORT_POLICY"], "environment", "PAM_ICE_TRANSPORT_POLICY"
    else:
        policy_source, policy_key = source, "ice_transport_policy"
    try:
        policy = rtc.check_policy(policy)
    except ValueError as exc:
        raise _fail(policy_source, policy_key, str(exc)) from None
    relay = policy == "relay"
    addresses = rtc.DEFAULT_HOST_ADDRESSES
    if "host_addresses" in data:
        addresses = _check_addresses(data["host_addresses"], source, "host_addresses", allow_empty=relay)
    ca_file = data.get("ca_file")
    if ca_file is not None:
        if not isinstance(ca_file, str) or not ca_file:
            raise _fail(source, "ca_file", "must be a path to a PEM file")
        ca_file = str((path.parent / Path(ca_file).expanduser()) if not Path(ca_file).expanduser().is_absolute()
                      else Path(ca_file).expanduser())
    insecure_http = data.get("insecure_http", False)
    if not isinstance(insecure_http, bool):
        raise _fail(source, "insecure_http", "must be true or false")
    timeout = data.get("connect_timeout_s", PamConfig.connect_timeout_s)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= MAX_CONNECT_TIMEOUT_S:
        raise _fail(source, "connect_timeout_s", f"must be a number of seconds in (0, {MAX_CONNECT_TIMEOUT_S:g}]")

    if environ.get("PAM_ROUTER_URL"):
        router_url = _check_router_url(environ["PAM_ROUTER_URL"], "environment", "PAM_ROUTER_URL")
    if environ.get("PAM_TOKEN"):
        token = environ["PAM_TOKEN"]
    if environ.get("PAM_ICE_HOST_ADDRESSES"):
        listed = [a for a in environ["PAM_ICE_HOST_ADDRESSES"].split(",") if a.strip()]
        addresses = _check_addresses(listed, "environment", "PAM_ICE_HOST_ADDRESSES")
    if environ.get("PAM_CA_FILE"):
        ca_file = environ["PAM_CA_FILE"]
    if environ.get("PAM_INSECURE_HTTP"):
        insecure_http = environ["PAM_INSECURE_HTTP"].strip().lower() in ("1", "true", "yes")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise _fail(source if not environ.get("PAM_CA_FILE") else "environment",
                    "ca_file" if not environ.get("PAM_CA_FILE") else "PAM_CA_FILE", f"no such file: {ca_file}")
    return PamConfig(router_url=router_url, token=token, ice_servers=list(ice_servers),
                     host_addresses=addresses, connect_timeout_s=float(timeout),
                     path=source if found else None, ice_transport_policy=policy,
                     ca_file=ca_file, insecure_http=insecure_http)
