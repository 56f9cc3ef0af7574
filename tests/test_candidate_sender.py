"""The candidate buffer decision: one batch before the offer is acknowledged, none lost, then live."""
from __future__ import annotations

import threading

from commander_pam_plugin.negotiation import CandidateSender


WAIT_S = 5.0  # a generous "does not hang" bound, not a timing claim


def _joined(thread: threading.Thread) -> None:
    """join() with a timeout returns either way: only is_alive() says whether the thread ended."""
    thread.join(WAIT_S)
    assert not thread.is_alive(), f"{thread.name} still blocked after {WAIT_S} s"


def _started(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _candidate(n: int) -> dict:
    return {"candidate": f"candidate:{n} 1 udp 2130706431 127.0.0.{n} {5000 + n} typ host", "sdpMid": "0",
            "sdpMLineIndex": 0}


def test_buffered_candidates_go_out_in_one_batch_with_end_marker() -> None:
    sent: list[dict] = []
    sender = CandidateSender(sent.append, batch=True)
    sender.add([_candidate(1), _candidate(2), _candidate(3)], end=True)
    assert sent == []  # nothing before the offer is acknowledged
    sender.go_live()
    assert sent == [{"candidates": [_candidate(1), _candidate(2), _candidate(3)], "end_of_candidates": True}]
    assert sender.actions == 1


def test_candidate_added_while_batch_in_flight_is_sent_next_not_lost() -> None:
    sent: list[dict] = []
    in_flight = threading.Event()
    release = threading.Event()

    def slow_send(data: dict) -> None:
        sent.append(data)
        if len(sent) == 1:
            in_flight.set()
            release.wait(3 * WAIT_S)  # longer than any check below waits: a blocked add shows

    sender = CandidateSender(slow_send, batch=True)
    sender.add([_candidate(1), _candidate(2)])
    flusher = _started(sender.go_live)
    assert in_flight.wait(WAIT_S)
    # Buffered (not live yet): add returns at once while the batch is still in flight. If the
    # batch were sent while holding the lock, this add would block until release: caught here.
    _joined(_started(sender.add, [_candidate(9)]))
    assert len(sent) == 1
    release.set()
    _joined(flusher)
    assert sent[0] == {"candidates": [_candidate(1), _candidate(2)], "end_of_candidates": False}
    assert sent[1] == {"candidate": _candidate(9)}
    assert sender.actions == 2


def test_a_live_send_in_flight_does_not_hold_up_the_next_add() -> None:
    """Live candidates are sent outside the lock: a slow send never blocks another thread's add."""
    sent: list[dict] = []
    in_flight = threading.Event()
    release = threading.Event()

    def slow_send(data: dict) -> None:
        sent.append(data)
        if data.get("candidate") == _candidate(1):
            in_flight.set()
            release.wait(3 * WAIT_S)  # longer than any check below waits: a blocked add shows

    sender = CandidateSender(slow_send, batch=True)
    sender.go_live()
    first = _started(sender.add, [_candidate(1)])
    assert in_flight.wait(WAIT_S)
    _joined(_started(sender.add, [_candidate(2)]))
    assert sent == [{"candidate": _candidate(1)}, {"candidate": _candidate(2)}]
    release.set()
    _joined(first)


def test_live_candidates_are_sent_alone_at_once() -> None:
    sent: list[dict] = []
    sender = CandidateSender(sent.append, batch=True)
    sender.go_live()
    assert sent == []
    sender.add([_candidate(4)])
    assert sent == [{"candidate": _candidate(4)}]
    sender.add([], end=True)
    assert sent[-1] == {"candidates": [], "end_of_candidates": True}


def test_pre_batch_gateway_gets_one_action_per_candidate() -> None:
    sent: list[dict] = []
    sender = CandidateSender(sent.append, batch=False)
    sender.add([_candidate(1), _candidate(2)], end=True)
    sender.go_live()
    assert sent == [{"candidate": _candidate(1)}, {"candidate": _candidate(2)}, {"candidate": None}]
    assert sender.actions == 3  # each one is an action (the count the benchmarks report)


def test_oversized_buffer_is_split_at_the_protocol_limit() -> None:
    from commander_pam_plugin.protocol import MAX_CANDIDATES_PER_BATCH

    sent: list[dict] = []
    sender = CandidateSender(sent.append, batch=True)
    sender.add([_candidate(i % 250) for i in range(MAX_CANDIDATES_PER_BATCH + 3)], end=True)
    sender.go_live()
    assert [len(d["candidates"]) for d in sent] == [MAX_CANDIDATES_PER_BATCH, 3]
    assert [d["end_of_candidates"] for d in sent] == [False, True]


def test_a_buffer_of_exactly_one_full_batch_keeps_its_end_marker() -> None:
    from commander_pam_plugin.protocol import MAX_CANDIDATES_PER_BATCH

    sent: list[dict] = []
    sender = CandidateSender(sent.append, batch=True)
    sender.add([_candidate(i % 250) for i in range(MAX_CANDIDATES_PER_BATCH)], end=True)
    sender.go_live()
    assert [(len(d["candidates"]), d["end_of_candidates"]) for d in sent] == [(MAX_CANDIDATES_PER_BATCH, True)]
    assert sender.actions == 1
