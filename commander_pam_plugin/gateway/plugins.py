"""Loading the gateway's plugins: installed ones (entry points), files the TOML names, the built-in policy.

Like the client shell: entry points in group `pam_gateway.plugins`, allow-listed by
`[gateway] plugins` when that key is given; then `[gateway] plugin_files`; then check_pending(),
so a misspelt hook name fails at start instead of silently never running.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Sequence

import pluggy

from . import hookspecs
from .config import ConfigError
from .policy import BuiltinPolicy

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pam_gateway.plugins"
BUILTIN_NAME = "pam_gateway.policy"


def load_plugins(allowed: Sequence[str] | None = None, files: Sequence[Path] = ()) -> pluggy.PluginManager:
    """A plugin manager with the built-in policy, allowed entry points and plugin files; ConfigError if bad."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(BuiltinPolicy(), name=BUILTIN_NAME)
    try:
        if allowed is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            for name in allowed:
                if not pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name) and not pm.has_plugin(name):
                    raise ConfigError(f"gateway.plugins: names {name!r}, but no installed gateway plugin has that name")
        for path in files:
            _load_file(pm, path)
        pm.check_pending()
    except ConfigError:
        raise
    except Exception as err:
        log.debug("gateway plugin loading failed", exc_info=True)
        raise ConfigError(f"gateway plugins: {type(err).__name__}: {err}") from None
    names = [n for n, _ in pm.list_name_plugin() if n != BUILTIN_NAME]
    if names:
        log.info("gateway plugins: %s", ", ".join(sorted(str(n) for n in names)))
    return pm


def _load_file(pm: pluggy.PluginManager, path: Path) -> None:
    """Import a .py file named in gateway.plugin_files and register it."""
    name = str(path.resolve())
    if pm.has_plugin(name):
        return
    spec = importlib.util.spec_from_file_location(f"pam_gateway_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"gateway.plugin_files: {path}: not a readable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        log.debug("traceback of gateway plugin %s", path, exc_info=True)
        raise ConfigError(f"gateway.plugin_files: {path}: {type(err).__name__}: {err}") from None
    pm.register(module, name=name)
