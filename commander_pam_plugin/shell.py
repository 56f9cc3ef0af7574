"""The reference Commander-style host: pluggy plugins, nested commands, a prompt, `debug`.

Users run the plugin inside a shell like Keeper Commander's; this one lets it run and be tested
without one. It reproduces the host behaviour that decided the fate of Commander's timing lines:
`debug --file` writes DEBUG records to a file and drops INFO ones, the console stays at INFO.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Sequence, TextIO

import pluggy

from . import hookspecs
from .errors import PamError
from .plugin_loading import load_entry_points, load_file

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "commander.plugins"
ALLOW_ENV = "COMMANDER_PLUGINS"
HISTORY_FILE = "~/.commander_pam_history"
PROMPT = "commander> "
FILE_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"
USAGE = 2

Handler = Callable[["CommandContext", argparse.Namespace], "int | None"]


# Logging ------------------------------------------------------------------------------------

class _ConsoleFormatter(logging.Formatter):
    """INFO lines are for the user and print bare; other levels say their level and logger."""

    _detailed = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return super().format(record)
        return self._detailed.format(record)


def _drop_info(record: logging.LogRecord) -> bool:
    """Commander's debug-file filter: user-facing INFO records stay out of the file."""
    return record.levelno != logging.INFO


class HostLogging:
    """The host's logging, Commander style: an INFO console and an optional DEBUG file without INFO.

    Handlers sit on the root logger (`logger_names`); plugins log under their own names and
    their records propagate here. close() puts the root logger back as it was.
    """

    logger_names: tuple[str, ...] = ("",)

    def __init__(self, stream: TextIO) -> None:
        self._root = logging.getLogger()
        self._saved_level = self._root.level
        self.console = logging.StreamHandler(stream)
        self.console.setLevel(logging.INFO)
        self.console.setFormatter(_ConsoleFormatter())
        self.file_handler: logging.FileHandler | None = None
        self._root.addHandler(self.console)
        self._root.setLevel(logging.INFO)

    @property
    def console_debug(self) -> bool:
        """True while the console shows DEBUG records."""
        return self.console.level <= logging.DEBUG

    @property
    def file_path(self) -> str | None:
        """The active debug file, if any."""
        return self.file_handler.baseFilename if self.file_handler else None

    def toggle_console(self) -> bool:
        """Switch the console between DEBUG and INFO; returns whether it is now at DEBUG."""
        self.console.setLevel(logging.INFO if self.console_debug else logging.DEBUG)
        self._sync_root_level()
        return self.console_debug

    def log_to_file(self, path: str) -> str:
        """Add (or replace) the DEBUG file handler; the console level is left alone."""
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as err:
            raise PamError(f"cannot open debug file {path}: {err.strerror or err}") from None
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handler.addFilter(_drop_info)
        self._close_file()
        self.file_handler = handler
        self._root.addHandler(handler)
        self._sync_root_level()
        return handler.baseFilename

    def close(self) -> None:
        """Remove the host's handlers and restore the root level (main() may run again)."""
        self._close_file()
        self._root.removeHandler(self.console)
        self._root.setLevel(self._saved_level)

    def _sync_root_level(self) -> None:
        wants_debug = self.console_debug or self.file_handler is not None
        self._root.setLevel(logging.DEBUG if wants_debug else logging.INFO)

    def _close_file(self) -> None:
        if self.file_handler is not None:
            self._root.removeHandler(self.file_handler)
            self.file_handler.close()
            self.file_handler = None


# Commands -----------------------------------------------------------------------------------

@dataclass
class CommandContext:
    """What a handler (and commander_startup) gets: hook relay, plugin manager, mode, streams."""

    hook: Any
    pm: pluggy.PluginManager
    interactive: bool
    stdout: TextIO
    stderr: TextIO
    log_setup: HostLogging | None = None


class _ParserExit(Exception):
    """argparse wanted to print something and stop (--help): the command ends, the shell does not."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line instead of a usage dump and sys.exit."""

    def error(self, message: str) -> NoReturn:
        raise PamError(f"{self.prog}: {message} (see '{self.prog} --help')", status=USAGE)

    def print_help(self, file: Any = None) -> NoReturn:
        raise _ParserExit(self.format_help(), 0)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ParserExit(message or "", status)


@dataclass(frozen=True)
class Command:
    """One registered command: its path, handler, parser and one-line help."""

    path: str
    handler: Handler
    parser: argparse.ArgumentParser
    help: str


class CommandRegistry:
    """Commands by space-separated path ("pam tunnel start"); every proper prefix is a group."""

    def __init__(self) -> None:
        self._commands: dict[tuple[str, ...], Command] = {}
        self._aliases: dict[tuple[str, ...], str] = {}  # (prefix..., alias) -> the word it stands for

    def add(self, path: str, handler: Handler,
            configure: Callable[[argparse.ArgumentParser], None] | None = None, help: str = "") -> None:
        """Register handler(ctx, args) at path; configure(parser) adds its arguments."""
        words = tuple(path.split())
        if not words or any(w.startswith("-") for w in words):
            raise ValueError(f"not a command path: {path!r}")
        name = " ".join(words)
        if words in self._commands:
            raise ValueError(f"command {name!r} is registered twice")
        parser = _Parser(prog=name, description=help or None)
        if configure is not None:
            configure(parser)
        self._commands[words] = Command(name, handler, parser, help)

    def alias(self, path: str, *words: str) -> None:
        """Let each of `words` stand for the last word of `path`: alias("pam tunnel", "t") (Keeper's habits)."""
        target = tuple(path.split())
        if not target or not self._is_node(target):
            raise ValueError(f"alias for unknown command {path!r}")
        for word in words:
            key = target[:-1] + (word,)
            if self._is_node(key) or self._aliases.get(key, target[-1]) != target[-1]:
                raise ValueError(f"alias {' '.join(key)!r} is already a command or another alias")
            self._aliases[key] = target[-1]

    def aliases_of(self, path: Sequence[str]) -> list[str]:
        """The alias words registered for the last word of `path`."""
        prefix, word = tuple(path[:-1]), path[-1]
        return sorted(k[-1] for k, v in self._aliases.items() if k[:-1] == prefix and v == word)

    @property
    def commands(self) -> list[Command]:
        """Every command, sorted by path."""
        return [self._commands[k] for k in sorted(self._commands)]

    def children(self, prefix: tuple[str, ...]) -> list[str]:
        """The words that may follow `prefix` (sub-commands of a group)."""
        n = len(prefix)
        return sorted({k[n] for k in self._commands if len(k) > n and k[:n] == prefix})

    def run(self, ctx: CommandContext, words: Sequence[str]) -> int:
        """Parse and run one command; PamError for unknown commands and bad options."""
        node, rest = self._resolve(words)
        command = self._commands.get(node)
        if command is None:
            if node and (not rest or rest[0] in ("-h", "--help")):
                ctx.stdout.write(self._group_help(node))
                return 0
            raise PamError(self._unknown(node, rest[0]), status=USAGE)
        try:
            args = command.parser.parse_args(rest)
        except _ParserExit as done:
            (ctx.stdout if done.status == 0 else ctx.stderr).write(done.text)
            return done.status
        status = command.handler(ctx, args)
        return 0 if status is None else int(status)

    def describe(self, words: Sequence[str]) -> str:
        """Help text: every command (no words), a group's sub-commands, or a command's options."""
        if not words:
            width = max(len(c.path) for c in self.commands)
            lines = ["commands:"] + [f"  {c.path:<{width}}  {c.help}".rstrip() for c in self.commands]
            lines.append("'help COMMAND' or 'COMMAND --help' shows a command's options.")
            return "\n".join(lines) + "\n"
        node, rest = self._resolve(words)
        if rest or not node:
            raise PamError(self._unknown(node, (rest or list(words))[0]), status=USAGE)
        command = self._commands.get(node)
        return command.parser.format_help() if command else self._group_help(node)

    def _is_node(self, words: tuple[str, ...]) -> bool:
        n = len(words)
        return any(k[:n] == words for k in self._commands)

    def _resolve(self, words: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
        """The deepest known prefix of words (a command or a group) and the words after it."""
        node: tuple[str, ...] = ()
        while len(node) < len(words):
            step = node + (words[len(node)],)
            step = step if self._is_node(step) else node + (self._aliases.get(step, ""),)
            if not self._is_node(step):
                break
            node = step
        return node, list(words[len(node):])

    def _group_help(self, prefix: tuple[str, ...]) -> str:
        names = self.children(prefix)
        width = max(len(n) for n in names)
        lines = [f"{' '.join(prefix)}: sub-commands"]
        for name in names:
            command = self._commands.get(prefix + (name,))
            text = command.help if command else "sub-commands: " + ", ".join(self.children(prefix + (name,)))
            lines.append(f"  {name:<{width}}  {text}".rstrip())
        return "\n".join(lines) + "\n"

    def _unknown(self, node: tuple[str, ...], word: str) -> str:
        path = " ".join(node + (word,))
        message = f"unknown command '{path}'"
        close = difflib.get_close_matches(word, self.children(node), n=1)
        if close:
            message += f"; did you mean '{' '.join(node + (close[0],))}'?"
        return message + f" (see 'help{' ' if node else ''}{' '.join(node)}')"


def execute(ctx: CommandContext, registry: CommandRegistry, words: Sequence[str]) -> int:
    """Run one command; every failure becomes one line on stderr and an exit status."""
    try:
        return registry.run(ctx, words)
    except PamError as err:
        print(f"error: {err.message}", file=ctx.stderr)
        return err.status
    except KeyboardInterrupt:
        print("interrupted", file=ctx.stderr)
        return 130
    except Exception as err:
        log.debug("traceback of '%s'", " ".join(words), exc_info=True)
        print(f"error: unexpected {type(err).__name__} in '{' '.join(words)}': {err}"
              f" (turn on 'debug' to see the traceback)", file=ctx.stderr)
        return 1


def run_line(ctx: CommandContext, registry: CommandRegistry, line: str) -> int:
    """Split a command line shell-style and run it; an empty line does nothing."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        print(f"error: cannot parse {line!r}: {err}", file=ctx.stderr)
        return USAGE
    return execute(ctx, registry, words) if words else 0


def _add_builtins(registry: CommandRegistry) -> None:
    """help, debug and exit: the host's own commands."""

    def help_command(ctx: CommandContext, args: argparse.Namespace) -> None:
        ctx.stdout.write(registry.describe(args.command))

    def debug_command(ctx: CommandContext, args: argparse.Namespace) -> None:
        assert ctx.log_setup is not None
        if args.file:
            path = ctx.log_setup.log_to_file(args.file)
            print(f"debug log file: {path} (DEBUG and above, INFO left out; console unchanged)",
                  file=ctx.stdout)
        else:
            on = ctx.log_setup.toggle_console()
            print(f"console logging: {'DEBUG' if on else 'INFO'}", file=ctx.stdout)

    def exit_command(ctx: CommandContext, args: argparse.Namespace) -> NoReturn:
        raise SystemExit(0)

    registry.add("help", help_command,
                 lambda p: p.add_argument("command", nargs="*", metavar="WORD",
                                          help="a command path, e.g. pam tunnel start"),
                 help="list every command, or show one command's options")
    registry.add("debug", debug_command,
                 lambda p: p.add_argument("--file", metavar="PATH",
                                          help="also log DEBUG records (not INFO ones) to PATH"),
                 help="toggle DEBUG logging on the console, or log DEBUG to a file")
    registry.add("exit", exit_command, help="leave the shell")


# Plugins ------------------------------------------------------------------------------------

def load_plugins(plugin_paths: Sequence[str] = (),
                 environ: Mapping[str, str] = os.environ) -> pluggy.PluginManager:
    """Entry points (allow-listed by COMMANDER_PLUGINS), then --plugin files; PamError(2) if bad."""
    pm = pluggy.PluginManager("commander")
    pm.add_hookspecs(hookspecs)
    allowed = environ.get(ALLOW_ENV)
    try:
        names = None if allowed is None else filter(None, (n.strip() for n in allowed.split(",")))
        load_entry_points(pm, ENTRY_POINT_GROUP, names, lambda name: PamError(
            f"{ALLOW_ENV} names {name!r}, but no installed plugin has that name", status=USAGE))
        for path in plugin_paths:
            load_file(pm, path, "commander_plugin_",
                      lambda detail, path=path: PamError(f"--plugin {path}: {detail}", status=USAGE))
        pm.check_pending()
    except PamError:
        raise
    except Exception as err:
        log.debug("plugin loading failed", exc_info=True)
        raise PamError(f"cannot load plugins: {type(err).__name__}: {err}", status=USAGE) from None
    return pm


# Main ---------------------------------------------------------------------------------------

def _top_parser() -> _Parser:
    parser = _Parser(prog="commander-shell",
                     description="A Commander-style shell: runs one command, -c command lines, "
                                 "or an interactive prompt ('help' lists the commands).")
    parser.add_argument("--plugin", action="append", default=[], metavar="PATH",
                        help="load a plugin file, e.g. hooks/timing_jsonl.py (repeatable)")
    parser.add_argument("-c", dest="lines", action="append", default=[], metavar="COMMAND",
                        help="run a quoted command line (repeatable; stops at the first failure)")
    return parser


def _parse_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options before the first command word are the shell's; the rest is one command."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        i += 2 if argv[i] in ("--plugin", "-c") else 1
    words = list(argv[i + 1:] if i < len(argv) and argv[i] == "--" else argv[i:])
    opts = _top_parser().parse_args(list(argv[:i]))
    if opts.lines and words:
        raise PamError("give either -c COMMAND or command words, not both", status=USAGE)
    return opts, words


def _start(pm: pluggy.PluginManager, ctx: CommandContext) -> CommandRegistry:
    """Collect every plugin's commands and announce start-up; a failing plugin is one line."""
    registry = CommandRegistry()
    _add_builtins(registry)
    try:
        pm.hook.commander_register_commands(registry=registry)
        pm.hook.commander_startup(context=ctx)
    except Exception as err:
        log.debug("plugin start-up failed", exc_info=True)
        raise PamError(f"plugin start-up failed: {type(err).__name__}: {err}", status=USAGE) from None
    return registry


def _open_history() -> Callable[[], None]:
    """Load the prompt history if readline exists; returns the function that saves it."""
    try:
        import readline
    except ImportError:
        return lambda: None
    path = os.path.expanduser(HISTORY_FILE)
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # first run: no history yet
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError as err:
            log.debug("cannot save history to %s: %s", path, err)
    return save


def _prompt_loop(ctx: CommandContext, registry: CommandRegistry) -> int:
    """Read command lines until end of input; returns the last command's status."""
    save_history = _open_history() if ctx.interactive else (lambda: None)
    prompt = PROMPT if ctx.interactive else ""
    status = 0
    try:
        while True:
            try:
                line = input(prompt)
            except EOFError:
                if ctx.interactive:
                    print(file=ctx.stdout)
                return status
            except KeyboardInterrupt:
                print(file=ctx.stdout)
                continue
            status = run_line(ctx, registry, line)
    finally:
        save_history()


class Terminated(SystemExit):
    """SIGTERM: unwinds like exit(128 + SIGTERM), and the shell says why it ended."""


def _install_sigterm() -> Callable[[], None]:
    """SIGTERM unwinds like an exit, so plugins still get commander_shutdown."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum: int, frame: Any) -> NoReturn:
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _exit_status(code: Any, stderr: TextIO) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(f"error: {code}", file=stderr)
    return 1


def _shutdown(pm: pluggy.PluginManager, status: int, stderr: TextIO) -> int:
    """Tell every plugin the host is exiting; a failing plugin makes a clean exit non-zero."""
    try:
        pm.hook.commander_shutdown()
    except Exception as err:
        log.debug("commander_shutdown failed", exc_info=True)
        print(f"error: plugin shutdown failed: {type(err).__name__}: {err}", file=stderr)
        return status or 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """commander-shell [--plugin PATH]... [-c COMMAND]... [COMMAND WORDS...]; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    stdout, stderr = sys.stdout, sys.stderr
    try:
        opts, words = _parse_argv(argv)
    except _ParserExit as done:
        (stdout if done.status == 0 else stderr).write(done.text)
        return done.status
    except PamError as err:
        print(f"error: {err.message}", file=stderr)
        return err.status

    host_log = HostLogging(stderr)
    restore_sigterm = _install_sigterm()
    pm: pluggy.PluginManager | None = None
    status = 0
    try:
        pm = load_plugins(opts.plugin)
        interactive = not opts.lines and not words and sys.stdin.isatty()
        ctx = CommandContext(pm.hook, pm, interactive, stdout, stderr, host_log)
        registry = _start(pm, ctx)
        if opts.lines:
            for line in opts.lines:
                status = run_line(ctx, registry, line)
                if status:
                    break
        elif words:
            status = execute(ctx, registry, words)
        else:
            status = _prompt_loop(ctx, registry)
    except PamError as err:
        print(f"error: {err.message}", file=stderr)
        status = err.status
    except Terminated as exit_:
        print("terminated (SIGTERM); closing", file=stderr)
        status = _exit_status(exit_.code, stderr)
    except SystemExit as exit_:
        status = _exit_status(exit_.code, stderr)
    except KeyboardInterrupt:
        print("interrupted", file=stderr)
        status = 130
    finally:
        if pm is not None:
            status = _shutdown(pm, status, stderr)
        restore_sigterm()
        host_log.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
