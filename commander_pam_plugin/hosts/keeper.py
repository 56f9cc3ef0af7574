"""Keeper Commander as a pluggy host for the `commander.plugins` entry-point group.

Keeper Commander (PyPI `keepercommander`) has no plugin mechanism: its command table is a
module-level dict filled from a fixed list of its own modules. This adapter loads every plugin
written against hookspecs.py, turns each registered command into a Keeper `Command` inside a
Keeper `GroupCommand` (argparse parser and help intact, full `usage: pam-x tunnel start`),
marks them as needing no Keeper login, routes the plugins' log records the way Keeper's
`debug --file` help promises, raises Keeper's `CommandError` for failures, gives one-shot runs
the failing command's exit status, and runs `commander_shutdown` on exit, SIGTERM and SIGHUP.

Nothing here runs at import time: `keeper-pam` (main) or the opt-in hook (keeper_hook.py)
calls run_with_plugins(). Keeper's own commands and their login requirement are untouched.
By default the plugin's `pam ...` commands live under `pam-x` (PAM_KEEPER_GROUP);
PAM_KEEPER_TAKEOVER=1 merges them into Keeper's own `pam` group instead.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pluggy

from ..errors import PamError
from ..shell import Command as PluginSpec
from ..shell import CommandRegistry, _ParserExit, load_plugins

try:
    from keepercommander import cli as keeper_cli
    from keepercommander.commands.base import Command as KeeperCommand
    from keepercommander.commands.base import GroupCommand as KeeperGroup
    from keepercommander.error import CommandError
except ImportError as _missing:  # pragma: no cover - the message is the behaviour
    raise ImportError("the Keeper Commander adapter needs keepercommander in this environment "
                      "(pip install keepercommander)") from _missing

log = logging.getLogger(__name__)

GROUP_ENV = "PAM_KEEPER_GROUP"
TAKEOVER_ENV = "PAM_KEEPER_TAKEOVER"
PLUGIN_PATHS_ENV = "COMMANDER_PLUGIN_PATHS"
DEFAULT_GROUP = "pam-x"
USAGE = 2
KEEPER_FAILURE = 1  # what Keeper's loop returns for any failed command
# Loggers of the libraries this plugin brings; their records follow the plugins' routing.
PLUGIN_LIBRARY_LOGGERS = ("aiortc", "aioice", "asyncssh", "aiohttp")
_GROUP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HELP_WORDS = ("", "-h", "--help", "help")


# Settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeeperSettings:
    """Where the plugins' commands go: `group` replaces the top word `pam`; `takeover` merges into Keeper's."""

    group: str = DEFAULT_GROUP
    takeover: bool = False
    plugin_paths: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> KeeperSettings:
        """PAM_KEEPER_GROUP, PAM_KEEPER_TAKEOVER=1 and COMMANDER_PLUGIN_PATHS (files, os.pathsep-separated)."""
        group = environ.get(GROUP_ENV, DEFAULT_GROUP).strip()
        if not _GROUP_NAME.match(group):
            raise PamError(f"{GROUP_ENV}={group!r}: use lower-case letters, digits, '-' or '_' (e.g. pam-x)",
                           status=USAGE)
        takeover = environ.get(TAKEOVER_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
        paths = tuple(p for p in environ.get(PLUGIN_PATHS_ENV, "").split(os.pathsep) if p.strip())
        return cls(group=group, takeover=takeover, plugin_paths=paths)

    def top_word(self, word: str) -> str:
        """The Keeper command a plugin's top word lands on."""
        if word == "pam":
            return "pam" if self.takeover else self.group
        return word


# Logging ------------------------------------------------------------------------------------

def _is_debug_file(handler: logging.Handler) -> bool:
    """Keeper marks the handler `debug --file` adds with `_debug_file`."""
    return bool(getattr(handler, "_debug_file", False))


def _console_shows_debug(handler: logging.Handler, root: logging.Logger) -> bool:
    """Keeper's console is in debug mode: `debug` set it to DEBUG, or `--debug` with no debug file."""
    if handler.level == logging.DEBUG:
        return True
    has_file = any(_is_debug_file(h) for h in root.handlers)
    return handler.level == logging.NOTSET and root.level <= logging.DEBUG and not has_file


class KeeperLogBridge(logging.Handler):
    """Hands plugin records to Keeper's root handlers, keeping DEBUG off the console unless debug is on.

    Keeper's console handler comes from basicConfig with level 0, so after `debug --file` every
    DEBUG record would print on the terminal too, although Keeper's help says it stays quiet.
    This handler sits on the plugins' own loggers (which stop propagating) and gives each
    record to the debug file as it is, and to the console only at INFO and above, or when
    Keeper's console debug is on.
    """

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        handlers = list(root.handlers)
        if not handlers and logging.lastResort is not None:  # before Keeper's basicConfig ran
            handlers = [logging.lastResort]
        for handler in handlers:
            if record.levelno < handler.level:
                continue
            if (record.levelno < logging.INFO and not _is_debug_file(handler)
                    and not _console_shows_debug(handler, root)):
                continue
            handler.handle(record)


class KeeperLogging:
    """What plugins read from context.log_setup, answered from Keeper's own logging state."""

    def __init__(self, logger_names: Sequence[str]) -> None:
        self.logger_names = tuple(dict.fromkeys(logger_names))
        self.bridge = KeeperLogBridge()
        self._saved: list[tuple[logging.Logger, bool]] = []

    @property
    def console_debug(self) -> bool:
        """True while Keeper's console shows DEBUG records."""
        root = logging.getLogger()
        consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and not _is_debug_file(h)]
        return any(_console_shows_debug(h, root) for h in consoles)

    @property
    def file_path(self) -> str | None:
        """The file `debug --file` writes to, if any."""
        for handler in logging.getLogger().handlers:
            if _is_debug_file(handler):
                return getattr(handler, "baseFilename", None)
        return None

    def install(self) -> None:
        for name in self.logger_names:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.propagate))
            logger.addHandler(self.bridge)
            logger.propagate = False

    def close(self) -> None:
        for logger, propagate in self._saved:
            logger.removeHandler(self.bridge)
            logger.propagate = propagate
        self._saved.clear()


# Keeper command objects ---------------------------------------------------------------------

class PluginCommandError(CommandError):
    """Keeper's CommandError, carrying the exit status a one-shot run should end with."""

    def __init__(self, command: str, message: str, status: int) -> None:
        super().__init__(command, message)
        self.status = status


class PluginCommand(KeeperCommand):
    """One plugin command as a Keeper Command: its own parser (prog = full path) and no login."""

    def __init__(self, host: KeeperHost, spec: PluginSpec, path: str) -> None:
        super().__init__()
        self.host = host
        self.spec = spec
        self.path = path
        spec.parser.prog = path  # Keeper would rename it to the first word; execute_args keeps it

    def is_authorised(self) -> bool:
        return False

    def get_parser(self) -> Any:
        return self.spec.parser

    def _get_parser_safe(self) -> Any:
        # Keeper's version swaps error/exit on the parser for its own (bad options only logged).
        return self.spec.parser

    def execute_args(self, params: Any, args: str, **kwargs: Any) -> None:
        # Keeper's base class would expand ${VAR}, rename prog and log bad options with status 0.
        return self.host.run(self, params, args or "")


class PluginGroup(KeeperGroup):
    """A group of plugin commands; with `keeper_group`, Keeper's own verbs of that group stay in it."""

    def __init__(self, host: KeeperHost, path: str, description: str, keeper_group: Any = None) -> None:
        super().__init__()
        self.host = host
        self.path = path
        self.description = description
        self.keeper_group = keeper_group
        if keeper_group is not None:  # Keeper's verbs first, ours replace same-named ones
            self._commands.update(keeper_group._commands)
            self._command_info.update(keeper_group._command_info)
            self._aliases.update(keeper_group._aliases)
            self.default_verb = keeper_group.default_verb

    def is_authorised(self) -> bool:
        # Keeper's own verbs inside are still asked one by one (GroupCommand logs in per verb).
        return False

    def add(self, verb: str, command: Any, description: str, aliases: Sequence[str]) -> None:
        self.register_command(verb, command, description)
        for alias in aliases:  # never take an alias Keeper gave to another of its verbs
            if self._aliases.get(alias, verb) == verb and alias not in self._commands:
                self._aliases[alias] = verb

    def execute_args(self, params: Any, args: str, **kwargs: Any) -> Any:
        args = (args or "").strip()
        if args.startswith("-- "):
            args = args[3:].strip()
        verb, _, rest = args.partition(" ")
        key = self._aliases.get(verb.lower(), verb.lower())
        if key in self._commands:
            return super().execute_args(params, args, **kwargs)
        if verb in _HELP_WORDS and not (verb == "" and self.default_verb):
            self.print_help()
            return None
        if verb == "":
            return super().execute_args(params, args, **kwargs)
        message = f"unknown command '{self.path} {verb}'"
        close = difflib.get_close_matches(verb.lower(), list(self._commands), n=1)
        if close:
            message += f"; did you mean '{self.path} {close[0]}'?"
        raise self.host.failure("", f"{message} (see '{self.path} help')", USAGE)

    def print_help(self, **kwargs: Any) -> None:
        super().print_help(command=self.path)


# The host -----------------------------------------------------------------------------------

class KeeperContext:
    """What plugin handlers and commander_startup get; mode and streams read at the time of use."""

    def __init__(self, host: KeeperHost) -> None:
        self._host = host

    @property
    def hook(self) -> Any:
        return self._host.pm.hook

    @property
    def pm(self) -> pluggy.PluginManager:
        return self._host.pm

    @property
    def interactive(self) -> bool:
        """Keeper's prompt (not `keeper CMD`, a script file or `keeper -`): tunnels stay in the background."""
        params = self._host.params
        return params is not None and not params.batch_mode

    @property
    def stdout(self) -> Any:
        return sys.stdout

    @property
    def stderr(self) -> Any:
        return sys.stderr

    @property
    def log_setup(self) -> KeeperLogging:
        return self._host.logging


class KeeperHost:
    """Loads plugins into Keeper's command table and runs their commands the way Keeper expects."""

    def __init__(self, pm: pluggy.PluginManager, settings: KeeperSettings) -> None:
        self.pm = pm
        self.settings = settings
        self.params: Any = None
        self.failed_status: int | None = None
        self.logging = KeeperLogging(_plugin_logger_names(pm))
        self.context = KeeperContext(self)
        self._undo: list[Callable[[], None]] = []

    # -- installing ----------------------------------------------------------------------

    def install(self) -> list[str]:
        """Register every plugin command; returns the Keeper command paths added."""
        registry = CommandRegistry()
        self.pm.hook.commander_register_commands(registry=registry)
        added: list[str] = []
        tree = _tree(registry)
        for word in sorted(tree):
            added += self._install_top(registry, word, tree[word])
        self.logging.install()
        self._undo.append(self.logging.close)
        self.pm.hook.commander_startup(context=self.context)
        return added

    def _install_top(self, registry: CommandRegistry, word: str, node: dict[str, Any]) -> list[str]:
        name = self.settings.top_word(word)
        existing = keeper_cli.commands.get(name)
        taken = (existing is not None or name in keeper_cli.enterprise_commands
                 or name in keeper_cli.msp_commands or name in keeper_cli.aliases)
        if isinstance(node, PluginSpec):  # a one-word plugin command
            if taken:
                log.warning("plugin command %r not added: Keeper Commander has a command of that name", name)
                return []
            command = PluginCommand(self, node, name)
            self._put(keeper_cli.commands, name, command)
            self._put(keeper_cli.command_info, name, node.help)
            return [name]
        merge_into = None
        if taken:
            if not (self.settings.takeover and word == "pam" and isinstance(existing, KeeperGroup)):
                log.warning("plugin commands under %r not added: Keeper Commander has a command of that name "
                            "(set %s to another group name)", name, GROUP_ENV)
                return []
            merge_into = existing
        group, added = self._group(registry, (word,), name, node, merge_into)
        self._put(keeper_cli.commands, name, group)
        if merge_into is None:
            self._put(keeper_cli.command_info, name, group.description)
        for alias in registry.aliases_of((word,)):
            if alias not in keeper_cli.aliases and alias not in keeper_cli.commands:
                self._put(keeper_cli.aliases, alias, name)
        return added

    def _group(self, registry: CommandRegistry, words: tuple[str, ...], path: str, node: dict[str, Any],
               keeper_group: Any) -> tuple[PluginGroup, list[str]]:
        description = "plugin commands: " + ", ".join(sorted(node))
        group = PluginGroup(self, path, description, keeper_group)
        added: list[str] = []
        for verb in sorted(node):
            child, child_path = node[verb], f"{path} {verb}"
            aliases = registry.aliases_of(words + (verb,))
            if isinstance(child, PluginSpec):
                group.add(verb, PluginCommand(self, child, child_path), child.help, aliases)
                added.append(child_path)
            else:
                inner = keeper_group.subcommands.get(verb) if keeper_group is not None else None
                inner = inner if isinstance(inner, KeeperGroup) else None
                sub, sub_added = self._group(registry, words + (verb,), child_path, child, inner)
                group.add(verb, sub, sub.description if inner is None else
                          keeper_group._command_info.get(verb, sub.description), aliases)
                added += sub_added
        return group, added

    def _put(self, table: dict[str, Any], key: str, value: Any) -> None:
        """Set table[key], remembering how to put it back (uninstall, tests)."""
        missing = object()
        previous = table.get(key, missing)
        table[key] = value

        def undo() -> None:
            if previous is missing:
                table.pop(key, None)
            else:
                table[key] = previous
        self._undo.append(undo)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- running -------------------------------------------------------------------------

    def failure(self, path: str, message: str, status: int) -> PluginCommandError:
        """A Keeper CommandError for one failed command, its status kept for the one-shot exit."""
        self.failed_status = status or 1
        prefix = f"{path}: "
        if message.startswith(prefix):  # usage errors already name the command
            return PluginCommandError("", message, self.failed_status)
        return PluginCommandError(path, message, self.failed_status)

    def run(self, command: PluginCommand, params: Any, args: str) -> None:
        """Parse and run one plugin command inside Keeper; failures raise Keeper's CommandError."""
        self.params = params
        self.failed_status = None
        try:
            words = shlex.split(args)
        except ValueError as err:
            raise self.failure(command.path, f"cannot parse the command line: {err}", USAGE) from None
        try:
            try:
                namespace = command.spec.parser.parse_args(words)
            except _ParserExit as done:
                (sys.stdout if done.status == 0 else sys.stderr).write(done.text)
                if done.status:
                    raise self.failure(command.path, "usage error", done.status) from None
                return None
            status = command.spec.handler(self.context, namespace)
        except PamError as err:
            raise self.failure(command.path, err.message, err.status) from None
        except KeyboardInterrupt:
            raise self.failure(command.path, "interrupted", 130) from None
        except CommandError:
            self.failed_status = KEEPER_FAILURE
            raise
        except Exception as err:
            log.debug("traceback of '%s'", command.path, exc_info=True)
            raise self.failure(command.path, f"unexpected {type(err).__name__}: {err} "
                                             f"(turn on 'debug' to see the traceback)", 1) from None
        status = 0 if status is None else int(status)
        if status:
            raise self.failure(command.path, f"exit status {status}", status)
        return None

    def exit_status(self, keeper_status: int) -> int:
        """Keeper ends a failed one-shot run with 1; a failed plugin command's own status is better."""
        if keeper_status == KEEPER_FAILURE and self.failed_status:
            return self.failed_status
        return keeper_status

    def shutdown(self, status: int) -> int:
        """commander_shutdown for every plugin; a failing one makes a clean exit non-zero."""
        try:
            self.pm.hook.commander_shutdown()
        except Exception as err:
            log.debug("commander_shutdown failed", exc_info=True)
            print(f"error: plugin shutdown failed: {type(err).__name__}: {err}", file=sys.stderr)
            status = status or 1
        finally:
            self.uninstall()
        return status


def _tree(registry: CommandRegistry) -> dict[str, Any]:
    """Nested dicts of words, PluginSpec at the leaves ("pam tunnel start" -> tree[pam][tunnel][start])."""
    tree: dict[str, Any] = {}
    for spec in registry.commands:
        words = spec.path.split()
        node = tree
        for word in words[:-1]:
            node = node.setdefault(word, {})
        node[words[-1]] = spec
    return tree


def _plugin_logger_names(pm: pluggy.PluginManager) -> list[str]:
    """Top-level package of every plugin module, plus the libraries this plugin brings."""
    names = []
    for plugin in pm.get_plugins():
        module = getattr(plugin, "__name__", "") or ""
        if module:
            names.append(module.split(".")[0])
    return names + list(PLUGIN_LIBRARY_LOGGERS)


# Signals and main ---------------------------------------------------------------------------

def _install_signals() -> Callable[[], None]:
    """SIGTERM and SIGHUP unwind like an exit, so commander_shutdown closes peers cleanly."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return restore


def _status_of(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_with_plugins(keeper_main: Callable[[], Any], environ: Mapping[str, str] = os.environ) -> int:
    """Run Keeper Commander's main() with every `commander.plugins` plugin loaded; returns the exit status."""
    try:
        settings = KeeperSettings.from_environ(environ)
        pm = load_plugins(settings.plugin_paths, environ)
        host = KeeperHost(pm, settings)
        try:
            host.install()
        except Exception as err:
            log.debug("plugin start-up failed", exc_info=True)
            host.uninstall()
            raise PamError(f"plugin start-up failed: {type(err).__name__}: {err}", status=USAGE) from None
    except PamError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return err.status
    restore_signals = _install_signals()
    status = 0
    try:
        result = keeper_main()
        status = _status_of(result)
    except SystemExit as exit_:
        status = _status_of(exit_.code)
    except KeyboardInterrupt:
        status = 130
    finally:
        status = host.shutdown(host.exit_status(status))
        restore_signals()
    return status


def main() -> int:
    """keeper-pam: `keeper` with the plugins loaded; same arguments, same behaviour for Keeper's commands."""
    from keepercommander.__main__ import main as keeper_main

    return run_with_plugins(keeper_main)


if __name__ == "__main__":
    sys.exit(main())
