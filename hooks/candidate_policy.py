"""Example plugin: offer ICE candidates only on addresses that match allowed prefixes.

    PAM_ICE_ALLOW=127.0.0.,10.1. commander-shell --plugin hooks/candidate_policy.py pam tunnel start db

$PAM_ICE_ALLOW is a comma-separated list of address prefixes; unset means no opinion. An
allow-list that matches none of the configured addresses is an error, not a silent fallback.
"""
from __future__ import annotations

import os

from commander_pam_plugin.errors import PamError
from commander_pam_plugin.hookspecs import hookimpl


@hookimpl
def pam_ice_host_addresses(addresses: list[str]) -> list[str] | None:
    prefixes = [p.strip() for p in os.environ.get("PAM_ICE_ALLOW", "").split(",") if p.strip()]
    if not prefixes:
        return None
    kept = [a for a in addresses if a.startswith(tuple(prefixes))]
    if not kept:
        raise PamError(f"PAM_ICE_ALLOW={','.join(prefixes)} matches none of the ICE host addresses "
                       f"{', '.join(addresses)}")
    return kept
