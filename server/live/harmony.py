"""Harmony and meter of an accompany session: the clock's beats, the chart's chords, the left
hand's chords, the model's own (docs/protocol.md, "Harmony and meter").

- **The clock** (`Meter`): `beat_time` + `tempo_bpm` (the bridge sends them from the DAW's MIDI
  clock), or for a chart without one, `tempo_bpm` from the player's first note. Its first
  `beat_time` is bar 1's downbeat; a later one (the bridge re-anchors every 4 beats) keeps the
  count. Its beats, and a chart's chords laid on its bars, are the session's *schedule*: sent to
  the engine ahead of time (`LiveSession.schedule`: BAR/BEAT/CHORD tokens forced at their
  ticks), and to the client (`beat` `lookahead_ms` before it, `chord` when scheduled).
- **The left hand** (`chord_source: left_hand`): the keys below `bass_split` are read as a chord
  at each key struck (`match_chord`); a change is given to the model with the key's event.
- **The player's melody** (`chord_source: model` on a clock): the chord of each beat is read
  from the melody heard (the checkpoint's learned `chord_follower`, the live twin of offline
  accompaniment's chord planner; without one, the HMM's `chord_plan.follow_chord`) ahead of the
  beat, and again when the player strikes a note near it; a change is
  laid into the schedule at the beat (given with the note's event for a note after the beat)
  and announced with source `model`.
- **The model** (`chord_source: model`, no clock): its own CHORD and BEAT tokens become
  `chord` (at once: what comes next) and `beat` messages, retracted with a rollback; its beats
  give the session's tempo (the median of its last beats' spacing).

A model without harmony tokens hears none of it; the client still gets the chart's and the
clock's chords and beats, and the left hand's chords (`started.harmony` says which it is).
Everything here runs on the event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from improv.engine.chord_planner import HEARD_S, ChordPlanner, LiveFollow, confident_tones
from improv.engine.constraints import ChordsOnBeats, ChordTones, Constraint, GivenMarks
from improv.engine.live import LiveSession
from improv.engine.tokenizer.chord_match import match_chord
from improv.engine.tokenizer.chord_plan import follow_chord, melody_weights
from improv.engine.tokenizer.decode import Beat, ChordChange
from improv.engine.tokenizer.harmony import chart_bars, chord_label
from improv.engine.tokenizer.vocab import Vocab
from improv.protocol import messages as p

from .clock import SessionClock
from .playback import Playback

FOLLOW_BEATS = 32  # the melody's last beats a live chord is read from
FOLLOW_EARLY_MS, FOLLOW_LATE_MS = 40.0, 150.0  # a note this close to a beat decides its chord
# a beat's chord hears this much of its melody (a note just struck too)
FOLLOW_HEARD_MS = 1000 * HEARD_S
FOLLOW_AHEAD_MS = 150.0  # a beat's chord is read this long before it (the engine's horizon)
HEDGE_BEATS = 4  # the latest beats whose hedges the engine keeps (the model's lookahead < a beat)
AHEAD_MS = 2_000.0  # the schedule runs this far past now (at least a bar)
RETIME_TOLERANCE_MS = 5.0  # a re-anchored clock whose beats moved less than this changes nothing
STALE_MS = 100.0  # marks further back than this are not scheduled (the model played past them)
TEMPO_BEATS = 8  # the model's latest beats its tempo is read from


def check(params: p.LiveParams) -> str | None:
    """What is wrong with the harmony parameters (a chart's symbols), or None."""
    if params.chords:
        try:
            chart_bars(params.chords)
        except ValueError as e:
            return f"chords: {e}"
    return None


@dataclass
class Meter:
    """Beats at `beat_ms` from `anchor` (session ms), which is beat number `number`; beat n is a
    downbeat when n % per_bar == 0. Beat 0 is the first bar's downbeat."""

    anchor: float
    beat_ms: float
    per_bar: int
    number: int = 0

    def retimed(self, beat_time: float | None, beat_ms: float, per_bar: int) -> Meter:
        """The meter after a new tempo and/or beat (the count goes on: the nearest beat number
        of the old meter names the new anchor)."""
        if beat_time is None:  # only the tempo moved: re-anchored on the beat nearest... now
            beat_time = self.anchor
        n = self.number + round((beat_time - self.anchor) / self.beat_ms)
        return Meter(beat_time, beat_ms, per_bar, n)

    def time(self, number: float) -> float:
        return self.anchor + (number - self.number) * self.beat_ms

    def beats(self, lo: float, hi: float) -> list[int]:
        """Numbers of the beats in [lo, hi)."""
        first = self.number + math.ceil((lo - self.anchor) / self.beat_ms - 1e-9)
        out = []
        n = first
        while self.time(n) < hi:
            out.append(n)
            n += 1
        return out


@dataclass(frozen=True)
class Mark:
    time: float  # session ms
    beat: int | None = None  # the beat's number (None: a chord alone)
    bar: bool = False
    chord: int | None = None  # chord index


@dataclass
class Harmony:
    vocab: Vocab
    clock: SessionClock
    playback: Playback
    params: p.LiveParams
    meter: Meter | None = None
    bars: list[list[int]] | None = None
    sent_until: float = -math.inf  # the client has the schedule up to here (session ms)
    engine_until: float | None = None  # the engine has it up to here (None: not scheduling)
    chord: int | None = None  # the latest chord given: the left hand's, or read from the melody
    model_beats: list[tuple[float, int]] = field(default_factory=list)  # (ms, token position)
    tempo_bpm: float | None = None  # the model's, without a clock
    # the player's melody, for the chords read from it: [pitch, start, end] (session ms; end
    # inf while it sounds), the latest FOLLOW_BEATS beats of it
    melody: list[list[float]] = field(default_factory=list)
    followed: dict[int, int] = field(default_factory=dict)  # beat number -> chord read for it
    followed_beat: int = -(1 << 62)  # the latest beat whose chord was read ahead
    follower: ChordPlanner | None = None  # the checkpoint's live chord follower (None: the HMM)
    live_follow: LiveFollow | None = None  # its state, stepped a beat at a time
    # beat number -> (chord, its tones the follower is sure of, 12 bits): `ChordTones.hedges`
    hedges: dict[int, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._configure(self.params)

    def _configure(self, pr: p.LiveParams) -> None:
        old, self.params = self.params, pr
        self.bars = chart_bars(pr.chords) if pr.chord_source == "chart" and pr.chords else None
        if not pr.clocked():
            self._count(None)  # no clock: the model's own beats
        elif self.meter is not None and (old.beat_time is not None or pr.beat_time is None):
            # the clock moved (the bridge re-anchors), or only the tempo: the count goes on
            self.meter = self.meter.retimed(pr.beat_time, pr.beat_ms(), pr.beats_per_bar)
        elif pr.beat_time is not None:  # a clock starts (a count-in): bar 1 is its downbeat
            self._count(Meter(pr.beat_time, pr.beat_ms(), pr.beats_per_bar))

    def _count(self, meter: Meter | None) -> None:
        """A count that starts again (or stops): the chords read for the old one's beats go."""
        self.meter = meter
        self.followed = {}
        self.followed_beat = -(1 << 62)
        self.hedges = {}
        self.live_follow = LiveFollow(self.follower) if self.follower else None

    # --- settings -------------------------------------------------------------------------------
    @property
    def forced(self) -> bool:
        """The model hears the given chords and beats (its vocabulary has them)."""
        return self.vocab.harmony

    def constraints(self, pr: p.LiveParams) -> list[Constraint]:
        """As offline accompaniment's (engine.generation._given_marks), for parameters `pr`
        (the mode's: a change that only alters constraints does not reach `self.params`): the
        model writes no beats or chords of its own where they are given, its own chords change
        on a beat, and harmony and bass start on the sounding chord's tones (`chord_tones`)."""
        if not self.forced:
            return []
        given_chords = pr.chord_source != "model" or pr.beat_time is not None  # (following)
        out: list[Constraint] = []
        if pr.clocked() or given_chords:
            out.append(GivenMarks(beats=pr.clocked(), chords=given_chords))
        if not given_chords:
            out.append(ChordsOnBeats(strong_only=False))
        if pr.chord_tones:
            out.append(ChordTones(hedges=self._hedge_ticks()))
        return out

    # --- the schedule ---------------------------------------------------------------------------
    def begin(self, session: LiveSession | None, t: float) -> None:
        """The player's first note (again, after a rest) at `t`: a chart without a clock starts
        its first bar here; the engine's schedule starts here, the sounding chord restated."""
        if self.meter is None and self.params.chord_source == "chart":
            self._count(Meter(t, self.params.beat_ms(), self.params.beats_per_bar))
        self.engine_until = t
        self.advance(session, t, restate=True)

    def rest(self) -> None:
        """The accompaniment rests: the engine hears no more marks until the player's next note
        (they would pile up in its history); the client's beats go on."""
        self.engine_until = None

    def new_engine_session(self, session: LiveSession | None, now: float) -> None:
        """A reopened engine session has no schedule: it starts again from now (and a chord
        read from the melody is stated again)."""
        if self.following:
            self.chord = None
        self.hedges = {}  # (their ticks were the old session's)
        if self.engine_until is not None:
            self.engine_until = now
            self.advance(session, now, restate=True)

    def advance(self, session: LiveSession | None, now: float, restate: bool = False) -> None:
        """Schedule up to `now + AHEAD_MS` (at least a bar): the client's messages, and while
        the model plays, the engine's marks."""
        m = self.meter
        if m is None:
            return
        hi = now + max(AHEAD_MS, m.beat_ms * m.per_bar)
        lo = max(self.sent_until, now)
        if hi > lo:
            # (the client hears a restated chord only where its schedule starts again)
            for mk in self._marks(lo, hi, restate=restate and lo == now):
                self._announce(mk)
            self.sent_until = hi
        if self.engine_until is not None and session is not None and self.forced:
            # (not from long ago: a clock that just started would roll back what was played)
            lo = max(self.engine_until, now - STALE_MS)
            if hi > lo:
                tick, tick_ms = self.clock.tick, self.clock.tick_ms
                # The schedule is replaced from a tick on: a mark just before `lo` that rounds
                # to that tick is sent again (else it would be dropped; the engine keeps it).
                from_tick = tick(lo)
                marks = self._marks(min(lo, self.clock.ms(from_tick) - tick_ms), hi, restate)
                ticked = [(tick(mk.time), self._tokens(mk)) for mk in marks]
                session.schedule(from_tick, [m for m in ticked if m[0] >= from_tick])
                self.engine_until = hi

    def retime(self, session: LiveSession | None, new: p.LiveParams, now: float) -> None:
        """New clock or chart parameters: the schedule from now on is laid again (the engine
        rolls back to the first mark that moved; the client's announcements are withdrawn and
        sent again), unless no mark moves (a clock re-anchored on its own beats)."""
        before, old_bars = self.meter, self.bars
        old_marks = self._marks(now, self.sent_until) if before is not None else []
        self._configure(new)
        if self.meter is None and new.chord_source == "chart" and self.engine_until is not None:
            # a chart chosen while the player plays, without a clock: its first bar is now
            self._count(Meter(now, new.beat_ms(), new.beats_per_bar))
        if self.meter is not None and before is None:  # a clock starts: laid from now
            self.sent_until = now
            if self.engine_until is not None:
                self.engine_until = now
            self.advance(session, now, restate=True)
            return
        if self.meter is None:
            if old_marks:
                self.playback.withdraw(now)
            self.sent_until = -math.inf
            return
        new_marks = self._marks(now, self.sent_until) if self.sent_until > now else []
        if _same(old_marks, new_marks):
            return
        self.playback.withdraw(now)
        self.sent_until = now
        if self.engine_until is not None:
            self.engine_until = min(self.engine_until, now)
        self.advance(session, now, restate=self.bars != old_bars)  # a new chart: its chord now

    def _marks(self, lo: float, hi: float, restate: bool = False) -> list[Mark]:
        """The clock's beats and the chart's chords in [lo, hi); `restate`: the chart's chord
        sounding at `lo` is stated there (the model hears the harmony from its first note)."""
        m = self.meter
        assert m is not None
        out: dict[float, Mark] = {}
        for n in m.beats(lo, hi):
            t = m.time(n)
            out[t] = Mark(t, n, n % m.per_bar == 0)
        if self.forced:  # the eighths between the beats: decision points, no tokens
            # (engine.generation.eighth_cuts)
            for n in m.beats(lo - m.beat_ms, hi):
                if lo <= (t := m.time(n + 0.5)) < hi:
                    out[t] = Mark(t)
        if self.following:  # chords read from the melody (`follow_beats`)
            for n in m.beats(lo, hi):
                if (c := self.followed.get(n)) is not None:
                    t = m.time(n)
                    out[t] = Mark(t, out[t].beat, out[t].bar, c)
        if self.bars:
            first_bar = math.floor((m.number + (lo - m.anchor) / m.beat_ms) / m.per_bar)
            last_bar = math.floor((m.number + (hi - m.anchor) / m.beat_ms) / m.per_bar)
            for b in range(max(first_bar, 0), last_bar + 1):
                bar = self.bars[b % len(self.bars)]
                for j, c in enumerate(bar):
                    t = m.time(b * m.per_bar + j * m.per_bar / len(bar))
                    if lo <= t < hi:
                        old = out.get(t, Mark(t))
                        out[t] = Mark(t, old.beat, old.bar, c)
            if (
                restate
                and first_bar >= 0
                and not any(x.chord is not None and x.time <= lo + 1e-6 for x in out.values())
            ):
                out[lo] = Mark(lo, chord=self._chart_chord_at(lo))
        return sorted(out.values(), key=lambda x: x.time)

    def _chart_chord_at(self, t: float) -> int:
        m, bars = self.meter, self.bars
        assert m is not None and bars
        beat = m.number + (t - m.anchor) / m.beat_ms
        b = math.floor(beat / m.per_bar)
        bar = bars[b % len(bars)]
        j = min(int((beat - b * m.per_bar) / (m.per_bar / len(bar)) + 1e-9), len(bar) - 1)
        return bar[j]

    def _tokens(self, mk: Mark) -> list[int]:
        v = self.vocab
        toks = [] if mk.beat is None else [v.BAR if mk.bar else v.BEAT]
        return toks + ([] if mk.chord is None else [v.chord(mk.chord)])

    def _announce(self, mk: Mark) -> None:
        if mk.beat is not None:
            assert self.meter is not None
            bpm = 60_000.0 / self.meter.beat_ms
            self.playback.announce(
                p.Beat(time=mk.time, bar=mk.bar, source="clock", tempo_bpm=round(bpm, 2)),
                scheduled=True,
            )
        if mk.chord is not None:
            source = "chart" if self.bars else "model"  # (else read from the melody)
            msg = p.Chord(time=mk.time, label=chord_label(mk.chord), source=source)
            self.playback.announce(msg, at_once=True, scheduled=True)

    # --- the left hand --------------------------------------------------------------------------
    def left_hand(self, keys: list[int], t: float) -> list[int]:
        """The keys held below the split after one is struck at `t`: a new chord is announced,
        and its CHORD token returned (to give with the key's event; none if the model has no
        such tokens)."""
        c = match_chord(keys)
        if c == 0 or c == self.chord:
            return []
        self.chord = c
        msg = p.Chord(time=t, label=chord_label(c), source="left_hand")
        self.playback.announce(msg, at_once=True, scheduled=True)
        return [self.vocab.chord(c)] if self.forced else []

    # --- the player's melody ---------------------------------------------------------------------
    @property
    def following(self) -> bool:
        """Chords are read from the player's melody (`chord_source: model` on a clock)."""
        return self.params.chord_source == "model" and self.meter is not None and self.forced

    def melody_note(
        self, session: LiveSession | None, pitch: int, t: float, on: bool, now: float
    ) -> list[int]:
        """A melody key struck (`on`) or released at `t`. Struck near a beat while `following`:
        the beat's chord again, from what has been heard of it (its first notes tell most); a
        change goes into the schedule at the beat if the beat is still ahead, else is given
        with the key's event: its CHORD token is returned."""
        m = self.meter
        if not self.following or m is None:
            return []
        if not on:
            for n in self.melody:
                if n[0] == pitch and n[2] == math.inf:
                    n[2] = t
            return []
        self.melody.append([pitch, t, math.inf])
        beat = round(m.number + (t - m.anchor) / m.beat_ms)
        if not -FOLLOW_EARLY_MS <= t - m.time(beat) <= FOLLOW_LATE_MS:
            return []
        read = self._follow(beat, max(t, m.time(beat) + FOLLOW_HEARD_MS))
        if read is None:
            return []
        c, member = read
        self._hedge(session, beat, c, member)
        if c == self.chord:
            return []
        if t < m.time(beat):
            self._change(session, beat, c, now)
            return []
        self.chord = self.followed[beat] = c
        self.followed_beat = max(self.followed_beat, beat)
        msg = p.Chord(time=t, label=chord_label(c), source="model")
        self.playback.announce(msg, at_once=True, scheduled=True)
        return [self.vocab.chord(c)]

    def follow_beats(self, session: LiveSession | None, now: float) -> None:
        """While `following`: the chord of each beat up to `now + FOLLOW_AHEAD_MS`, from the
        melody heard before it (a beat with no note near it gets one too); a change goes into
        the schedule at the beat (the engine rolls back to it if it played past it)."""
        m = self.meter
        if not self.following or m is None or self.engine_until is None:
            return
        beat = math.floor(m.number + (now + FOLLOW_AHEAD_MS - m.anchor) / m.beat_ms)
        if beat <= self.followed_beat:
            return
        self.followed_beat = beat
        # (a beat already past, the first after the player's first note: that note read it)
        if m.time(beat) >= now and (read := self._follow(beat, m.time(beat))) is not None:
            c, member = read
            self._hedge(session, beat, c, member)
            if c != self.chord:
                self._change(session, beat, c, now)

    def _change(self, session: LiveSession | None, beat: int, c: int, now: float) -> None:
        """Chord `c` from beat number `beat` (still ahead): announced, and laid into the
        engine's schedule from that beat."""
        m = self.meter
        assert m is not None
        self.chord = self.followed[beat] = c
        self.followed = {b: x for b, x in self.followed.items() if b > beat - FOLLOW_BEATS}
        msg = p.Chord(time=m.time(beat), label=chord_label(c), source="model")
        self.playback.announce(msg, at_once=True, scheduled=True)
        if self.engine_until is not None:
            self.engine_until = min(self.engine_until, m.time(beat))  # laid again from the beat
            self.advance(session, now)

    def _hedge(
        self, session: LiveSession | None, beat: int, chord: int, member: np.ndarray | None
    ) -> None:
        """From beat number `beat`, while `chord` sounds, the accompaniment plays only its tones
        the follower gives at least `chord_hedge` (`ChordTones.hedges`; the HMM gives no
        chances: the whole chord)."""
        if member is None or not self.params.chord_tones or self.params.chord_hedge <= 0:
            return
        h = (chord, confident_tones(member, chord, self.params.chord_hedge))
        if self.hedges.get(beat) == h:
            return
        # (a later beat's, read ahead before this one's struck note re-read it, stays)
        self.hedges = {b: x for b, x in self.hedges.items() if b > beat - HEDGE_BEATS}
        self.hedges[beat] = h
        if session is not None and self.engine_until is not None:
            session.set_constraint(ChordTones(hedges=self._hedge_ticks()))

    def _hedge_ticks(self) -> tuple[tuple[int, int, int], ...]:
        m = self.meter
        if m is None:
            return ()
        return tuple((self.clock.tick(m.time(b)), c, bits) for b, (c, bits) in self.hedges.items())

    def _follow(self, beat: int, heard: float) -> tuple[int, np.ndarray | None] | None:
        """The chord of beat number `beat`, from the melody heard until `heard` (ms), and the
        chance of each pitch class being its tone (12,): the learned follower's, else
        `follow_chord`'s (no chances: None); None if none was heard."""
        m = self.meter
        assert m is not None
        lo = m.time(beat - FOLLOW_BEATS)
        self.melody = [n for n in self.melody if n[2] > lo]
        numbers = np.arange(beat - FOLLOW_BEATS, beat + 1)  # (B+1,)
        notes = np.array(self.melody).reshape(-1, 3)  # (M, 3)
        pitch, start, end = notes[:, 0], notes[:, 1], np.minimum(notes[:, 2], heard)
        if self.live_follow is None:
            edges = np.append([m.time(b) for b in numbers], max(heard, m.time(beat)))  # (B+2,)
            weights = melody_weights(pitch, start, end, edges)
            if not weights.any():
                return None
            per_bar = np.full(len(numbers), m.per_bar)
            return follow_chord(weights / m.beat_ms, numbers % m.per_bar, per_bar), None
        # the learned twin: the beats not yet in its state go in, then this one is read
        lf = self.live_follow
        if not len(notes):
            return None
        first = lf.pending(beat, FOLLOW_BEATS)
        numbers = np.arange(min(first, beat) - 1, beat + 1)  # (K,) from the beat before
        starts = np.array([m.time(b) for b in numbers])  # (K,)
        whole = melody_weights(pitch, start, end, np.append(starts, starts[-1] + m.beat_ms))
        early = np.stack([starts, starts + FOLLOW_HEARD_MS], axis=1).ravel()  # (2K,)
        heads = melody_weights(pitch, start, end, early)[::2]  # (K, 12) each beat's first 80 ms
        whole, heads = whole / m.beat_ms, heads / m.beat_ms
        for k in range(1, len(numbers) - 1):  # beats first .. beat-1
            n = int(numbers[k])
            lf.commit(n, whole[k - 1], heads[k], n % m.per_bar, m.per_bar)
        return lf.decide(
            beat, whole[-2], heads[-1], heard > m.time(beat), beat % m.per_bar, m.per_bar,
            self.chord or 0,
        )  # fmt: skip

    # --- the model's own --------------------------------------------------------------------------
    def model_marks(self, marks: list[Beat | ChordChange], position: int | None) -> None:
        """The model's own chord or beat (sampled at token `position`)."""
        for ev in marks:
            t = self.clock.ms(ev.tick)
            if isinstance(ev, ChordChange):
                if self.params.chord_source == "model":
                    msg = p.Chord(time=t, label=chord_label(ev.chord), source="model")
                    self.playback.announce(msg, position=position, at_once=True)
            elif self.meter is None and position is not None:
                self.model_beats = [b for b in self.model_beats if b[0] < t][-TEMPO_BEATS:]
                self.model_beats.append((t, position))
                self.tempo_bpm = _tempo(self.model_beats)
                msg = p.Beat(time=t, bar=ev.bar, source="model", tempo_bpm=self.tempo_bpm)
                self.playback.announce(msg, position=position)

    def rollback(self, position: int) -> None:
        """The model's tokens from `position` on are gone: so are its beats there."""
        self.model_beats = [b for b in self.model_beats if b[1] < position]
        self.tempo_bpm = _tempo(self.model_beats)


def _tempo(beats: list[tuple[float, int]]) -> float | None:
    """The tempo of the model's beats: the median spacing of the latest (None: too few)."""
    if len(beats) < 3:
        return None
    gaps = np.diff([b[0] for b in beats])
    gaps = gaps[gaps > 0]
    if not len(gaps):
        return None
    med = float(np.median(gaps))
    while med < 60_000.0 / 300.0:  # eighth notes marked as beats: half the tempo
        med *= 2
    while med > 60_000.0 / 20.0:
        med /= 2
    return round(60_000.0 / med, 1)


def _same(a: list[Mark], b: list[Mark]) -> bool:
    return len(a) == len(b) and all(
        x.bar == y.bar and x.chord == y.chord and abs(x.time - y.time) < RETIME_TOLERANCE_MS
        for x, y in zip(a, b, strict=True)
    )
