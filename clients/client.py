"""`Client`: the HTTP API (continue, infill, accompany) from Python, with httpx.

    from improv.clients import Client
    with Client("http://127.0.0.1:8000") as c:
        out = c.continue_("song.mid", seconds=8, temperature=0.9)   # a mido.MidiFile
        out.save("continued.mid")

Errors raise `ImprovError` carrying the HTTP status and the server's JSON message.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import mido

logger = logging.getLogger(__name__)

MidiInput = str | os.PathLike | bytes | mido.MidiFile


class ImprovError(RuntimeError):
    """The server refused a request: `status` (HTTP) and `message` (its `detail`)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


def midi_to_bytes(midi: MidiInput) -> bytes:
    """A path, raw bytes or a mido.MidiFile as Standard MIDI File bytes."""
    if isinstance(midi, bytes):
        return midi
    if isinstance(midi, mido.MidiFile):
        buf = io.BytesIO()
        midi.save(file=buf)
        return buf.getvalue()
    with open(midi, "rb") as f:
        return f.read()


def _csv(value: Sequence[str] | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return ",".join(value)


def _harmony(
    chords: str | None,
    beats: str | Sequence[float] | None,
    bpm: float | None,
    bpb: int | None,
    chord_tones: bool | None,
) -> dict[str, Any]:
    """The harmony and meter form fields (beat times may be given as numbers)."""
    if beats is not None and not isinstance(beats, str):
        beats = "\n".join(f"{float(t):.6f}" for t in beats)
    return {
        "chords": chords,
        "beats": beats,
        "bpm": bpm,
        "beats_per_bar": bpb,
        "chord_tones": chord_tones,
    }


def _programs(value: Mapping[str, int] | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return ",".join(f"{k}={int(v)}" for k, v in value.items())


class Client:
    """A synchronous client of one server. `token`: the server's --token (sent as Bearer)."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- info ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._check(self._http.get("/health")).json()

    def model(self) -> dict[str, Any]:
        return self._check(self._http.get("/v1/model")).json()

    # --- generation ---------------------------------------------------------------------------
    def continue_(
        self,
        midi: MidiInput,
        seconds: float = 8.0,
        temperature: float = 1.0,
        top_p: float = 0.95,
        seed: int | None = None,
        parts: Sequence[str] | str | None = None,
        programs: Mapping[str, int] | str | None = None,
        *,
        chords: str | None = None,
        beats: str | Sequence[float] | None = None,
        bpm: float | None = None,
        beats_per_bar: int | None = None,
        chord_tones: bool | None = None,
    ) -> mido.MidiFile:
        """The prompt followed by `seconds` of continuation. `chords`: a chart ('C Am F G',
        '| C | Am F |', laid on the beats) or chord-lab lines ('0.0 2.0 C:maj'); `beats`: beat
        times (s) or lines 'seconds [1 if downbeat]'; `bpm`: steady beats from time 0. Default:
        the file's tempo map, and the model's own chords (returned as MIDI markers).
        `chord_tones=False`: harmony and bass may leave the chord (default: they keep to it where
        chords are given, and in accompaniment)."""
        return self._generate(
            "/v1/continue",
            midi,
            seconds=seconds,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            parts=_csv(parts),
            programs=_programs(programs),
            **_harmony(chords, beats, bpm, beats_per_bar, chord_tones),
        )

    def infill(
        self,
        midi: MidiInput,
        start: float,
        end: float,
        parts: Sequence[str] | str | None = None,
        temperature: float = 1.0,
        top_p: float = 0.95,
        seed: int | None = None,
        *,
        chords: str | None = None,
        beats: str | Sequence[float] | None = None,
        bpm: float | None = None,
        beats_per_bar: int | None = None,
        chord_tones: bool | None = None,
    ) -> mido.MidiFile:
        """The file with [start, end) seconds regenerated (everything outside is kept); chords
        and beats as for `continue_`."""
        return self._generate(
            "/v1/infill",
            midi,
            start=start,
            end=end,
            parts=_csv(parts),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            **_harmony(chords, beats, bpm, beats_per_bar, chord_tones),
        )

    def accompany(
        self,
        midi: MidiInput,
        parts: Sequence[str] | str | None = None,
        drums: bool = False,
        programs: Mapping[str, int] | str | None = None,
        temperature: float = 1.0,
        top_p: float = 0.95,
        seed: int | None = None,
        *,
        chords: str | None = None,
        beats: str | Sequence[float] | None = None,
        bpm: float | None = None,
        beats_per_bar: int | None = None,
        chord_tones: bool | None = None,
    ) -> mido.MidiFile:
        """The melody plus generated accompaniment parts; chords and beats as for `continue_`."""
        return self._generate(
            "/v1/accompany",
            midi,
            parts=_csv(parts),
            drums=drums,
            programs=_programs(programs),
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            **_harmony(chords, beats, bpm, beats_per_bar, chord_tones),
        )

    def _generate(self, path: str, midi: MidiInput, **form: Any) -> mido.MidiFile:
        data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}
        data = {k: v for k, v in data.items() if v != "None"}
        files = {"file": ("input.mid", midi_to_bytes(midi), "audio/midi")}
        r = self._check(
            self._http.post(path, data=data, files=files, headers={"Accept": "audio/midi"})
        )
        return mido.MidiFile(file=io.BytesIO(r.content))

    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        body: Any = None
        message = r.text
        try:
            body = r.json()
            detail = body.get("detail", body) if isinstance(body, dict) else body
            message = detail if isinstance(detail, str) else str(detail)
        except ValueError:
            pass
        raise ImprovError(r.status_code, message, body)
