"""Notes -> event tokens (the file path). Semantics match `stream.StreamEncoder` exactly.

Vectorized preparation (numpy), then one tight loop that writes tokens in event order.
"""

from __future__ import annotations

import numpy as np

from .harmony import BAR, BEAT, Marks
from .notes import Notes
from .vocab import Vocab

# Event classes, in the order events at one instant are written (see docs/tokens.md):
# plain key releases, then pedal releases, then note-ons (a re-struck key's note-off right
# before its note-on).
_OFF, _PEDAL_OFF, _ON_GROUP = 0, 1, 2


def quantize(seconds: np.ndarray | float, ticks_per_second: int) -> np.ndarray:
    """Seconds -> ticks, rounding half up (the stream encoder uses the same expression)."""
    return np.floor(np.asarray(seconds, dtype=np.float64) * ticks_per_second + 0.5).astype(np.int64)


def normalize(notes: Notes, vocab: Vocab) -> tuple[Notes, np.ndarray]:
    """Apply the one-key-one-sound rule; returns the notes and a per-note `retrigger` flag.

    Drum keys go through the config's drum map. A note of a part still sounding when the same key is struck again ends at the new onset
    (flagged: its note-off is written right before the new note-on). Two notes with the same
    part, pitch and onset tick are merged into one (the longer, louder one).
    """
    tps = vocab.ticks_per_second
    n = len(notes)
    if n == 0:
        return notes, np.zeros(0, dtype=bool)
    order = np.lexsort((notes.start, notes.pitch, notes.part))
    notes = notes.select(order)
    drum_map = vocab.config.drum_map
    if drum_map:  # non-GM kit notes -> their GM class, as the stream encoder does
        lut = np.arange(128, dtype=np.int16)
        lut[list(drum_map)] = list(drum_map.values())
        is_drum = notes.part == vocab.drums
        notes.pitch[is_drum] = lut[notes.pitch[is_drum]]
        order = np.lexsort((notes.start, notes.pitch, notes.part))
        notes = notes.select(order)
    same_key = (notes.part[1:] == notes.part[:-1]) & (notes.pitch[1:] == notes.pitch[:-1])
    not_drum = notes.part != vocab.drums
    start_tick = quantize(notes.start, tps)
    dup = same_key & (start_tick[1:] == start_tick[:-1]) & not_drum[1:]
    if dup.any():
        keep = np.ones(n, dtype=bool)
        for i in np.flatnonzero(dup):  # rare: fold note i into note i+1
            keep[i] = False
            notes.end[i + 1] = max(notes.end[i], notes.end[i + 1])
            notes.velocity[i + 1] = max(notes.velocity[i], notes.velocity[i + 1])
            notes.sustained[i + 1] = notes.sustained[i + 1] or notes.sustained[i]
        notes = notes.select(keep)
        same_key = (notes.part[1:] == notes.part[:-1]) & (notes.pitch[1:] == notes.pitch[:-1])
        not_drum = notes.part != vocab.drums
    retrigger = np.zeros(len(notes), dtype=bool)
    overlap = same_key & (notes.end[:-1] > notes.start[1:]) & not_drum[:-1]
    idx = np.flatnonzero(overlap)
    notes.end[idx] = notes.start[idx + 1]
    retrigger[idx] = True
    notes.end = np.maximum(notes.end, notes.start)
    return notes, retrigger


def mark_events(marks: Marks, vocab: Vocab, start_tick: int = 0) -> tuple[list[int], list[int]]:
    """(ticks, tokens) of the marks at or after `start_tick`, one per kind and tick: a BAR stands
    for its BEAT, and of two chords at one tick the later is kept."""
    if not vocab.harmony or len(marks) == 0:
        return [], []
    ticks = quantize(marks.time, vocab.ticks_per_second)
    kinds = np.where(marks.kind == BEAT, BAR, marks.kind)  # one meter slot a tick
    order = np.lexsort((marks.kind, kinds, ticks))  # stable: later chords stay later
    out_t: list[int] = []
    out_k: list[int] = []
    out_tok: list[int] = []
    for i in order.tolist():
        tick, kind = int(ticks[i]), int(kinds[i])
        if tick < start_tick:
            continue
        tok = vocab.mark(int(marks.kind[i]), int(marks.value[i]))
        if out_t and out_t[-1] == tick and out_k[-1] == kind:
            if kind != BAR:  # a chord: the later label wins
                out_tok[-1] = tok
            continue  # a BAR over a BEAT (sorted first) stays
        out_t.append(tick)
        out_k.append(kind)
        out_tok.append(tok)
    return out_t, out_tok


def encode_events(
    notes: Notes, vocab: Vocab, start_tick: int = 0, marks: Marks | None = None
) -> list[int]:
    """Event tokens for `notes` (no BOS/task/EOS), time counted from `start_tick`.

    `marks` (beats and chord changes) are written before the note events of their tick; a
    vocabulary without harmony tokens ignores them."""
    notes, retrigger = normalize(notes, vocab)
    n = len(notes)
    m_tick, m_tok = mark_events(marks, vocab, start_tick) if marks is not None else ([], [])
    if n == 0:
        return _with_marks([], [], m_tick, m_tok, vocab, start_tick)
    tps = vocab.ticks_per_second
    is_drum = notes.part == vocab.drums
    has_off = ~is_drum

    # one row per event: note-ons, then note-offs of pitched notes
    off_idx = np.flatnonzero(has_off)
    ev_note = np.concatenate([np.arange(n), off_idx])
    ev_on = np.concatenate([np.ones(n, dtype=bool), np.zeros(len(off_idx), dtype=bool)])
    ev_time = np.concatenate([notes.start, notes.end[off_idx]])
    # a zero-length note's note-off follows its own note-on (sub 2); a re-struck key's note-off
    # precedes the new note-on (sub 0)
    zero = notes.end[off_idx] <= notes.start[off_idx]
    off_cls = np.where(
        retrigger[off_idx] | zero,
        _ON_GROUP,
        np.where(notes.sustained[off_idx], _PEDAL_OFF, _OFF),
    )
    ev_cls = np.concatenate([np.full(n, _ON_GROUP), off_cls])
    ev_sub = np.concatenate([np.ones(n, dtype=np.int8), np.where(zero, 2, 0).astype(np.int8)])
    ev_part = notes.part[ev_note]
    ev_pitch = notes.pitch[ev_note]
    order = np.lexsort((ev_sub, ev_pitch, ev_part, ev_cls, ev_time))
    ev_note, ev_on, ev_part, ev_pitch = (
        ev_note[order],
        ev_on[order],
        ev_part[order],
        ev_pitch[order],
    )
    ev_tick = quantize(ev_time[order], tps)

    # a PART/PROGRAM pair precedes a note-on whenever its part's program changes
    on_pos = np.flatnonzero(ev_on)
    on_part = ev_part[on_pos]
    on_prog = notes.program[ev_note[on_pos]]
    by_part = np.argsort(on_part, kind="stable")
    prog_sorted = on_prog[by_part]
    part_sorted = on_part[by_part]
    changed_sorted = np.ones(len(on_pos), dtype=bool)
    changed_sorted[1:] = (part_sorted[1:] != part_sorted[:-1]) | (
        prog_sorted[1:] != prog_sorted[:-1]
    )
    changed = np.zeros(len(ev_on), dtype=bool)
    changed[on_pos[by_part]] = changed_sorted

    vel_bin = (
        (np.clip(notes.velocity, 1, 127).astype(np.int64) - 1) * vocab.config.velocity_bins
    ) // 127
    prog_tok = (vocab.program_base + notes.program[ev_note]).tolist()
    part_tok = (vocab.part_base + ev_part).tolist()
    vel_tok = (vocab.vel_base + vel_bin[ev_note]).tolist()
    key = ev_part.astype(np.int64) * 128 + ev_pitch
    on_tok = (vocab.on_base + key).tolist()
    off_tok = (vocab.off_base + key).tolist()

    out: list[int] = []
    at: list[int] = []  # (len(out),) the event index each token belongs to
    for i, (is_on, ch) in enumerate(zip(ev_on.tolist(), changed.tolist(), strict=True)):
        group = ([part_tok[i], prog_tok[i]] if ch else []) + [vel_tok[i], on_tok[i]]
        if not is_on:
            group = [off_tok[i]]
        out += group
        at += [i] * len(group)
    return _with_marks(out, [ev_tick[i] for i in at], m_tick, m_tok, vocab, start_tick)


def _with_marks(
    toks: list[int],
    ticks: list[int],
    m_tick: list[int],
    m_tok: list[int],
    vocab: Vocab,
    start_tick: int,
) -> list[int]:
    """Tokens with their ticks, and marks, merged in time order (marks first at a tick), with
    time tokens between."""
    out: list[int] = []
    append, extend, time_tokens = out.append, out.extend, vocab.time_tokens
    cur = start_tick
    j, nm = 0, len(m_tick)
    for tok, tick in zip(toks, ticks, strict=True):
        while j < nm and m_tick[j] <= tick:
            if m_tick[j] > cur:
                extend(time_tokens(m_tick[j] - cur))
                cur = m_tick[j]
            append(m_tok[j])
            j += 1
        if tick > cur:
            extend(time_tokens(tick - cur))
            cur = tick
        append(tok)
    for k in range(j, nm):
        if m_tick[k] > cur:
            extend(time_tokens(m_tick[k] - cur))
            cur = m_tick[k]
        append(m_tok[k])
    return out
