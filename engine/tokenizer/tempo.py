"""A MIDI file's tempo map and time signatures: seconds <-> ticks, its beats, and writing it back.

Output MIDI keeps the input's tempo map (a continuation of a 90-bpm song lines up with the bars
in a DAW); from scratch, a steady tempo at the bpm asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import mido
import numpy as np

from .harmony import BAR, BEAT, Marks, beats_from_tempo_map
from .notes import MidiLike, _load_bytes, ticks_to_seconds

DEFAULT_MSPQ = 500_000  # 120 bpm, MIDI's default


@dataclass(frozen=True)
class TempoMap:
    tpq: int  # ticks per quarter note
    tempo_ticks: np.ndarray  # (K,) int64, sorted, starting at 0
    tempo_mspq: np.ndarray  # (K,) int64 microseconds per quarter note
    sig_ticks: np.ndarray  # (S,) int64 time-signature changes (may be empty: 4/4)
    sig_num: np.ndarray  # (S,) int64
    sig_den: np.ndarray  # (S,) int64

    @classmethod
    def steady(cls, bpm: float, beats_per_bar: int = 4, tpq: int = 480) -> TempoMap:
        if not 20 <= bpm <= 400:
            raise ValueError(f"bpm must be in 20..400, got {bpm}")
        if not 1 <= beats_per_bar <= 16:
            raise ValueError(f"beats_per_bar must be in 1..16, got {beats_per_bar}")
        one = np.zeros(1, np.int64)
        return cls(
            tpq,
            one,
            np.array([round(60e6 / bpm)], np.int64),
            one,
            np.array([beats_per_bar], np.int64),
            np.array([4], np.int64),
        )

    @classmethod
    def from_midi(cls, midi: MidiLike) -> TempoMap | None:
        """The file's tempo map; None if it has neither tempo nor time-signature events (or
        cannot be read: the notes' reader says why)."""
        from symusic import Score

        try:
            data = _load_bytes(midi)
            score = Score.from_midi(data, sanitize_data=True)
        except Exception:
            return None
        # symusic reports a default 120 bpm for a file without tempo events: look for the meta
        # events themselves (set_tempo FF 51 03, time_signature FF 58 04)
        if b"\xff\x51\x03" not in data and b"\xff\x58\x04" not in data:
            return None
        tpq = int(score.ticks_per_quarter)
        if tpq <= 0:
            return None
        tempos = score.tempos.numpy()
        t_ticks = tempos["time"].astype(np.int64)
        t_mspq = np.where(tempos["mspq"] > 0, tempos["mspq"], DEFAULT_MSPQ).astype(np.int64)
        order = np.argsort(t_ticks, kind="stable")
        t_ticks, t_mspq = t_ticks[order], t_mspq[order]
        if len(t_ticks) == 0 or t_ticks[0] > 0:
            t_ticks = np.concatenate([[0], t_ticks])
            t_mspq = np.concatenate([[DEFAULT_MSPQ], t_mspq])
        sigs = score.time_signatures.numpy()
        s = np.argsort(sigs["time"], kind="stable")
        return cls(
            tpq,
            t_ticks,
            t_mspq,
            sigs["time"][s].astype(np.int64),
            sigs["numerator"][s].astype(np.int64),
            sigs["denominator"][s].astype(np.int64),
        )

    def seconds(self, ticks: np.ndarray) -> np.ndarray:
        return ticks_to_seconds(
            np.asarray(ticks, np.int64), self.tempo_ticks, self.tempo_mspq, self.tpq
        )

    def ticks(self, seconds: np.ndarray) -> np.ndarray:
        """Seconds -> the nearest ticks (the inverse of `seconds`)."""
        sec = np.asarray(seconds, np.float64)
        sec_per_tick = self.tempo_mspq.astype(np.float64) * 1e-6 / self.tpq
        seg_start = self.seconds(self.tempo_ticks)
        idx = np.maximum(np.searchsorted(seg_start, sec, side="right") - 1, 0)
        return np.rint(self.tempo_ticks[idx] + (sec - seg_start[idx]) / sec_per_tick[idx]).astype(
            np.int64
        )

    def bpm_at(self, seconds: float) -> float:
        i = int(np.searchsorted(self.seconds(self.tempo_ticks), seconds, side="right")) - 1
        return 60e6 / float(self.tempo_mspq[max(i, 0)])

    def beats(self, until: float) -> Marks:
        """BAR/BEAT marks from 0 to `until` seconds."""
        end_tick = int(self.ticks(np.array([until]))[0])
        rows = beats_from_tempo_map(self.tpq, self.sig_ticks, self.sig_num, self.sig_den, end_tick)
        secs = self.seconds(rows[:, 0]) if len(rows) else np.zeros(0)
        keep = secs < until
        kinds = np.where(rows[keep, 1] > 0, BAR, BEAT) if len(rows) else np.zeros(0, np.int8)
        return Marks.build(secs[keep], kinds, np.zeros(int(keep.sum())))

    def meta_events(self) -> list[tuple[int, mido.MetaMessage]]:
        """(tick, message) of the tempo and time-signature events, for a file's first track."""
        out = [
            (int(t), mido.MetaMessage("set_tempo", tempo=int(min(m, 0xFFFFFF))))
            for t, m in zip(self.tempo_ticks, self.tempo_mspq, strict=True)
        ]
        for t, n, d in zip(self.sig_ticks, self.sig_num, self.sig_den, strict=True):
            if 1 <= n <= 255 and d >= 1 and d & (d - 1) == 0:  # mido: a power-of-two denominator
                out.append(
                    (
                        int(t),
                        mido.MetaMessage("time_signature", numerator=int(n), denominator=int(d)),
                    )
                )
        return out
