"""The embedded default: with no router configured, a local router and gateway inside the shell.

So a new user sees `pam launch demo` work with one command and no server of their own. Every
part listens on 127.0.0.1 only, with fresh random tokens and a fresh random SSH password that
never leaves the in-process gateway config:
- `demo`: an ssh resource backed by an in-process SSH server running your login shell in a PTY;
- `demo-echo`: a tcp resource backed by an in-process echo service (try `pam tunnel start demo-echo`).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import TextIO

from .gateway.embedded import EmbeddedGateway
from .loop import half_close

USER = "local"
# The embedded parts log like a server would (access lines, SSH and ICE chatter); in a user's
# shell that is noise on the console. Their warnings and errors still show.
QUIET_LOGGERS = ("commander_pam_plugin.gateway", "pam_gateway", "asyncssh", "aiohttp.access", "aiohttp.server")


def _quiet_embedded_logs() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo bytes back, and the half-close too."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        half_close(writer)
    except ConnectionError:
        pass
    finally:
        writer.close()


class EmbeddedDefault:
    """A running embedded router + gateway + demo targets; stop() ends all of them."""

    def __init__(self, gateway: EmbeddedGateway, echo_socket: socket.socket) -> None:
        self.gateway = gateway
        self._echo_socket = echo_socket
        self._echo_server: asyncio.AbstractServer | None = None

    @property
    def router_url(self) -> str:
        return self.gateway.router_url

    @property
    def token(self) -> str:
        return self.gateway.user_token(USER)

    async def _serve_echo(self) -> None:
        self._echo_server = await asyncio.start_server(_echo, sock=self._echo_socket)

    async def _close_echo(self) -> None:
        if self._echo_server is not None:
            self._echo_server.close()
            await self._echo_server.wait_closed()

    def stop(self) -> None:
        # Our own shutdown takes the gateway offline on purpose: not worth a warning.
        logging.getLogger("commander_pam_plugin.gateway.router").setLevel(logging.ERROR)
        try:
            self.gateway.run(self._close_echo())
        finally:
            self.gateway.stop()
            self._echo_socket.close()


def start_embedded_default(announce: TextIO | None = None) -> EmbeddedDefault:
    """Start it and say in one line what was started (on stderr unless told otherwise)."""
    _quiet_embedded_logs()
    echo_socket = socket.socket()
    echo_socket.bind(("127.0.0.1", 0))
    config = {"resources": [{"name": "demo-echo", "kind": "tcp", "host": "127.0.0.1",
                             "port": echo_socket.getsockname()[1]}]}
    gateway = EmbeddedGateway(config, demo=True)
    try:
        gateway.start()
        embedded = EmbeddedDefault(gateway, echo_socket)
        gateway.run(embedded._serve_echo())
    except BaseException:
        gateway.stop()
        echo_socket.close()
        raise
    stream = announce if announce is not None else sys.stderr
    print(f"no router configured: started a local router and gateway on {gateway.router_url} "
          f"with resources demo (ssh to this machine as {gateway.demo_ssh.username}) and demo-echo "
          f"(set PAM_ROUTER_URL and PAM_TOKEN to use your own)", file=stream, flush=True)
    return embedded
