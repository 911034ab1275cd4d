"""MaxDuration: sampled notes never sound longer than the limit (and without it they do)."""

import torch

from improv.engine.constraint_set import ConstraintSet
from improv.engine.constraints import MaxDuration
from improv.engine.decoder import TorchDecoder
from improv.engine.tokenizer import Tokenizer
from improv.engine.tokenizer.vocab import TokenType

V = Tokenizer().vocab


def sample(model, cs: ConstraintSet, prompt: list[int], steps: int, seed: int) -> list[list[int]]:
    """`steps` masked samples for each row of `cs` from a random model (sharpened logits)."""
    dec = TorchDecoder(model, max_batch=cs.n_rows)
    gen = torch.Generator().manual_seed(seed)
    rows = [list(prompt) for _ in range(cs.n_rows)]
    for r in range(cs.n_rows):
        cs.feed(prompt, row=r)
    logits = dec.extend(list(range(cs.n_rows)), rows)  # (B, V)
    for _ in range(steps):
        probs = torch.softmax(logits * 3.0 + cs.logit_mask(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (B,)
        cs.observe(nxt)
        for r, t in enumerate(nxt.tolist()):
            rows[r].append(t)
        logits = dec.extend(list(range(cs.n_rows)), [[t] for t in nxt.tolist()])
    return rows


def longest_note_ticks(ids: list[int]) -> int:
    """The longest time any note was sounding (open notes count up to the last token's time)."""
    tick, onset, longest = 0, {}, 0
    for t in ids:
        kind = V.type_of(t)
        if kind is TokenType.TIME:
            tick += V.shift_ticks(t)
        elif kind is TokenType.NOTE_ON and V.note_of(t)[0] != V.drums:
            onset[V.note_of(t)] = tick
        elif kind is TokenType.NOTE_OFF:
            start = onset.pop(V.note_of(t), tick)
            longest = max(longest, tick - start)
        for start in onset.values():
            longest = max(longest, tick - start)
    return longest


def test_sampled_notes_end_in_time(make_model):
    model = make_model(seed=5, max_seq_len=640)
    limit = MaxDuration(0.3)  # 30 ticks
    prompt = [V.BOS, V.TASK_CONTINUE]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        guarded = sample(model, ConstraintSet(V, [limit], n_rows=4), prompt, 500, seed=1)
        free = sample(model, ConstraintSet(V, [], n_rows=4), prompt, 500, seed=1)
    finally:
        torch.set_num_threads(threads)
    assert all(longest_note_ticks(r) <= 30 for r in guarded), [
        longest_note_ticks(r) for r in guarded
    ]
    assert max(longest_note_ticks(r) for r in free) > 30  # the test can fail
