"""Router + gateway in one process: for `pam-gateway serve`, tests, and the client's local default.

`start_stack` composes the two on the running loop (the CLI uses it); `EmbeddedGateway` runs
the same stack on its own asyncio loop in a daemon thread, on 127.0.0.1 random ports, for
synchronous callers. It is online when start() returns: that waits on the router's welcome,
not on a timer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Coroutine, Mapping, TypeVar

from .agent import GatewayAgent
from .config import Config, ConfigError, Resource, config_from_dict, load_config
from .demo_ssh import DemoSSHServer
from .router import Router

T = TypeVar("T")
LOCALHOST = "127.0.0.1"
DEFAULT_NAME = "local"


@dataclass
class Stack:
    """A running router and, when the config has a [gateway], its agent."""

    router: Router
    agent: GatewayAgent | None
    agent_task: asyncio.Task[None] | None

    async def wait_online(self, timeout: float) -> None:
        if self.agent is not None:
            await asyncio.wait_for(self.agent.online.wait(), timeout)

    async def close(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
        if self.agent_task is not None:
            self.agent_task.cancel()
            await asyncio.gather(self.agent_task, return_exceptions=True)
        await self.router.stop()


async def start_stack(config: Config, host: str | None = None, port: int | None = None,
                      with_agent: bool = True) -> Stack:
    """Start the router (on host:port, default from config) and the agent dialling it."""
    router = Router(config.router)
    url = await router.start(host, port)
    agent = task = None
    if with_agent and config.gateway is not None:
        agent = GatewayAgent(config.gateway, url)
        try:
            await agent.start_control()  # governance's control socket, when configured
        except OSError:
            await router.stop()
            raise
        task = asyncio.ensure_future(agent.run())
    return Stack(router, agent, task)


class LoopThread:
    """An asyncio loop in a daemon thread; run(coro) from any other thread and get its result."""

    def __init__(self, name: str = "pam-gateway") -> None:
        # The standard loop: DemoSSHServer's PTY pipes lose their connection under uvloop.
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel whatever is still running on the loop (libraries leave tasks behind), then stop it."""
        if self._thread.is_alive():
            self.run(_cancel_leftovers())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


async def _cancel_leftovers() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


def _as_config(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None) -> Config:
    """Any accepted form as a Config; a dict may leave out users and gateway (fresh ones are made)."""
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    data = dict(config or {})
    data.setdefault("users", [{"name": DEFAULT_NAME, "token": secrets.token_urlsafe(24)}])
    data.setdefault("gateway", {"name": DEFAULT_NAME, "token": secrets.token_urlsafe(24)})
    return config_from_dict(data, "<embedded config>")


class EmbeddedGateway:
    """Router + gateway agent on 127.0.0.1 random ports, in a background thread.

    `demo=True` also starts a DemoSSHServer on the same loop and adds an ssh resource named
    "demo" for it (its password stays inside the gateway config).
    """

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 *, demo: bool = False) -> None:
        self.config = _as_config(config)
        if self.config.gateway is None:
            raise ConfigError(f"{self.config.source}: gateway: an embedded gateway needs a [gateway] table")
        self._demo = demo
        self.demo_ssh: DemoSSHServer | None = None
        self._thread: LoopThread | None = None
        self._stack: Stack | None = None

    @property
    def router(self) -> Router:
        assert self._stack is not None, "start() first"
        return self._stack.router

    @property
    def agent(self) -> GatewayAgent:
        assert self._stack is not None and self._stack.agent is not None, "start() first"
        return self._stack.agent

    @property
    def router_url(self) -> str:
        assert self.router.url is not None
        return self.router.url

    @property
    def gateway_name(self) -> str:
        assert self.config.gateway is not None
        return self.config.gateway.name

    def user_token(self, name: str) -> str:
        for user in self.config.router.users:
            if user.name == name:
                return user.token
        raise KeyError(f"no user named {name}")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 10.0) -> T:
        """Run a coroutine on the gateway's loop (to inspect sessions safely, for example)."""
        assert self._thread is not None, "start() first"
        return self._thread.run(coro, timeout)

    def start(self, timeout: float = 10.0) -> EmbeddedGateway:
        """Returns once the router has welcomed the gateway (it is online)."""
        self._thread = LoopThread().start()
        try:
            self._thread.run(self._start(timeout), timeout + 5)
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self, timeout: float) -> None:
        if self._demo:
            self.demo_ssh = await DemoSSHServer().start()
            self.config = _with_demo(self.config, self.demo_ssh)
        self._stack = await start_stack(self.config, LOCALHOST, 0)
        await self._stack.wait_online(timeout)

    def stop(self) -> None:
        """Close sessions, agent, router and demo server; join the thread."""
        if self._thread is None:
            return
        self._thread.run(self._stop(), 30)
        self._thread.stop()
        self._thread = None

    async def _stop(self) -> None:
        if self._stack is not None:
            await self._stack.close()
        if self.demo_ssh is not None:
            self.demo_ssh.close()

    def __enter__(self) -> EmbeddedGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _with_demo(config: Config, server: DemoSSHServer) -> Config:
    assert config.gateway is not None
    demo = Resource(name="demo", kind="ssh", host=LOCALHOST, port=server.port, username=server.username,
                    password=server.password, insecure_skip_host_key_check=True)
    resources = tuple(r for r in config.gateway.resources if r.name != "demo") + (demo,)
    # The router lets its own gateway serve exactly its resources: "demo" is one of them now.
    identities = tuple(dataclasses.replace(g, resources=tuple(r.name for r in resources))
                       if g.name == config.gateway.name else g for g in config.router.gateways)
    return dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, resources=resources),
                               router=dataclasses.replace(config.router, gateways=identities))
