"""Task layouts built from notes: accompaniment and fill-in-the-middle (docs/tokens.md).

Shared by the trainer (training examples) and the server (prompts for /v1/infill, /v1/accompany).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .encode import encode_events, quantize
from .harmony import Marks
from .notes import Notes
from .vocab import TokenType, Vocab


@dataclass(frozen=True)
class TimedEvent:
    tick: int  # absolute tick of the event
    tokens: tuple[int, ...]  # one event: [PART PROGRAM] VEL ON, OFF, BAR, BEAT or CHORD


_EVENT_ENDS = (TokenType.NOTE_ON, TokenType.NOTE_OFF, TokenType.METER, TokenType.CHORD)


def split_events(vocab: Vocab, ids: Sequence[int], start_tick: int = 0) -> list[TimedEvent]:
    """An event token stream -> its events with absolute ticks (time tokens dropped)."""
    out: list[TimedEvent] = []
    tick = start_tick
    group: list[int] = []
    for tok in ids:
        t = vocab.type_of(tok)
        if t is TokenType.TIME:
            tick += vocab.shift_ticks(tok)
        elif t is TokenType.SPECIAL:
            continue
        elif t is TokenType.HEADER:
            continue
        else:
            group.append(tok)
            if t in _EVENT_ENDS:
                out.append(TimedEvent(tick, tuple(group)))
                group = []
    return out


def token_parts(vocab: Vocab, ids: Sequence[int]) -> np.ndarray:
    """(T,) int: the part each token belongs to (-1 for time and special tokens).

    A PROGRAM belongs to the PART before it, a VEL to the ON after it. Used to mask the loss on
    given (forced) parts and to report per-part statistics.
    """
    arr = np.asarray(ids, dtype=np.int64)
    out = np.full(len(arr), -1, dtype=np.int64)
    is_part = (arr >= vocab.part_base) & (arr < vocab.program_base)
    out[is_part] = arr[is_part] - vocab.part_base
    prog = (arr >= vocab.program_base) & (arr < vocab.vel_base)
    prev_part = np.concatenate([[-1], out[:-1]])
    out[prog] = prev_part[prog]
    on = (arr >= vocab.on_base) & (arr < vocab.off_base)
    off = (arr >= vocab.off_base) & (arr < vocab.notes_end)
    out[on] = (arr[on] - vocab.on_base) // 128
    out[off] = (arr[off] - vocab.off_base) // 128
    vel = (arr >= vocab.vel_base) & (arr < vocab.on_base)
    next_part = np.concatenate([out[1:], [-1]])
    out[vel] = next_part[vel]
    return out


def clip_notes(notes: Notes, lo: float, hi: float) -> Notes:
    """Notes starting in [lo, hi), their ends cut at hi."""
    sel = notes.select((notes.start >= lo) & (notes.start < hi))
    sel.end = np.minimum(sel.end, hi)
    return sel


@dataclass
class InfillExample:
    prompt: list[int]  # BOS TASK_INFILL PART_t... prefix FILL_SUFFIX suffix FILL_MIDDLE
    middle: list[int]  # the gap's events (targets and given, interleaved), time to `end`, FILL_END
    forced: list[
        TimedEvent
    ]  # the given (non-target) events inside the gap, to insert at their ticks
    start_tick: int
    end_tick: int
    kept: Notes  # every note not regenerated, unchanged
    targets: Notes  # the notes the middle regenerates (the reference, in training)


def make_infill(
    vocab: Vocab,
    notes: Notes,
    start: float,
    end: float,
    parts: Sequence[int] | None = None,
    context_seconds: float | None = None,
    marks: Marks | None = None,
) -> InfillExample:
    """Fill-in-the-middle layout for the gap [start, end) over `parts` (default: all parts).

    `context_seconds` limits the prefix and the suffix to that much music on each side.
    `marks` (beats, chords) are written in the prefix, the suffix and the middle at their times;
    the middle's are forced, like the given parts' notes.
    """
    if not end > start:
        raise ValueError(f"infill end must be after start, got start={start} end={end}")
    tps = vocab.ticks_per_second
    s_tick, e_tick = int(quantize(start, tps)), int(quantize(end, tps))
    target_parts = list(range(vocab.n_parts)) if parts is None else sorted(set(parts))
    in_gap = (notes.start >= start) & (notes.start < end)
    is_target = in_gap & np.isin(notes.part, target_parts)
    kept, targets = notes.select(~is_target), notes.select(is_target)
    lo = -np.inf if context_seconds is None else start - context_seconds
    hi = np.inf if context_seconds is None else end + context_seconds

    before = kept.select((kept.start < start) & (kept.start >= lo))
    before.end = np.minimum(before.end, start)  # nothing sounds into the gap, in the model's view
    m = marks if marks is not None else Marks.empty()
    m_before = m.select((m.time < start) & (m.time >= lo))
    m_gap = m.window(start, end).shifted(start) if len(m) else m
    m_after = m.select((m.time >= end) & (m.time < hi))
    prefix = encode_events(before, vocab, 0, m_before)
    prefix += vocab.time_tokens(s_tick - _end_tick(prefix, vocab))
    after = clip_notes(kept, end, hi)
    suffix = encode_events(after, vocab, e_tick, m_after)
    given = clip_notes(kept, start, end)
    gap = Notes.concat([given, clip_notes(targets, start, end)])
    middle = encode_events(gap, vocab, s_tick, m_gap)
    middle += vocab.time_tokens(e_tick - s_tick - _end_tick(middle, vocab))
    middle.append(vocab.FILL_END)
    prompt = [vocab.BOS, vocab.TASK_INFILL, *(vocab.part(p) for p in target_parts)]
    prompt += prefix + [vocab.FILL_SUFFIX] + suffix + [vocab.FILL_MIDDLE]
    forced = split_events(vocab, encode_events(given, vocab, s_tick, m_gap), s_tick)
    return InfillExample(prompt, middle, forced, s_tick, e_tick, kept, targets)


def _end_tick(ids: Sequence[int], vocab: Vocab) -> int:
    """Total ticks the time tokens of `ids` advance."""
    return sum(vocab.shift_ticks(t) for t in ids)


def make_accompany(
    vocab: Vocab,
    notes: Notes,
    lead_parts: Sequence[int] | None = None,
    marks: Marks | None = None,
    header: Sequence[int] = (),
) -> tuple[list[int], list[TimedEvent]]:
    """Accompaniment layout: `BOS TASK_ACCOMPANY [header]` + all parts interleaved, with the
    beats and chords of `marks` (for training), and the lead's events alone with their ticks,
    with the marks (what is forced at inference)."""
    lead_parts = [vocab.lead] if lead_parts is None else list(lead_parts)
    ids = [vocab.BOS, vocab.TASK_ACCOMPANY, *header, *encode_events(notes, vocab, 0, marks)]
    lead = notes.select(np.isin(notes.part, lead_parts))
    return ids, split_events(vocab, encode_events(lead, vocab, 0, marks), 0)
