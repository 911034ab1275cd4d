"""The live options shared by `improv serve --midi-*` and `improv bridge`."""

from __future__ import annotations

import argparse

import pytest

from improv.protocol.args import add_live_arguments, live_start
from improv.protocol.messages import LiveParams


def start_of(*argv: str) -> dict:
    ap = argparse.ArgumentParser()
    add_live_arguments(ap)
    return live_start(ap.parse_args(argv))


def test_chords_ask_for_an_accompaniment_along_the_chart():
    got = start_of("--chords", "C Am F G", "--param", "tempo_bpm=96")
    assert got == {"mode": "accompany", "chords": "C Am F G", "chord_source": "chart",
                   "tempo_bpm": 96}  # fmt: skip
    LiveParams.model_validate({k: v for k, v in got.items() if k != "mode"})


def test_chord_source_and_mode_are_kept_as_given():
    assert start_of("--chord-source", "left_hand") == {"mode": "accompany",
                                                       "chord_source": "left_hand"}  # fmt: skip
    assert start_of() == {"mode": "respond"}
    got = start_of("--mode", "respond", "--chords", "| Dm7 G7 | C |", "--chord-source", "model")
    assert got == {"mode": "respond", "chords": "| Dm7 G7 | C |", "chord_source": "model"}


def test_a_bad_chord_source_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        start_of("--chord-source", "jazz")
    assert "left_hand" in capsys.readouterr().err
