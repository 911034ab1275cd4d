"""Context overflow: shorten a token sequence that no longer fits the model's context.

`slide_context(ctx, vocab, keep_len)` keeps the most recent ~`keep_len` tokens from an event
boundary and puts in front of them a header that restores the musical state the dropped tokens
had set up:

    BOS TASK [infill target PARTs] [HEADER ... HEADER_END]   the sequence's own first tokens
    PART p PROGRAM x      for every part whose program was set in the dropped span
    CHORD c               the chord of the dropped span's last change (harmony vocabularies)
    VEL v ON(p, k)        for every (non-drum) note still sounding at the cut

so the window reads like a valid sequence of the grammar in docs/tokens.md (every later OFF has
its ON, every part its program). The result is prefilled from position 0: RoPE positions are
relative, so the model sees an ordinary, shorter sequence. Re-encoding costs one prefill of about
keep_len tokens every (max_len - keep_len) generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer.vocab import TokenType, Vocab


def header_len(ctx: Sequence[int], vocab: Vocab) -> int:
    """Length of the part of ctx that is always kept: BOS, TASK, infill target PARTs, the
    instrumentation header."""
    n = 0
    if n < len(ctx) and ctx[n] == vocab.BOS:
        n += 1
    if n < len(ctx) and ctx[n] in (vocab.TASK_CONTINUE, vocab.TASK_ACCOMPANY, vocab.TASK_INFILL):
        n += 1
        if ctx[n - 1] == vocab.TASK_INFILL:  # targets: PART tokens not followed by PROGRAM
            while (
                n < len(ctx)
                and vocab.type_of(ctx[n]) is TokenType.PART
                and not (n + 1 < len(ctx) and vocab.type_of(ctx[n + 1]) is TokenType.PROGRAM)
            ):
                n += 1
        if vocab.harmony and n < len(ctx) and ctx[n] == vocab.HEADER:
            end = next((j for j in range(n, len(ctx)) if ctx[j] == vocab.HEADER_END), None)
            if end is not None:
                n = end + 1
    return n


def _state_at(ctx: Sequence[int], vocab: Vocab, h: int, cut: int) -> list[int]:
    """PART/PROGRAM of every part set in ctx[h:cut], then VEL/ON of every note sounding at cut."""
    programs: dict[int, int] = {}  # part -> program
    sounding: dict[tuple[int, int], int] = {}  # (part, pitch) -> velocity bin
    part = vel = chord = None
    for tok in ctx[h:cut]:
        t = vocab.type_of(tok)
        if t is TokenType.CHORD:
            chord = tok
        elif t is TokenType.PART:
            part = tok - vocab.part_base
        elif t is TokenType.PROGRAM and part is not None:
            programs[part] = tok - vocab.program_base
        elif t is TokenType.VELOCITY:
            vel = tok - vocab.vel_base
        elif t is TokenType.NOTE_ON:
            p, k = vocab.note_of(tok)
            if p != vocab.drums:
                sounding[(p, k)] = vel if vel is not None else vocab.config.velocity_bins // 2
        elif t is TokenType.NOTE_OFF:
            sounding.pop(vocab.note_of(tok), None)
    state: list[int] = []
    for p in sorted(programs):
        state += [vocab.part(p), vocab.program(programs[p])]
    if chord is not None:
        state.append(chord)
    for (p, k), v in sorted(sounding.items()):
        state += [vocab.velocity(v), vocab.note_on(p, k)]
    return state


def slide_context(ctx: Sequence[int], vocab: Vocab, keep_len: int) -> list[int]:
    """header + state + the most recent tokens of ctx: at most keep_len tokens in all (see the
    module docstring). The window starts at an event boundary and keeps at least ctx's last event;
    if the state alone would overflow keep_len, its last entries are dropped."""
    h = header_len(ctx, vocab)
    if keep_len < h + 2:
        raise ValueError(f"keep_len must be >= header length + 2 = {h + 2}, got {keep_len}")
    pair_second = (TokenType.NOTE_ON, TokenType.PROGRAM)  # never the first token of a window
    last = len(ctx) - 1
    if last > h and vocab.type_of(ctx[last]) in pair_second:
        last -= 1  # the last event is a pair: keep both tokens
    cut = max(len(ctx) - (keep_len - h), h)
    while True:
        if h < cut < len(ctx) and vocab.type_of(ctx[cut]) in pair_second:
            cut += 1  # drop the whole pair (its note, if sounding, goes into the state)
        cut = min(cut, max(last, h))
        state = _state_at(ctx, vocab, h, cut)
        excess = h + len(state) + len(ctx) - cut - keep_len
        if excess <= 0 or cut >= last:
            break
        cut += excess  # the state grew: drop more of the window (cut only moves forward)
    room = max(keep_len - h - (len(ctx) - cut), 0)
    return list(ctx[:h]) + _whole_events(state, vocab, room) + list(ctx[cut:])


def _whole_events(state: list[int], vocab: Vocab, room: int) -> list[int]:
    """The longest prefix of `state` within `room` tokens that ends on a whole event (pairs
    PART PROGRAM and VEL ON stay together; a CHORD is one token)."""
    n = min(room, len(state))
    while n > 0 and vocab.type_of(state[n - 1]) in (TokenType.PART, TokenType.VELOCITY):
        n -= 1
    return state[:n]
