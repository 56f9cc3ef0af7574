"""Loading pluggy plugins: entry points (optionally allow-listed) and drop-in .py files.

Shared by the shell (`commander.plugins`, `--plugin`) and the gateway (`pam_gateway.plugins`,
`[gateway] plugin_files`), so both behave alike; each caller words its own one-line errors.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Callable, Iterable

import pluggy

log = logging.getLogger(__name__)


def load_entry_points(pm: pluggy.PluginManager, group: str, allowed: Iterable[str] | None,
                      unknown: Callable[[str], Exception]) -> None:
    """Every entry point of `group`, or only the `allowed` names (raising unknown(name) for a missing one)."""
    if allowed is None:
        pm.load_setuptools_entrypoints(group)
        return
    for name in allowed:
        if not pm.load_setuptools_entrypoints(group, name=name) and not pm.has_plugin(name):
            raise unknown(name)


def load_file(pm: pluggy.PluginManager, path: str | Path, module_prefix: str,
              failed: Callable[[str], Exception]) -> None:
    """Import a .py file as a module and register it once; failed(detail) is raised if it cannot load."""
    file = Path(path)
    name = str(file.resolve())
    spec = importlib.util.spec_from_file_location(f"{module_prefix}{file.stem}", file)
    if not file.is_file() or spec is None or spec.loader is None:
        raise failed("not a readable Python file")
    if pm.has_plugin(name):
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        log.debug("traceback of plugin file %s", path, exc_info=True)
        raise failed(f"{type(err).__name__}: {err}") from None
    pm.register(module, name=name)
