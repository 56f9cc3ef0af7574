"""Keeper Commander for the adapter tests: its own virtual environment, a clean user, a network guard.

The environment is `.venv-keeper` at the top of the project (gitignored): keepercommander
(KEEPER_SPEC, the newest 18.x that installs here) and this project, editable. It is created on
first use and reused while it is complete. Every process started from here gets a fresh HOME
(no Keeper config, no login) and a `sitecustomize` audit hook that refuses, and writes down, any
connection or name lookup that is not loopback: Keeper's servers are never reached, and a test
can assert that nothing even tried.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEPER_SPEC = "keepercommander==18.1.8"
KEEPER_VENV = Path(os.environ.get("KEEPER_VENV", ROOT / ".venv-keeper"))
BIN = KEEPER_VENV / "bin"
WAIT = 90  # seconds: "it does not hang" on a loaded 2-core machine, never a timing claim

_GUARD = textwrap.dedent('''
    """Test guard: only loopback. Anything else is refused and written to COMMANDER_TEST_NET_LOG."""
    import os, sys

    _LOG = os.environ.get("COMMANDER_TEST_NET_LOG")
    _LOOPBACK = {"127.0.0.1", "::1", "localhost", "", None}

    def _host(address):
        return address[0] if isinstance(address, tuple) and address else address

    def _guard(event, args):
        if event == "socket.getaddrinfo":
            host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        elif event in ("socket.connect", "socket.sendto"):
            host = _host(args[1])
            if isinstance(host, str) and host.startswith("/"):
                return  # a Unix socket
        else:
            return
        if host in _LOOPBACK or (isinstance(host, str) and host.startswith("127.")):
            return
        if _LOG:
            with open(_LOG, "a") as f:
                f.write(f"{event} {host!r}\\n")
        raise OSError(f"test guard: no network beyond loopback ({event} {host!r})")

    sys.addaudithook(_guard)
''')


def ensure_keeper_venv() -> Path:
    """Create (or complete) the Keeper venv once; a lock keeps parallel sessions from racing."""
    KEEPER_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(str(KEEPER_VENV) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete():
            if not (BIN / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(KEEPER_VENV)], check=True)
            pip = [str(BIN / "python"), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, KEEPER_SPEC, "-e", str(ROOT)], check=True)
        if not _complete():
            raise RuntimeError(f"{KEEPER_VENV}: keepercommander or keeper-pam missing after install")
    return KEEPER_VENV


def _complete() -> bool:
    if not (BIN / "keeper").exists() or not (BIN / "keeper-pam").exists():
        return False
    probe = subprocess.run([str(BIN / "python"), "-c",
                            "import importlib.metadata as m, commander_pam_plugin, pathlib;"
                            "print(m.version('keepercommander'));"
                            "print(pathlib.Path(commander_pam_plugin.__file__).resolve().parent.parent)"],
                           capture_output=True, text=True)
    lines = probe.stdout.split()
    return (probe.returncode == 0 and len(lines) == 2 and f"=={lines[0]}" in KEEPER_SPEC
            and Path(lines[1]) == ROOT)


def keeper_env(home: Path, **extra: str) -> dict[str, str]:
    """A user with no Keeper config, no pam settings, the network guard, and `extra` on top."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PAM_", "COMMANDER_", "KEEPER_", "VIRTUAL_ENV", "PYTHON"))}
    guard = home / "guard"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(_GUARD)
    env.update(HOME=str(home), PYTHONPATH=str(guard), COMMANDER_TEST_NET_LOG=str(home / "net.log"),
               PROMPT_TOOLKIT_NO_CPR="1", TERM="dumb", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def network_attempts(home: Path) -> list[str]:
    """What the guard refused in processes started with keeper_env(home)."""
    log = home / "net.log"
    return log.read_text().splitlines() if log.exists() else []


def run(program: str, *args: str, env: dict[str, str], stdin: str | None = "",
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run bin/<program> (keeper or keeper-pam) to the end; stdin "" is an empty pipe (no prompts answered)."""
    return subprocess.run([str(BIN / program), *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=WAIT, cwd=cwd or env["HOME"])
