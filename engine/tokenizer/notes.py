"""Notes as columns of numpy arrays, and reading them from MIDI files (symusic) with part assignment.

Reading applies the tokenizer's musical normalisation, shared with the stream encoder:
sustain pedal folded into note-offs, drum notes mapped to GM, times in float64 seconds.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import mido
import numpy as np

from .vocab import TokenizerConfig

if TYPE_CHECKING:
    from .harmony import Marks
    from .tempo import TempoMap

MidiLike = str | Path | bytes | bytearray | mido.MidiFile


class MidiReadError(ValueError):
    """A MIDI file could not be read; the message says why. The one exception `encode` raises
    for bad input (a 4xx for the server)."""


class Note(NamedTuple):
    start: float  # seconds
    end: float  # seconds
    pitch: int  # 0..127 (GM drum key for the drums part)
    velocity: int  # 1..127
    part: int  # index into TokenizerConfig.parts
    program: int  # GM program 0..127


@dataclass
class Notes:
    """A set of notes as parallel arrays (column layout keeps encoding vectorized)."""

    start: np.ndarray  # (N,) float64 seconds
    end: np.ndarray  # (N,) float64 seconds
    pitch: np.ndarray  # (N,) int16
    velocity: np.ndarray  # (N,) int16
    part: np.ndarray  # (N,) int16
    program: np.ndarray  # (N,) int16
    # (N,) bool: the end is a sustain-pedal release. Only orders note-offs that fall at one instant
    # (pedal releases come after plain key releases, as they do in a live stream).
    sustained: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.sustained is None:
            self.sustained = np.zeros(len(self.start), dtype=bool)

    @classmethod
    def empty(cls) -> Notes:
        return cls.from_list([])

    @classmethod
    def from_list(cls, notes: Iterable[Note | Sequence]) -> Notes:
        rows = [tuple(n) for n in notes]
        cols = list(zip(*rows, strict=True)) if rows else [()] * 6
        return cls(
            start=np.asarray(cols[0], dtype=np.float64),
            end=np.asarray(cols[1], dtype=np.float64),
            pitch=np.asarray(cols[2], dtype=np.int16),
            velocity=np.asarray(cols[3], dtype=np.int16),
            part=np.asarray(cols[4], dtype=np.int16),
            program=np.asarray(cols[5], dtype=np.int16),
        )

    @classmethod
    def concat(cls, parts: Sequence[Notes]) -> Notes:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def __len__(self) -> int:
        return len(self.start)

    def select(self, mask: np.ndarray) -> Notes:
        return Notes(*(getattr(self, f.name)[mask] for f in fields(self)))

    def sorted(self) -> Notes:
        """Sorted by onset, then part, then pitch."""
        order = np.lexsort((self.pitch, self.part, self.start))
        return self.select(order)

    def shifted(self, seconds: float) -> Notes:
        n = self.select(slice(None))
        n.start = n.start + seconds
        n.end = n.end + seconds
        return n

    def to_list(self) -> list[Note]:
        return [
            Note(float(s), float(e), int(p), int(v), int(pt), int(pr))
            for s, e, p, v, pt, pr in zip(
                self.start.tolist(),
                self.end.tolist(),
                self.pitch.tolist(),
                self.velocity.tolist(),
                self.part.tolist(),
                self.program.tolist(),
                strict=True,
            )
        ]

    @property
    def duration(self) -> float:
        return float(self.end.max()) if len(self) else 0.0


# --- part assignment ---------------------------------------------------------------------------

# (track-name pattern, part) tried in order; the first match wins. Then programs decide.
DEFAULT_PART_RULES: tuple[tuple[str, str], ...] = (
    (r"drum|perc|kit", "drums"),
    (r"melod|lead|vocal|voice|vox|sing|solo", "lead"),
    (r"bridge|counter|second", "counter"),
    (r"bass", "bass"),
    (r"piano|chord|harm|acc|pad|key|guitar|string|organ|comp", "harmony"),
)
BASS_PROGRAMS = range(32, 40)


@dataclass(frozen=True)
class TrackInfo:
    index: int
    name: str
    program: int
    is_drum: bool
    n_notes: int


def assign_parts(
    tracks: Sequence[TrackInfo],
    config: TokenizerConfig,
    parts: str | Mapping[str | int, str] | None = None,
    rules: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The part of each track.

    `parts` overrides: one part name for every pitched track (e.g. "lead" for a melody file), or
    a mapping from track index or exact track name to part. Otherwise: drum tracks -> drums; the
    first matching name rule (`rules` first, then the defaults); bass programs -> bass; the rest ->
    harmony; and if no track is the lead and exactly one pitched, non-bass track exists, it is the
    lead (a solo performance is the player's part).
    """
    valid = set(config.parts)
    out: list[str | None] = [None] * len(tracks)
    for i, t in enumerate(tracks):
        if t.is_drum:
            out[i] = "drums"
        elif isinstance(parts, str):
            out[i] = parts
        elif parts is not None:
            out[i] = parts.get(t.index, parts.get(t.name))
    if isinstance(parts, str) or parts is not None and all(o is not None for o in out):
        assigned = out
    else:
        unnamed: list[int] = []
        for i, t in enumerate(tracks):
            if out[i] is not None:
                continue
            for pattern, part in (*rules, *DEFAULT_PART_RULES):
                if re.search(pattern, t.name, re.IGNORECASE):
                    out[i] = part
                    break
            else:
                if t.program in BASS_PROGRAMS:
                    out[i] = "bass"
                else:
                    out[i] = "harmony"
                    unnamed.append(i)
        pitched = [i for i, p in enumerate(out) if p not in ("drums", "bass")]
        if "lead" not in out and len(pitched) == 1 and pitched[0] in unnamed:
            out[pitched[0]] = "lead"
        assigned = out
    for p in assigned:
        if p not in valid:
            raise ValueError(f"unknown part {p!r}; parts are {sorted(valid)}")
    return [str(p) for p in assigned]


# --- reading ------------------------------------------------------------------------------------


def _load_bytes(midi: MidiLike) -> bytes:
    if isinstance(midi, bytes | bytearray):
        return bytes(midi)
    if isinstance(midi, mido.MidiFile):
        buf = io.BytesIO()
        try:
            midi.save(file=buf)
        except (ValueError, TypeError, OSError) as e:
            raise MidiReadError(f"cannot serialise the mido.MidiFile: {e}") from e
        return buf.getvalue()
    path = Path(midi)
    try:
        return path.read_bytes()
    except OSError as e:
        raise MidiReadError(f"cannot read {path}: {e.strerror or e}") from e


def ticks_to_seconds(
    ticks: np.ndarray, tempo_ticks: np.ndarray, tempo_mspq: np.ndarray, tpq: int
) -> np.ndarray:
    """Absolute ticks -> float64 seconds through a tempo map (piecewise linear)."""
    if len(tempo_ticks) == 0 or tempo_ticks[0] > 0:
        tempo_ticks = np.concatenate([[0], tempo_ticks])
        tempo_mspq = np.concatenate([[500_000], tempo_mspq])
    sec_per_tick = tempo_mspq.astype(np.float64) * 1e-6 / tpq
    seg_start = np.concatenate([[0.0], np.cumsum(np.diff(tempo_ticks) * sec_per_tick[:-1])])
    idx = np.searchsorted(tempo_ticks, ticks, side="right") - 1
    return seg_start[idx] + (ticks - tempo_ticks[idx]) * sec_per_tick[idx]


MAX_FILE_SECONDS = 4 * 3600  # longer is a broken file, not a piece


def read_notes(
    midi: MidiLike,
    config: TokenizerConfig,
    parts: str | Mapping[str | int, str] | None = None,
    rules: Sequence[tuple[str, str]] = (),
    max_notes: int | None = None,
    max_seconds: float | None = None,
) -> tuple[Notes, list[TrackInfo], list[str]]:
    """Parse a MIDI file into normalised notes. Raises MidiReadError for unreadable input, and
    for more than `max_notes` notes or a note ending after `max_seconds` (checked on the parsed
    arrays, before any per-note work: a server's cheap bound on a request).

    Normalisation (the same rules as the stream encoder): sustain pedal extends notes released
    while it is down to the pedal release; drum keys go through `config.drum_map`.
    """
    from symusic import Score  # C++ parser: ~100x faster than mido on real files

    data = _load_bytes(midi)
    if len(data) == 0:
        raise MidiReadError("empty file")
    try:
        score = Score.from_midi(data, sanitize_data=True)
    except Exception as e:  # symusic raises RuntimeError subclasses with a reason
        msg = str(e).replace("MiniMidi: ", "").replace(": iostream error", "")
        raise MidiReadError(f"not a readable MIDI file: {msg}") from e
    tpq = int(score.ticks_per_quarter)
    if tpq <= 0:
        raise MidiReadError(f"unsupported time division (ticks per quarter {tpq})")
    tempos = score.tempos.numpy()
    t_ticks = tempos["time"].astype(np.int64)
    t_mspq = tempos["mspq"].astype(np.int64)
    order = np.argsort(t_ticks, kind="stable")
    t_ticks, t_mspq = t_ticks[order], t_mspq[order]
    t_mspq = np.where(t_mspq > 0, t_mspq, 500_000)

    infos = [
        TrackInfo(i, str(t.name), int(t.program), bool(t.is_drum), len(t.notes))
        for i, t in enumerate(score.tracks)
    ]
    total = sum(i.n_notes for i in infos)
    if max_notes is not None and total > max_notes:
        raise MidiReadError(f"the file has {total} notes; at most {max_notes} are accepted")
    names = assign_parts(infos, config, parts, rules)
    part_index = {p: i for i, p in enumerate(config.parts)}
    drum_lut = np.arange(128, dtype=np.int16)
    for k, v in config.drum_map.items():
        drum_lut[k] = v

    chunks: list[Notes] = []
    for track, info, part in zip(score.tracks, infos, names, strict=True):
        if info.n_notes == 0:
            continue
        arr = track.notes.numpy()
        start_t = arr["time"].astype(np.int64)
        end_t = start_t + np.maximum(arr["duration"].astype(np.int64), 0)
        start = ticks_to_seconds(start_t, t_ticks, t_mspq, tpq)
        end = ticks_to_seconds(end_t, t_ticks, t_mspq, tpq)
        if len(start) and (start.min() < 0 or end.max() > MAX_FILE_SECONDS):
            # the parser's 32-bit ticks wrap on absurd delta times (a 28-bit delta at 1 tick
            # per quarter is years): refuse the file rather than encode a negative time
            raise MidiReadError(
                f"note times must be within 0..{MAX_FILE_SECONDS // 3600} h of the start; "
                f"track {info.index} has a note at {float(start.min() if start.min() < 0 else end.max()):.0f} s "
                "(corrupt or absurd delta times)"
            )
        if max_seconds is not None and len(end) and end.max() > max_seconds:
            raise MidiReadError(
                f"the music must be at most {max_seconds:g} s long; it runs to {float(end.max()):.1f} s"
            )
        pitch = arr["pitch"].astype(np.int16)
        sustained = None
        if part == "drums":
            pitch = drum_lut[pitch]
        elif len(track.controls):
            pedal = pedal_intervals(track.controls.numpy())
            if pedal is not None:
                p0 = ticks_to_seconds(pedal[0], t_ticks, t_mspq, tpq)
                p1 = ticks_to_seconds(pedal[1], t_ticks, t_mspq, tpq)
                p1[pedal[1] == PEDAL_NEVER_UP] = np.inf  # the tail cap ends its notes
                end, sustained = fold_sustain(end, p0, p1, config.max_sustain_ms / 1000)
        n = len(start)
        chunks.append(
            Notes(
                start=start,
                end=end,
                pitch=pitch,
                velocity=np.clip(arr["velocity"].astype(np.int16), 1, 127),
                part=np.full(n, part_index[part], dtype=np.int16),
                program=np.full(n, info.program, dtype=np.int16),
                sustained=sustained,
            )
        )
    return Notes.concat(chunks), infos, names


PEDAL_NEVER_UP = np.iinfo(np.int64).max // 4


def pedal_intervals(controls: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(down ticks, up ticks) of the sustain pedal from a track's control changes.

    Built from CC64 itself: symusic 0.6's `track.pedals` reports wrong start times. A pedal never
    released ends at PEDAL_NEVER_UP (its notes ring for the tail cap, as in a live stream).
    """
    sel = controls["number"] == 64
    if not sel.any():
        return None
    ticks = controls["time"][sel].astype(np.int64)
    down = controls["value"][sel] >= 64
    prev = np.concatenate([[False], down[:-1]])
    starts = ticks[down & ~prev]
    ends = ticks[~down & prev]
    if len(ends) < len(starts):  # never released
        ends = np.concatenate([ends, [PEDAL_NEVER_UP]])
    return starts, ends


def fold_sustain(
    end: np.ndarray, pedal_on: np.ndarray, pedal_off: np.ndarray, max_sustain: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Notes released while the pedal is down (on < end <= off) ring until the pedal lifts, at
    most `max_sustain` seconds past the release. Returns the new ends and which were held.

    The bounds match the stream encoder fed in canonical order (note-offs before pedal changes at
    one instant): a key released at the instant the pedal goes down is not held; one released at
    the instant it lifts is held and released with it.
    """
    order = np.argsort(pedal_on, kind="stable")
    pedal_on, pedal_off = pedal_on[order], pedal_off[order]
    idx = np.searchsorted(pedal_on, end, side="left") - 1  # last pedal with on < end
    ok = idx >= 0
    held = np.zeros(len(end), dtype=bool)
    held[ok] = end[ok] <= pedal_off[idx[ok]]
    out = end.copy()
    out[held] = np.minimum(pedal_off[idx[held]], end[held] + max_sustain)
    return out, held


# --- writing ------------------------------------------------------------------------------------

TICKS_PER_BEAT = 500  # with 120 bpm: 1 tick = 1 ms, so token times land exactly on MIDI ticks
TEMPO = 500_000


def notes_to_midi(
    notes: Notes,
    config: TokenizerConfig,
    min_duration: float = 0.01,
    tempo: TempoMap | None = None,
    chords: Marks | None = None,
) -> mido.MidiFile:
    """Notes -> a type-1 MIDI file: a tempo track, then one track per part named for the part
    (so reading it back assigns the same parts), drums on channel 10.

    `tempo`: the tempo map and time signatures to write (default 120 bpm, where 1 tick is 1 ms);
    `chords`: chord changes, written as marker events named by their Harte label (`A:min`). A key
    struck again while its earlier note still sounds ends that note at the new onset: one
    channel cannot sound a key twice, and a DAW pairs the note-offs otherwise."""
    from .harmony import CHORD, chord_label
    from .stream import part_channel

    drums = config.parts.index("drums")
    if tempo is None:
        tpq = TICKS_PER_BEAT
        ticks_per_second = TICKS_PER_BEAT * 1_000_000 / TEMPO

        def to_ticks(sec: np.ndarray) -> np.ndarray:
            return np.round(sec * ticks_per_second).astype(np.int64)

        meta_events = [(0, mido.MetaMessage("set_tempo", tempo=TEMPO))]
    else:
        tpq, to_ticks, meta_events = tempo.tpq, tempo.ticks, tempo.meta_events()
    mf = mido.MidiFile(type=1, ticks_per_beat=tpq)
    if chords is not None and len(chords):
        ch_marks = chords.select(chords.kind == CHORD)
        for t, v in zip(to_ticks(ch_marks.time).tolist(), ch_marks.value.tolist(), strict=True):
            meta_events.append((int(t), mido.MetaMessage("marker", text=chord_label(int(v)))))
    meta_events.sort(key=lambda e: e[0])
    meta = mido.MidiTrack()
    last_tick = 0
    for tick, msg in meta_events:
        meta.append(msg.copy(time=max(tick - last_tick, 0)))
        last_tick = max(tick, last_tick)
    mf.tracks.append(meta)
    for part_idx, part_name in enumerate(config.parts):
        sel = notes.select(notes.part == part_idx)
        if len(sel) == 0:
            continue
        ch = part_channel(part_idx, drums)
        start = to_ticks(sel.start)
        end = to_ticks(np.maximum(sel.end, sel.start + min_duration))
        end = np.maximum(end, start + 1)
        # a re-struck key ends the note that still sounds (same pitch, this channel)
        by_key = np.lexsort((start, sel.pitch))
        k0, k1 = by_key[:-1], by_key[1:]
        # (drum hits are fixed-length strokes: two at one tick stay two, as the tokens have them)
        over = (sel.pitch[k0] == sel.pitch[k1]) & (end[k0] > start[k1]) & (part_idx != drums)
        end[k0[over]] = np.maximum(start[k1[over]], start[k0[over]])
        # (tick, order, message): at one tick, program changes, then note-offs, then note-ons
        events: list[tuple[int, int, mido.Message]] = []
        if part_idx != drums:
            order = np.argsort(sel.start, kind="stable")
            last = None
            for i in order.tolist():
                prog = int(sel.program[i])
                if prog != last:
                    events.append(
                        (int(start[i]), 0, mido.Message("program_change", channel=ch, program=prog))
                    )
                    last = prog
        for s_, e, p, v in zip(
            start.tolist(), end.tolist(), sel.pitch.tolist(), sel.velocity.tolist(), strict=True
        ):
            if e <= s_ and part_idx != drums:
                continue  # two notes of one key at one tick: the later one sounds
            events.append((s_, 2, mido.Message("note_on", channel=ch, note=p, velocity=v)))
            events.append((e, 1, mido.Message("note_off", channel=ch, note=p, velocity=0)))
        events.sort(key=lambda x: (x[0], x[1]))
        track = mido.MidiTrack([mido.MetaMessage("track_name", name=part_name, time=0)])
        last_tick = 0
        for tick, _, msg in events:
            track.append(msg.copy(time=tick - last_tick))
            last_tick = tick
        mf.tracks.append(track)
    return mf
