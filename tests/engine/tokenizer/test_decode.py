"""The one token decoder: token time counted from the time tokens equals token time given by the
caller (as a live session gives it), drum hits end `drum_note_ms` later, a drum part's program
makes no program change, and open notes are ended once."""

from improv.engine.tokenizer import Tokenizer
from improv.engine.tokenizer.decode import NoteOff, NoteOn, OpenNotes, ProgramChange, TokenDecoder

from midi_factory import simple_song

TOK = Tokenizer()
V = TOK.vocab


def test_counted_time_equals_given_time():
    ids = TOK.encode(simple_song(4))
    counted, given = TokenDecoder(V), TokenDecoder(V)
    tick, a, b = 0, [], []
    for tok in ids:
        tick += V.shift_ticks(tok)
        a += counted.feed(tok)
        b += given.feed(tok, tick)
    assert a == b and any(isinstance(e, NoteOn) for e in a)


def test_events_of_each_token_kind():
    drums, harmony = V.drums, V.part_index["harmony"]
    dec = TokenDecoder(V, programs={harmony: 5})
    toks = [V.part(drums), V.program(3), V.part(harmony), V.program(40), V.shift(7)]
    toks += [V.velocity(10), V.note_on(drums, 36), V.velocity(20), V.note_on(harmony, 60)]
    events = [e for t in toks for e in dec.feed(t)]
    vel = V.bin_velocity
    assert events == [
        ProgramChange(0, harmony, 40),  # the drums' PROGRAM names a kit: no program change
        NoteOn(7, drums, 36, vel(10), 3),
        NoteOff(7 + dec.drum_ticks, drums, 36),
        NoteOn(7, harmony, 60, vel(20), 40),
    ]
    assert dec.feed(V.note_off(harmony, 60), 9) == [NoteOff(9, harmony, 60)]


def test_open_notes_end_once():
    notes = OpenNotes()
    first = NoteOn(0, 0, 60, 90, 0)
    assert notes.start(first) is None
    assert notes.start(NoteOn(5, 0, 60, 90, 0)) == first  # a re-strike ends the sounding note
    assert notes.end(NoteOff(8, 0, 60)) == NoteOn(5, 0, 60, 90, 0)
    assert notes.end(NoteOff(9, 0, 60)) is None  # nothing sounds there any more
    notes.start(NoteOn(10, 1, 50, 90, 0))
    notes.start(NoteOn(10, 0, 70, 90, 0))
    assert [(n.part, n.pitch) for n in notes.finish()] == [(0, 70), (1, 50)] and not notes.open
