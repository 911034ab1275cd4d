"""`TempoFollower`: MIDI clock (24 per quarter note) -> tempo and beat phase."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class TempoFollower:
    """MIDI clock (0xF8, 24 per quarter note) -> tempo and beat phase.

    `on_tempo(bpm, beat_ms)` is called when the tempo has moved by `min_change` bpm (at most
    every `min_interval_ms`), and on every `report_beats`-th beat to re-anchor the grid.
    `beat_ms` is the time of the latest beat, known only after a start (0xFA: the first clock
    that follows is beat 1); None after a continue (the song position is not tracked) or a stop,
    which keeps the last tempo but ends the grid: nobody keeps time then."""

    def __init__(
        self,
        on_tempo: Callable[[float, float | None], None],
        min_change: float = 0.5,
        min_interval_ms: float = 250.0,
        window: int = 24,
        report_beats: int = 4,
    ) -> None:
        self.on_tempo = on_tempo
        self.min_change = min_change
        self.min_interval_ms = min_interval_ms
        self.report_beats = report_beats
        self.ticks: deque[float] = deque(maxlen=window + 1)
        self.bpm: float | None = None  # last reported
        self.beat_ms: float | None = None  # the latest beat, when the phase is known
        self.running = False
        self._count: int | None = None  # clocks since start (None: phase unknown)
        self._last_report = -1e18
        self._phase_sent = False  # a report carried the current beat phase

    def feed(self, kind: str, t_ms: float) -> None:
        if kind in ("start", "continue"):
            self.running = True
            self.ticks.clear()
            self._count = -1 if kind == "start" else None
            self.beat_ms = None
        elif kind == "stop":
            self.running = False
            self.ticks.clear()
            self._count = None
            if self.beat_ms is not None:
                self.beat_ms = None
                if self.bpm is not None:
                    self._report(self.bpm, t_ms)
        elif kind == "clock":
            self.ticks.append(t_ms)
            anchor = False
            if self._count is not None:
                self._count += 1
                if self._count % 24 == 0:
                    self.beat_ms = t_ms
                    beat = self._count // 24
                    anchor = not self._phase_sent or beat % self.report_beats == 0
            if len(self.ticks) < 7:  # a quarter of a beat: enough for a first estimate
                return
            span = self.ticks[-1] - self.ticks[0]
            if span <= 0:
                return
            bpm = 60_000.0 / (span / (len(self.ticks) - 1) * 24)
            bpm = min(300.0, max(20.0, round(bpm, 1)))  # the protocol's range
            moved = self.bpm is None or abs(bpm - self.bpm) >= self.min_change
            if moved and t_ms - self._last_report >= self.min_interval_ms:
                self._report(bpm, t_ms)
            elif self.beat_ms is not None and (anchor or not self._phase_sent):
                self._report(self.bpm if self.bpm is not None else bpm, t_ms)

    def _report(self, bpm: float, t_ms: float) -> None:
        self.bpm = bpm
        self._last_report = t_ms
        self._phase_sent = self.beat_ms is not None
        self.on_tempo(bpm, self.beat_ms)
