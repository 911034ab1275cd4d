"""WebSocket `/v1/live` messages: one pydantic model per message, tagged by `type`.

Every frame is one JSON text object with a `type`. Times are milliseconds on the session clock
(0 = when the connection was accepted). MIDI travels as raw bytes (the Web MIDI / rtmidi shape).
docs/protocol.md is generated from these models (`python -m improv.protocol.doc`), and
tests/protocol/test_messages.py checks that it is up to date.

The same models drive an in-process session (the server's `LiveConnection`): a MIDI port
session feeds `ClientMessage`s to `handle()` and receives `ServerMessage`s through its `send`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

PartName = Literal["lead", "counter", "harmony", "bass", "drums"]
Mode = Literal["respond", "accompany"]
ChordSource = Literal["chart", "left_hand", "model"]
GRID_DIVISIONS = {"1/4": 1, "1/8": 2, "1/16": 4, "1/8t": 3, "1/16t": 6}  # points per beat

# Limits shared by validation, `GET /v1/model` and the docs.
# What accompany plays unless `parts` says otherwise: the default model's piano part. It has
# never heard a bass (POP909 has none), and its counter lines play ~8x the real BRIDGE's notes
# (3 against 0.36 notes/s on 10 validation songs): both are there to ask for, not the default.
ACCOMPANY_PARTS = ["harmony"]
MAX_FRAME_BYTES = 65_536  # a larger text frame is refused with an error (code "too_large")
MAX_LOOKAHEAD_MS = 2_000
MAX_RESPONSE_SECONDS = 60.0
MAX_TIME_AHEAD_MS = 1_000
PLAYER_BASS_PROGRAM = 33  # the player's bass line (bass_split) is heard by the model as a bass
LEFT_HAND_SPLIT = 60  # chord_source "left_hand" without bass_split: the keys below middle C
MAX_CHART_CHARS = 2_000  # a chord chart longer than this is refused


class _Message(BaseModel):
    # Unknown fields are errors, so a typo ("temprature") is reported instead of ignored.
    model_config = ConfigDict(extra="forbid")


# --- parameters ---------------------------------------------------------------------------------
class LiveParams(_Message):
    """Session parameters. In `start` every field has its default; in `params` only the fields
    sent change (the others keep their current values)."""

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(
        None, ge=0, le=2**62, description="sampling seed; null = random (fixed for the session)"
    )
    lookahead_ms: int = Field(
        100,
        ge=0,
        le=MAX_LOOKAHEAD_MS,
        description="the server sends each generated event this long before its time; a larger "
        "value hides network jitter but more events may be retracted",
    )
    parts: list[PartName] | None = Field(
        None,
        min_length=1,
        description="parts the model plays; null = respond: ['lead'], accompany: "
        "['harmony'] (+ 'drums' when drums is true)",
    )
    drums: bool = Field(False, description="accompany: add a drum part (ignored if parts is set)")
    programs: dict[PartName, int] = Field(
        default_factory=dict,
        description="GM program (0..127) per generated part, e.g. {'bass': 33}; parts not named: "
        "the model chooses",
    )
    player_program: int = Field(
        0, ge=0, le=127, description="GM program the player's part is recorded with"
    )
    max_notes_per_second: float | None = Field(
        None, gt=0.0, le=50.0, description="cap on generated note-ons per second; null = none"
    )
    pitch_low: int = Field(0, ge=0, le=127, description="lowest generated pitch (not drums)")
    pitch_high: int = Field(127, ge=0, le=127, description="highest generated pitch (not drums)")
    # respond mode
    gap_ms: int = Field(
        500,
        ge=50,
        le=10_000,
        description="respond: the model answers after the player has released every key and "
        "been silent this long",
    )
    response_seconds: float = Field(
        4.0, gt=0.0, le=MAX_RESPONSE_SECONDS, description="respond: length of a response"
    )
    response_beats: float | None = Field(
        None,
        gt=0.0,
        le=128.0,
        description="respond: length in beats at `tempo_bpm` (overrides response_seconds)",
    )
    tempo_bpm: float = Field(
        120.0, ge=20.0, le=300.0, description="tempo for response_beats and the grid"
    )
    beat_time: float | None = Field(
        None,
        ge=-1e12,
        le=1e12,
        description="session time (ms) of a beat of a tempo someone else keeps (the bridge sends "
        "the DAW's MIDI clock beats); with tempo_bpm it puts generated notes on `grid`; null = "
        "no grid, the model's own timing",
    )
    grid: Literal["off", "1/4", "1/8", "1/16", "1/8t", "1/16t"] = Field(
        "1/16",
        description="while beat_time is set: generated notes start and end on this subdivision "
        "of the beat (t: triplets); off = the model's own timing",
    )
    # accompany mode
    horizon_ms: int = Field(
        300,
        ge=20,
        le=5_000,
        description="accompany: how far past now the model samples, assuming what the player "
        "will do; raised to lookahead_ms + 50 if smaller",
    )
    bass_split: int | None = Field(
        None,
        ge=1,
        le=127,
        description="accompany: the player's notes below this key (MIDI note number, e.g. 48 = "
        "C3) are a bass line (the left hand names the chords) that the model's accompaniment "
        "follows, the rest the melody; the model plays no bass then. null = every note is the "
        "melody",
    )
    rest_ms: int | None = Field(
        6_000,
        ge=500,
        le=600_000,
        description="accompany: after the player has released every key and been silent this "
        "long, the accompaniment ends (its notes off) and waits for the player's next note; "
        "null = it plays on",
    )
    # harmony and meter (accompany)
    chord_source: ChordSource = Field(
        "model",
        description="accompany: where the harmony comes from. chart: `chords`, looped, laid on "
        "the session's bars; left_hand: the player's keys below `bass_split` (default "
        f"{LEFT_HAND_SPLIT}) read as chords; model: the model plans its own (on a clock: read "
        "from the player's melody, beat by beat). The model hears "
        "the given chords (a model with harmony tokens) and the client gets `chord` messages",
    )
    chords: str | None = Field(
        None,
        max_length=MAX_CHART_CHARS,
        description="chord_source chart: a chart, one chord a bar ('C Am F G'), or bars split "
        "by '|' ('| C | Am F |': a bar's chords share it); symbols like C, Am, F#m7, Bb7, "
        "Cmaj7, Ddim, Esus4, N (no chord); looped",
    )
    beats_per_bar: int = Field(
        4, ge=1, le=16, description="beats in a bar of the session's clock (and of a chart)"
    )
    chord_tones: bool = Field(
        True,
        description="accompany: harmony and bass start only on tones of the sounding chord (the "
        "chart's, the left hand's, or the model's own plan; a model with harmony tokens); false: "
        "they may leave it (as the HTTP endpoints' chord_tones=false)",
    )
    chord_hedge: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="accompany, chords read from the melody (chord_source model on a clock): of "
        "the chord read, harmony and bass play only the tones the reader gives at least this "
        "chance of being right, and always the likeliest (unsure, it plays a fifth or an octave "
        "rather than a guessed third); 0 = the whole chord. Needs chord_tones",
    )

    @field_validator("programs")
    @classmethod
    def _check_programs(cls, v: dict[str, int]) -> dict[str, int]:
        for part, prog in v.items():
            if not 0 <= prog <= 127:
                raise ValueError(f"program for {part!r} must be in 0..127, got {prog}")
        return v

    @model_validator(mode="after")
    def _check_range(self) -> LiveParams:
        if self.pitch_low > self.pitch_high:
            raise ValueError(
                f"pitch_low ({self.pitch_low}) must be <= pitch_high ({self.pitch_high})"
            )
        if self.chord_source == "left_hand" and self.bass_split is None:
            self.bass_split = LEFT_HAND_SPLIT  # the left hand names the chords
        if self.bass_split is not None and self.parts is not None and "bass" in self.parts:
            raise ValueError(
                "parts: 'bass' is the player's while bass_split is set; leave it out, or set "
                "bass_split to null"
            )
        if self.chord_source == "chart":
            if not self.chords or not self.chords.strip():
                raise ValueError(
                    "chord_source 'chart' needs chords, e.g. 'C Am F G' (one chord a bar) or "
                    "'| C | Am F |'"
                )  # its symbols are checked by the server (the chord vocabulary is the engine's)
        return self

    def clocked(self) -> bool:
        """The session keeps beats: a clock's (`beat_time`), or a chart's (from the first note
        without a clock)."""
        return self.beat_time is not None or self.chord_source == "chart"

    def beat_ms(self) -> float:
        """Milliseconds between beats at `tempo_bpm`."""
        return 60_000.0 / self.tempo_bpm

    def grid_step_ms(self) -> float | None:
        """The grid generated notes land on (ms between points), None when there is none."""
        if self.beat_time is None or self.grid == "off":
            return None
        return 60_000.0 / self.tempo_bpm / GRID_DIVISIONS[self.grid]

    def response_length_seconds(self) -> float:
        if self.response_beats is not None:
            return min(self.response_beats * 60.0 / self.tempo_bpm, MAX_RESPONSE_SECONDS)
        return self.response_seconds


def _midi_bytes(v: list[int]) -> list[int]:
    if not 1 <= len(v) <= 3:
        raise ValueError(f"data must hold 1..3 bytes, got {len(v)}")
    if any(not 0 <= b <= 255 for b in v):
        raise ValueError("data bytes must be in 0..255")
    if v[0] < 0x80:
        raise ValueError(f"data[0] must be a status byte (128..255), got {v[0]}")
    if any(b > 127 for b in v[1:]):
        raise ValueError("data bytes after the status byte must be in 0..127")
    return v


# --- client -> server ---------------------------------------------------------------------------
class Start(LiveParams):
    """Start a session in a mode (with parameters). Sent again while running: the running mode
    ends (all its notes off) and the new one starts; the clock goes on."""

    type: Literal["start"]
    mode: Mode = Field(description="respond: call and response; accompany: play along")


def _all_optional(model: type[BaseModel]) -> dict[str, Any]:
    """LiveParams' fields with their ranges, each optional with default None (not sent)."""
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        info = FieldInfo.merge_field_infos(f, default=None, default_factory=None)
        out[name] = (f.annotation | None, info)
    return out


Params = create_model(
    "Params",
    __base__=_Message,
    __doc__="Change parameters while running; only the fields sent change. Same fields and "
    "ranges as `start` (except `mode`); checked together with the current values.",
    type=(Literal["params"], ...),
    **_all_optional(LiveParams),
)


class Ping(_Message):
    """Clock sync: the server answers `pong` at once."""

    type: Literal["ping"]
    time: float = Field(description="client time (any clock), echoed back")


class ClientMidi(_Message):
    """A live event from the player."""

    type: Literal["midi"]
    data: list[int] = Field(description="1..3 MIDI bytes, e.g. [144, 60, 100]")
    time: float | None = Field(
        None,
        ge=0.0,
        description="session time in ms; null = stamped on arrival. At most "
        f"{MAX_TIME_AHEAD_MS} ms past the server clock",
    )

    _check_data = field_validator("data")(classmethod(lambda cls, v: _midi_bytes(v)))


class Trigger(_Message):
    """respond: answer now (without waiting for gap_ms). accompany: ignored."""

    type: Literal["trigger"]


class Stop(_Message):
    """End the session: every generated note gets its note-off, then `stopped`, then the
    socket closes (code 1000)."""

    type: Literal["stop"]


ClientMessage = Annotated[
    Start | Params | Ping | ClientMidi | Trigger | Stop, Field(discriminator="type")
]
client_adapter: TypeAdapter[Any] = TypeAdapter(ClientMessage)


# --- server -> client ---------------------------------------------------------------------------
class Started(_Message):
    """The session runs in `mode` with these (complete) parameters."""

    type: Literal["started"] = "started"
    session: str = Field(description="session id")
    mode: Mode
    params: LiveParams
    server_time: float = Field(description="session time now, ms")
    harmony: bool = Field(
        False,
        description="the model hears chords and beats (its vocabulary has them); false: chord "
        "and beat messages are still sent, but the model plays without them",
    )


class Pong(_Message):
    type: Literal["pong"] = "pong"
    time: float = Field(description="the ping's time, echoed")
    server_time: float = Field(description="session time when the ping was handled, ms")


class ServerMidi(_Message):
    """A generated event, to sound at session time `time`. Sent up to `lookahead_ms` early.
    Every note-on is followed, later, by its note-off (possibly one sent after a retract)."""

    type: Literal["midi"] = "midi"
    data: list[int] = Field(description="1..3 MIDI bytes (note-on, note-off, program change)")
    time: float = Field(description="session time to sound it, ms (may be in the past: play now)")
    part: PartName | None = Field(None, description="the generated part it belongs to")


class Retract(_Message):
    """Cancel every generated event already sent whose time is > `after`. The server then sends
    the replacement events, and note-offs at `after` for generated notes sounding then."""

    type: Literal["retract"] = "retract"
    after: float = Field(description="session time, ms")


class Chord(_Message):
    """The harmony from session time `time` on (accompany; docs/protocol.md, "Harmony and
    meter"). Sent when it is known: a chart's a bar or more ahead, a left-hand chord when it is
    recognized, the model's own as soon as it is sampled (a `retract` drops it like a midi
    event; the regenerated plan follows). A later `chord` at the same time replaces it."""

    type: Literal["chord"] = "chord"
    time: float = Field(description="session time the chord starts, ms")
    label: str = Field(description="Harte label, e.g. 'A:min', 'G:7', 'N' (no chord)")
    source: ChordSource = Field(description="chart | left_hand | model")


class Beat(_Message):
    """A beat of the session (accompany), sent `lookahead_ms` before its time, like a midi
    event: the clock's (beat_time + tempo_bpm, or a chart's from the first note), else the
    model's own beats (retracted with the events around them when rolled back)."""

    type: Literal["beat"] = "beat"
    time: float = Field(description="session time of the beat, ms")
    bar: bool = Field(description="a downbeat (the first beat of a bar)")
    source: Literal["clock", "model"] = Field(
        description="clock: the session's clock; model: the model's own beat"
    )
    tempo_bpm: float | None = Field(
        None, description="the session's tempo: the clock's, or estimated from the model's beats"
    )


class ErrorMessage(_Message):
    """A frame could not be used; the session goes on."""

    type: Literal["error"] = "error"
    code: Literal[
        "bad_json",
        "bad_message",
        "too_large",
        "not_started",
        "bad_time",
        "rate_limited",
        "internal",
    ]
    message: str = Field(description="what was wrong, with the valid range where there is one")


class Stopped(_Message):
    """The session ended (after `stop`, or when the server shuts down); every generated note has
    had its note-off. Counters are for diagnostics."""

    type: Literal["stopped"] = "stopped"
    reason: str = Field(description="stop | shutdown | error")
    events_sent: int = Field(description="generated MIDI events sent")
    late_events: int = Field(description="of those, sent after their time")
    retracts: int = Field(description="retract messages sent")
    lag_pushes: int = Field(
        0,
        description="times the model was behind real time and its next event was moved to "
        "the earliest time it could still be sent on time",
    )
    lag_ms: float = Field(0.0, description="the time those moves added, in all")
    jitter_p50_ms: float | None = Field(
        None, description="send time minus intended send time, median (events that waited)"
    )
    jitter_p99_ms: float | None = Field(None, description="the same, 99th percentile")


ServerMessage = Annotated[
    Started | Pong | ServerMidi | Retract | Chord | Beat | ErrorMessage | Stopped,
    Field(discriminator="type"),
]
server_adapter: TypeAdapter[Any] = TypeAdapter(ServerMessage)

# WebSocket close codes used by /v1/live.
CLOSE_NORMAL = 1000  # after stop
CLOSE_GOING_AWAY = 1001  # server shutdown
CLOSE_POLICY = 1008  # missing or wrong token
CLOSE_TRY_LATER = 1013  # --max-sessions reached


def schemas() -> dict[str, Any]:
    """JSON Schema of both directions (what docs/protocol.md embeds)."""
    return {
        "client_to_server": client_adapter.json_schema(),
        "server_to_client": server_adapter.json_schema(),
    }


def schema_json() -> str:
    return json.dumps(schemas(), indent=2, sort_keys=True)


def explain(e: ValidationError) -> str:
    """A short message for an `error` reply: where, and what (pydantic's text names the valid
    range)."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"][1:]) or str(err["loc"][0]) if err["loc"] else ""
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)
