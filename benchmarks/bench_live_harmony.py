"""Live harmony and meter (issue #21): a POP909 validation melody played live, in real time, over
loopback WebSocket against a real `improv serve`, with the song's chords given three ways.

    .venv/bin/python benchmarks/bench_live_harmony.py --checkpoint runs/harmony/final
        [--songs 10 | --song 001 --song 028] [--seconds 30] [--no-clock] [--no-write]

For each song, from the last downbeat at or before its first melody note, `seconds` of its
MELODY are sent as a player's `midi` frames at their times (each sent at its time, stamped with
it: the model never hears a note early), with a clock at the song's tempo (`tempo_bpm` = the
median of its beat_midi.txt spacing, `beat_time` = that downbeat; `grid` off: no snapping):
(a) chart: its chord_midi.txt chords as the chart (`| C | Am F |`, a bar's beats' chords);
(b) left_hand: the same chords as block chords below `bass_split` (root position, the octave
    below the melody's lowest note), held to the next change;
(c) model: the model's own chords;
(d) with --no-clock, (c) again without a clock: the tempo the model's own beats give (the last
    `beat` message's tempo_bpm) against the song's.
Figures per condition: the accompaniment's chord-tone share against the annotated chords; the
share of its onsets within 30 ms of an eighth-note position of the clock (the real PIANO
track's share against the song's beats beside it); the `chord` messages matching the changes
the model was given (chart, left hand) within 50 ms; notes left sounding; error frames; the
server's late events, retracts and send jitter (p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_server import Client, free_port, start_server
from common import SHARED_DATA, command_line, machine, write_section
from music_metrics import chord_tone_share_marks, eighth_grid_share
from websockets.asyncio.client import connect

from improv.engine.tokenizer import Notes
from improv.engine.tokenizer.harmony import (
    BAR,
    CHORD,
    QUALITY_TONES,
    Marks,
    chord_label,
    chord_of,
    read_beat_list,
    read_lab,
)
from improv.engine.tokenizer.notes import read_notes
from improv.engine.tokenizer.vocab import TokenizerConfig

POP909 = SHARED_DATA / "pop909"
LEAD, HARMONY = 0, 2
MATCH_MS = 50.0
GRID_TOL_S = 0.03
START_DELAY_MS = 1500.0  # from `start` to the first downbeat (the model's first bars)


@dataclass
class Song:
    sid: str
    melody: Notes  # session-relative seconds (0 = the first downbeat)
    piano: Notes
    chords: Marks  # the annotated chords, same time base
    beats: Marks  # the annotated beats, same time base
    bpm: float
    per_bar: int


def load_song(sid: str, seconds: float) -> Song | None:
    folder = POP909 / sid
    notes, _, _ = read_notes(folder / f"{sid}.mid", TokenizerConfig())
    beats = read_beat_list((folder / "beat_midi.txt").read_text())
    chords = read_lab((folder / "chord_midi.txt").read_text())
    mel = notes.select(notes.part == LEAD)
    if len(mel) == 0 or len(beats) < 8:
        return None
    downs = beats.time[beats.kind == BAR]
    first = float(mel.start.min())
    w0 = float(downs[downs <= first + 1e-6].max()) if (downs <= first + 1e-6).any() else first
    w1 = w0 + seconds

    def window(n: Notes) -> Notes:
        n = n.select((n.start >= w0) & (n.start < w1))
        return Notes(n.start - w0, np.minimum(n.end, w1) - w0, n.pitch, n.velocity, n.part,
                     n.program)  # fmt: skip

    step = float(np.median(np.diff(beats.time)))
    bar_beats = np.diff(np.flatnonzero(beats.kind == BAR))
    per_bar = int(np.median(bar_beats)) if len(bar_beats) else 4
    return Song(
        sid,
        window(mel),
        window(notes.select(notes.part == HARMONY)),
        chords.window(w0, w1),
        beats.window(w0, w1),
        60.0 / step,
        per_bar,
    )


def clock_beats(song: Song, seconds: float) -> np.ndarray:
    """The clock's beats (s from the first downbeat): steady at the song's tempo."""
    return np.arange(0.0, seconds + 1e-9, 60.0 / song.bpm)


def chart_of(song: Song, seconds: float) -> tuple[str, list[tuple[float, int]]]:
    """The annotated chords as a chart on the clock's bars (each beat's chord; a bar written
    with as few symbols as divide it evenly), and the changes it gives (s, chord index)."""
    beats = clock_beats(song, seconds)
    at = song.chords.chord_at(beats + 1e-3)
    bars, changes, last = [], [], None
    for b0 in range(0, len(beats) - song.per_bar + 1, song.per_bar):
        bar = [int(x) for x in at[b0 : b0 + song.per_bar]]
        for n in (1, 2, song.per_bar):
            if song.per_bar % n == 0:
                k = song.per_bar // n
                if all(bar[i] == bar[(i // k) * k] for i in range(len(bar))):
                    syms = [bar[i * k] for i in range(n)]
                    break
        bars.append(" ".join(chord_label(c) for c in syms))
        for j, c in enumerate(syms):
            if c != last:
                changes.append((beats[b0 + j * song.per_bar // len(syms)], c))
                last = c
    return "| " + " | ".join(bars) + " |", changes


def left_hand_events(song: Song, split: int) -> list[tuple[float, list[int]]]:
    """Block chords below `split` at each annotated change, held to the next (N: silence)."""
    ch = song.chords.chords
    out: list[tuple[float, list[int]]] = []
    held: list[int] = []
    for t, c in zip(ch.time.tolist(), ch.value.tolist(), strict=True):
        for k in held:
            out.append((max(t - 0.005, 0.0), [0x80, k, 0]))
        held = []
        rq = chord_of(int(c))
        if rq is None:
            continue
        root, q = rq
        base = split - 13 - (split - 13 - root) % 12  # the root whose chord ends below split
        held = [base + i for i in QUALITY_TONES[q]]
        out += [(t, [0x90, k, 70]) for k in held]
    end = float(song.melody.end.max()) if len(song.melody) else 0.0
    out += [(end, [0x80, k, 0]) for k in held]
    return out


def melody_events(song: Song) -> list[tuple[float, list[int]]]:
    ev = []
    for n in zip(song.melody.start, song.melody.end, song.melody.pitch, song.melody.velocity,
                 strict=True):  # fmt: skip
        ev.append((float(n[0]), [0x90, int(n[2]), max(1, int(n[3]))]))
        ev.append((float(n[1]), [0x80, int(n[2]), 0]))
    return ev


def client_view(msgs: list[dict], kind: str) -> list[dict]:
    held: list[dict] = []
    for m in msgs:
        if m["type"] == kind:
            held.append(m)
        elif m["type"] == "retract":
            held = [x for x in held if x["time"] <= m["after"]]
    return held


def generated_notes(msgs: list[dict], origin: float) -> tuple[Notes, int]:
    """The accompaniment the client played (retracts applied), s from `origin`; and the notes
    left sounding."""
    rows, open_ = [], {}
    for m in sorted(client_view(msgs, "midi"), key=lambda m: m["time"]):
        st, *rest = m["data"]
        if st & 0xF0 not in (0x80, 0x90) or m.get("part") == "drums":
            continue
        key = (st & 0x0F, rest[0])
        if st & 0xF0 == 0x90 and rest[1] > 0:
            open_[key] = m
        elif key in open_:
            on = open_.pop(key)
            rows.append(((on["time"] - origin) / 1000, (m["time"] - origin) / 1000, rest[0],
                         on["data"][2], HARMONY, 0))  # fmt: skip
    return Notes.from_list(rows), len(open_)


async def run(
    url: str, song: Song, cond: str, seconds: float, split: int, seed: int,
    hedge: float | None = None,
) -> dict:  # fmt: skip
    ws = await connect(url, max_size=None, ping_interval=None)
    c = Client(ws)
    await c.sync()
    msgs: list[dict] = []

    async def reader() -> None:
        async for raw in ws:
            m = json.loads(raw)
            m["_recv"] = c.now()
            msgs.append(m)

    task = asyncio.create_task(reader())
    down = c.now() + START_DELAY_MS
    params: dict = {"mode": "accompany", "seed": seed, "lookahead_ms": 100, "grid": "off",
                    "rest_ms": None, "beats_per_bar": song.per_bar}  # fmt: skip
    if hedge is not None:
        params["chord_hedge"] = hedge
    if cond != "model_noclock":
        params.update(tempo_bpm=round(song.bpm, 3), beat_time=down)
    given: list[tuple[float, int]] = []
    events = melody_events(song)
    if cond == "chart":
        chart, given = chart_of(song, seconds)
        params.update(chord_source="chart", chords=chart)
    elif cond == "left_hand":
        params.update(chord_source="left_hand", bass_split=split)
        lh = left_hand_events(song, split)
        events += lh
        ch = song.chords.chords
        given = [(t, int(v)) for t, v in zip(ch.time, ch.value, strict=True) if v > 0]
    await c.send({"type": "start", **params})
    events.sort(key=lambda e: (e[0], e[1][0] == 0x90))  # note-offs first at one time
    for t, data in events:
        at = down + t * 1000.0
        delay = (at - c.now()) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        await c.send({"type": "midi", "data": data, "time": at})
    await asyncio.sleep(max(0.0, (down + seconds * 1000.0 - c.now()) / 1000.0) + 0.3)
    await c.send({"type": "stop"})
    for _ in range(300):
        if any(m["type"] == "stopped" for m in msgs):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await ws.close()

    acc, stuck = generated_notes(msgs, down)
    stopped = next((m for m in msgs if m["type"] == "stopped"), {})
    chords_sent = [m for m in client_view(msgs, "chord") if m["source"] == cond]

    def hit(t: float, v: int) -> bool:
        return any(
            m["label"] == chord_label(v) and abs(m["time"] - (down + t * 1000.0)) <= MATCH_MS
            for m in chords_sent
        )

    matched = sum(hit(t, v) for t, v in given)
    # Each change no message matched: (its time s, its label, the nearest message's label and
    # time offset ms), to see whether a miss is the label or the time.
    misses = []
    for t, v in given:
        if not hit(t, v):
            near = min(
                chords_sent, key=lambda m: abs(m["time"] - (down + t * 1000.0)), default=None
            )
            misses.append(
                (round(t, 3), chord_label(v))
                + ((near["label"], round(near["time"] - (down + t * 1000.0), 1)) if near else ())
            )
    beats_msgs = client_view(msgs, "beat")
    tempo = next((m["tempo_bpm"] for m in reversed(beats_msgs) if m.get("tempo_bpm")), None)
    end = seconds
    return {
        "song": song.sid,
        "cond": cond,
        "notes": len(acc),
        "chord_tones": chord_tone_share_marks(acc, song.chords, end),
        "grid": eighth_grid_share(acc, clock_beats(song, seconds), GRID_TOL_S),
        "given": len(given),
        "matched": matched,
        "misses": misses,
        "stuck": stuck,
        "errors": [m["message"] for m in msgs if m["type"] == "error"],
        "late": stopped.get("late_events"),
        "sent": stopped.get("events_sent"),
        "retracts": stopped.get("retracts"),
        "jitter_p99": stopped.get("jitter_p99_ms"),
        "model_tempo": tempo,
        "song_bpm": song.bpm,
        "harmony": next((m.get("harmony") for m in msgs if m["type"] == "started"), None),
        "lag_pushes": stopped.get("lag_pushes"),
        "lag_ms": stopped.get("lag_ms"),
        "offsets_ms": grid_offsets(acc, clock_beats(song, seconds)),
        "pushed_share": pushed_share(acc, song.melody),
    }


def pushed_share(acc: Notes, melody: Notes) -> float:
    """Share of the accompaniment's onsets 5..60 ms after a melody onset: notes the model
    played with the player's note, after it arrived (the clock floor's push; a diagnostic)."""
    if len(acc) == 0 or len(melody) == 0:
        return math.nan
    m = np.sort(melody.start)
    i = np.searchsorted(m, acc.start, side="right") - 1
    d = acc.start - m[np.maximum(i, 0)]
    return float(((i >= 0) & (d >= 0.005) & (d <= 0.06)).mean())


def grid_offsets(notes: Notes, beats: np.ndarray) -> list[float]:
    """Each onset's signed distance to the nearest eighth-note position (ms; for --json)."""
    step = (beats[1] - beats[0]) / 2 if len(beats) > 1 else 1.0
    ph = (notes.start - beats[0]) / step
    return [round(float(x), 1) for x in (ph - np.round(ph)) * step * 1000]


def real_piano_grid(song: Song) -> float:
    return eighth_grid_share(song.piano, song.beats.time[song.beats.kind != CHORD], GRID_TOL_S)


def real_piano_tones(song: Song, seconds: float) -> float:
    return chord_tone_share_marks(song.piano, song.chords, seconds)


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--songs", type=int, default=10, help="the first N songs of splits/valid.txt")
    ap.add_argument("--song", action="append", help="a song id (repeatable; overrides --songs)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--bass-split", type=int, default=None, help="default: the melody's lowest")
    ap.add_argument("--conditions", default="chart,left_hand,model")
    ap.add_argument("--no-clock", action="store_true", help="add (d): model chords, no clock")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--chord-hedge",
        type=float,
        default=None,
        help="the sessions' chord_hedge (default: the server's)",
    )
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--server-log", type=Path, help="keep the server's log here (-v)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    ids = args.song or (POP909 / "splits" / "valid.txt").read_text().split()
    songs: list[Song] = []
    for sid in ids:
        if len(songs) == (len(args.song) if args.song else args.songs):
            break
        s = load_song(sid, args.seconds)
        if s is not None:
            songs.append(s)
    conds = args.conditions.split(",") + (["model_noclock"] if args.no_clock else [])

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = args.server_log or Path(tmp) / "server.log"
        proc = start_server(Path(args.checkpoint), port, 2, log, verbose=bool(args.server_log))
        rows: list[dict] = []
        try:
            for song in songs:
                low = int(song.melody.pitch.min()) if len(song.melody) else 60
                split = args.bass_split or min(60, low)
                for cond in conds:
                    t0 = time.perf_counter()
                    r = asyncio.run(
                        run(f"ws://127.0.0.1:{port}/v1/live", song, cond, args.seconds, split,
                            args.seed, args.chord_hedge)
                    )  # fmt: skip
                    r["piano_grid"] = real_piano_grid(song)
                    r["piano_tones"] = real_piano_tones(song, args.seconds)
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k not in ("errors", "offsets_ms")}
                                     | {"errors": len(r["errors"]),
                                        "wall_s": round(time.perf_counter() - t0, 1)}),
                          flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    body = report(rows, songs, args)
    print(body)
    if not args.no_write:
        write_section("live-harmony", body)


def report(rows: list[dict], songs: list[Song], args: argparse.Namespace) -> str:
    lines = [
        "## Live harmony and meter (issue #21)",
        "",
        f"{len(songs)} POP909 validation songs ({', '.join(s.sid for s in songs)}), "
        f"{args.seconds:.0f} s of each MELODY played live in real time over loopback WebSocket "
        f"against `improv serve --checkpoint {args.checkpoint}`; a clock at each song's tempo "
        "from its first downbeat (no grid snapping). Chord tones: the accompaniment's notes "
        "against the annotated chords. Grid: onsets within 30 ms of an eighth-note position "
        "of the clock (the real PIANO track against the song's beats). Chord events: the "
        f"changes given (chart, left hand) that a `chord` message matched within {MATCH_MS:.0f} "
        f"ms. Machine: {machine()}.",
        "",
        "| condition | notes | chord tones | grid | real piano grid | chord events matched "
        "| stuck notes | error frames | late events | retracts | jitter p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cond in dict.fromkeys(r["cond"] for r in rows):
        rs = [r for r in rows if r["cond"] == cond]
        notes = sum(r["notes"] for r in rs)

        def wmean(key: str, rs: list[dict] = rs) -> float:
            w = [(r[key], r["notes"]) for r in rs if not math.isnan(r[key]) and r["notes"]]
            return sum(a * b for a, b in w) / max(1, sum(b for _, b in w)) if w else math.nan

        piano = np.nanmean([r["piano_grid"] for r in rs])
        given = sum(r["given"] for r in rs)
        matched = sum(r["matched"] for r in rs)
        jit = [r["jitter_p99"] for r in rs if r["jitter_p99"] is not None]
        lines.append(
            f"| {cond} | {notes} | {pct(wmean('chord_tones'))} | {pct(wmean('grid'))} "
            f"| {pct(float(piano))} | "
            + (f"{matched}/{given} ({pct(matched / given)})" if given else "-")
            + f" | {sum(r['stuck'] for r in rs)} | {sum(len(r['errors']) for r in rs)} "
            f"| {sum(r['late'] or 0 for r in rs)}/{sum(r['sent'] or 0 for r in rs)} "
            f"| {sum(r['retracts'] or 0 for r in rs)} | {max(jit) if jit else 'n/a'} |"
        )
    tempos = [(r["model_tempo"], r["song_bpm"]) for r in rows if r["cond"] == "model_noclock"]
    if tempos:
        lines += [
            "",
            "Without a clock, the tempo of the model's own beats (last `beat` message) against "
            "the song's: "
            + ", ".join(f"{a if a else 'none'} vs {b:.1f}" for a, b in tempos)
            + " bpm.",
        ]
    real = np.nanmean([r["piano_tones"] for r in rows])
    lines += [
        "",
        f"The real PIANO track's chord-tone share over the same windows: {pct(float(real))}. "
        "Targets (issue #21): chord tones >= 80% (chart), >= 75% (left hand), >= 66% (model); "
        "grid >= the real piano's minus 5 points; chord events >= 95% within 50 ms; no stuck "
        "notes, no error frames.",
        "",
        f"Command: `{command_line()}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
