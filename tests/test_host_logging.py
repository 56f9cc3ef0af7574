"""The host's log routing in-process (fast enough for mutation runs): an INFO console, a DEBUG
file without INFO records, and the root level put back on close. The same rule end to end,
through a real tunnel, is in tests/test_host_contract_e2e.py."""
from __future__ import annotations

import io
import logging

from commander_pam_plugin.shell import HostLogging


def test_the_debug_file_gets_debug_and_warning_records_but_no_info_and_the_console_keeps_info(tmp_path) -> None:
    root = logging.getLogger()
    saved = root.level
    console = io.StringIO()
    host = HostLogging(console)
    log = logging.getLogger("commander_pam_plugin.test_routing")
    path = tmp_path / "debug.log"
    try:
        assert host.log_to_file(str(path)) == str(path) and host.file_path == str(path)
        assert root.level == logging.DEBUG  # the file wants DEBUG records, so the root passes them
        log.debug("a debug record")
        log.info("an info record")
        log.warning("a warning record")
    finally:
        host.close()
    text = path.read_text(encoding="utf-8")
    assert " - DEBUG - commander_pam_plugin.test_routing - a debug record" in text
    assert " - WARNING - commander_pam_plugin.test_routing - a warning record" in text
    assert "an info record" not in text
    assert console.getvalue().splitlines() == ["an info record",
                                               "WARNING commander_pam_plugin.test_routing: a warning record"]
    assert root.level == saved and host.file_handler is None
    assert all(h is not host.console for h in root.handlers)


def test_without_a_file_or_console_debug_the_root_stays_at_info() -> None:
    root = logging.getLogger()
    saved = root.level
    host = HostLogging(io.StringIO())
    try:
        assert root.level == logging.INFO and not host.console_debug
        assert host.toggle_console() is True and root.level == logging.DEBUG
        assert host.toggle_console() is False and root.level == logging.INFO
    finally:
        host.close()
    assert root.level == saved
