"""Loading the gateway's plugins: installed ones (entry points), files the TOML names, the built-in policy.

Like the client shell: entry points in group `pam_gateway.plugins`, allow-listed by
`[gateway] plugins` when that key is given; then `[gateway] plugin_files`; then check_pending(),
so a misspelt hook name fails at start instead of silently never running.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pluggy

from ..plugin_loading import load_entry_points, load_file
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
        load_entry_points(pm, ENTRY_POINT_GROUP, allowed, lambda name: ConfigError(
            f"gateway.plugins: names {name!r}, but no installed gateway plugin has that name"))
        for path in files:
            load_file(pm, path, "pam_gateway_plugin_",
                      lambda detail, path=path: ConfigError(f"gateway.plugin_files: {path}: {detail}"))
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
