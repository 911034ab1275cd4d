"""The WebSocket message models and the generated docs/protocol.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from improv.protocol import messages as p
from improv.protocol.doc import render, update

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_docs_protocol_is_up_to_date():
    text = DOC.read_text()
    assert update(text) == text, "run: .venv/bin/python -m improv.protocol.doc docs/protocol.md"
    assert render() in text


def test_client_messages_parse():
    m = p.client_adapter.validate_json('{"type":"midi","data":[144,60,100]}')
    assert isinstance(m, p.ClientMidi) and m.time is None
    s = p.client_adapter.validate_python({"type": "start", "mode": "accompany", "drums": True})
    assert isinstance(s, p.Start) and s.lookahead_ms == 100 and s.drums
    u = p.client_adapter.validate_python({"type": "params", "temperature": 0.5})
    assert u.model_dump(exclude_unset=True) == {"type": "params", "temperature": 0.5}


@pytest.mark.parametrize(
    "frame, needle",
    [
        ({"type": "midi", "data": [44, 60, 100]}, "status byte"),
        ({"type": "midi", "data": [144, 200, 100]}, "0..127"),
        ({"type": "midi", "data": []}, "1..3"),
        ({"type": "start", "mode": "respond", "temperature": 9}, "less than or equal to 2"),
        ({"type": "start", "mode": "respond", "pitch_low": 80, "pitch_high": 20}, "pitch_low"),
        ({"type": "start", "mode": "respond", "programs": {"bass": 300}}, "0..127"),
        ({"type": "start", "mode": "dance"}, "respond"),
        ({"type": "params", "temprature": 1}, "Extra inputs"),
        ({"type": "nope"}, "does not match"),
    ],
)
def test_bad_client_messages_say_why(frame, needle):
    with pytest.raises(ValidationError) as e:
        p.client_adapter.validate_python(frame)
    assert needle in str(e.value)


def test_server_messages_round_trip():
    msgs = [
        p.Pong(time=1.0, server_time=2.0),
        p.ServerMidi(data=[144, 60, 90], time=10.0, part="bass"),
        p.Retract(after=5.0),
        p.ErrorMessage(code="bad_json", message="x"),
        p.Started(session="a", mode="respond", params=p.LiveParams(), server_time=0.0),
        p.Stopped(reason="stop", events_sent=0, late_events=0, retracts=0),
    ]
    for m in msgs:
        assert p.server_adapter.validate_json(m.model_dump_json()) == m


def test_response_length():
    assert p.LiveParams(response_beats=8, tempo_bpm=120).response_length_seconds() == 4.0
    assert p.LiveParams(response_seconds=3).response_length_seconds() == 3.0
