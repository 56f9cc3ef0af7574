"""asciicast v2 writer: format, split UTF-8, file mode, refusal to overwrite."""
from __future__ import annotations

import json
import stat

import pytest

from commander_pam_plugin.gateway.recording import AsciicastRecorder


def test_asciicast_v2_lines_and_split_utf8(tmp_path):
    recorder = AsciicastRecorder.create(tmp_path / "rec", "web-1", "conv-12345678", 100, 30, "xterm")
    euro = "€".encode()
    recorder.output(b"price: " + euro[:1])  # a multi-byte character split across two reads
    recorder.output(euro[1:] + b"\r\n")
    recorder.resize(120, 40)
    recorder.output(b"\xff")  # not UTF-8 at all: replaced, never a crash
    recorder.close()
    recorder.close()  # idempotent
    path = recorder.path
    assert path.name.startswith("web-1-") and path.name.endswith("-conv-12345678.cast")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header, *events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert header["version"] == 2 and (header["width"], header["height"]) == (100, 30)
    assert header["env"] == {"TERM": "xterm"} and isinstance(header["timestamp"], int)
    assert "".join(e[2] for e in events if e[1] == "o") == "price: €\r\n\ufffd"
    assert [e[2] for e in events if e[1] == "r"] == ["120x40"]
    times = [e[0] for e in events]
    assert times == sorted(times)


def test_an_existing_recording_is_never_overwritten(tmp_path):
    first = AsciicastRecorder(tmp_path / "same.cast", 80, 24, "xterm", "r")
    first.close()
    with pytest.raises(FileExistsError):
        AsciicastRecorder(tmp_path / "same.cast", 80, 24, "xterm", "r")
