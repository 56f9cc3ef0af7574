"""`pam launch` across the lab (routed, no NAT): the real shell in the client's namespace, the router
over HTTPS, a demo SSH server in the gateway's namespace (the target benchmarks/netlab_connect.py
times). Root only; addresses in 100.64.0.0/10 inside namespaces this run creates and deletes.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from netlab import coturn
from netlab.lab import unavailable_reason
from netlab.stack import LabStack

_reason = unavailable_reason() or (None if coturn.available() else "the network lab needs coturn (turnserver)")
pytestmark = [pytest.mark.netlab, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


@pytest.mark.parametrize("trickle", [True, False], ids=["trickle", "non-trickle"])
def test_launch_runs_a_command_on_the_lab_ssh_target(tmp_path: Path, trickle: bool) -> None:
    marker = secrets.token_hex(8)
    with LabStack(tmp_path, client_nat="none", gateway_nat="none", with_turn=False, ssh_target=True) as stack:
        args = ["launch", "ssh", "--command", f"echo {marker}"] + ([] if trickle else ["--no-trickle-ice"])
        result = stack.client(stack.client_config(), *args, timeout=120)
        answers = [frame for direction, frame in stack.frames if direction == "in" and '"answer"' in frame]
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    # the gateway sent its answer once: in the offer's reply (both modes), never also as an event
    assert len(answers) == 1, answers
    assert '"type": "event"' not in answers[0] and '"type":"event"' not in answers[0]
