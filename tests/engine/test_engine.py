"""Engine equivalences: cached == recompute, batched == one-by-one, seeds, stream, score,
context sliding, logits processor hook, sampling functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from improv.engine import sampling
from improv.engine.context import header_len, slide_context
from improv.engine.engine import Engine
from improv.engine.sampling import (
    NUCLEUS_FIRST_K,
    logits_to_probs,
    make_generators,
    make_seeds,
    nucleus,
    sample,
)
from improv.engine.tokenizer.vocab import TokenizerConfig, TokenType, Vocab

V = Vocab(TokenizerConfig())
PROMPTS = [[V.BOS, V.TASK_CONTINUE], [V.BOS, V.TASK_CONTINUE, 500, 600, 10, 20, 1000], [1, 4, 300]]


@pytest.fixture
def eng(tiny_model) -> Engine:
    return Engine.from_model(tiny_model, max_batch=2)  # batches of 3 grow the decoder


def test_cached_equals_recompute_greedy_batch(eng):
    cached = eng.generate(PROMPTS, 24, temperature=0, stop_tokens=())
    ref = eng.generate(PROMPTS, 24, temperature=0, use_cache=False, stop_tokens=())
    assert cached == ref
    assert len({tuple(r) for r in cached}) == 3 and all(len(r) == 24 for r in cached)


def test_cached_equals_recompute_sampled(eng):
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, seed=7, stop_tokens=())
    assert eng.generate(PROMPTS, 20, **kw) == eng.generate(PROMPTS, 20, use_cache=False, **kw)


def test_batched_equals_one_by_one_with_seeds(eng):
    seeds = [11, 12, 13]
    batched = eng.generate(PROMPTS, 20, temperature=0.9, seed=seeds, stop_tokens=())
    single = [
        eng.generate(p, 20, temperature=0.9, seed=s, stop_tokens=())
        for p, s in zip(PROMPTS, seeds, strict=True)
    ]
    assert batched == single
    assert eng.generate(PROMPTS, 20, temperature=0.9, seed=11, stop_tokens=()) == batched  # seed+b


def test_seeds_reproduce_and_differ(eng):
    a = eng.generate(PROMPTS[0], 30, seed=3)
    assert a == eng.generate(PROMPTS[0], 30, seed=3)
    assert a != eng.generate(PROMPTS[0], 30, seed=4)


def test_stop_tokens_end_rows_independently(eng):
    ref = eng.generate(PROMPTS, 16, temperature=0, stop_tokens=())
    # a token only row 1 samples: row 1 stops early, rows 0 and 2 go on (slots get compacted)
    stop = next(t for t in ref[1][2:] if t not in ref[0] + ref[2])
    out = eng.generate(PROMPTS, 16, temperature=0, stop_tokens=(stop,))
    assert out[1] == ref[1][: ref[1].index(stop) + 1] and len(out[1]) < 16
    assert out[0] == ref[0] and out[2] == ref[2]


def test_stream_equals_generate(eng):
    streamed = list(eng.stream(PROMPTS[1], 15, temperature=0.8, seed=5))
    assert streamed == eng.generate(PROMPTS[1], 15, temperature=0.8, seed=5)


def test_score_matches_full_forward(eng, tiny_model):
    ids = PROMPTS[1] + eng.generate(PROMPTS[1], 20, seed=0, stop_tokens=())
    got = eng.score(ids)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(torch.tensor([ids]))[0, :-1], -1)
    ref = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got[0] == 0.0 and len(got) == len(ids)
    torch.testing.assert_close(torch.tensor(got[1:]), ref, atol=1e-4, rtol=1e-4)


def test_generation_slides_past_the_context(make_model):
    model = make_model(max_seq_len=32)
    eng = Engine.from_model(model)
    prompt = [V.BOS, V.TASK_CONTINUE, V.part(0), V.program(5), V.velocity(10), V.note_on(0, 60)]
    kw = dict(temperature=1.0, seed=2, stop_tokens=(), keep_len=16)
    out = eng.generate([prompt, prompt[:2]], 100, **kw)  # > 3 slides per row
    assert [len(r) for r in out] == [100, 100]
    assert all(0 <= t < V.size for r in out for t in r)
    # the cache re-encodes exactly the window the reference recomputes
    assert out == eng.generate([prompt, prompt[:2]], 100, use_cache=False, **kw)
    assert len(eng.score(prompt + out[0])) == len(prompt) + 100


def test_slide_context_keeps_header_and_state():
    head = [V.BOS, V.TASK_CONTINUE]
    ctx = head + [V.part(2), V.program(33), V.velocity(9), V.note_on(2, 40)]  # 40 keeps sounding
    ctx += [V.velocity(3), V.note_on(2, 41), V.shift(5), V.note_off(2, 41)]  # 41 ends
    ctx += [V.velocity(4), V.note_on(4, 36), V.shift(7), V.velocity(5), V.note_on(2, 43)]
    ctx += [V.shift(9)]
    state = [V.part(2), V.program(33), V.velocity(9), V.note_on(2, 40)]
    assert slide_context(ctx, V, 12) == head + state + ctx[10:]
    # a cut at ON(2, 41) drops that pair, the state grows (41 sounds there), the cut moves on
    assert slide_context(ctx, V, 11) == head + state + ctx[13:]
    for keep in range(4, len(ctx) + 1):  # every budget: fits, header first, no split pair
        out = slide_context(ctx, V, keep)
        assert len(out) <= keep and out[:2] == head and out[-1] == ctx[-1]
        types = [V.type_of(t) for t in out]
        for i, t in enumerate(types):
            if t is TokenType.NOTE_ON:
                assert types[i - 1] is TokenType.VELOCITY
            if t is TokenType.PROGRAM:
                assert types[i - 1] is TokenType.PART
    # a tight budget keeps the last event and as much state as fits
    out = slide_context(ctx, V, 9)
    assert len(out) <= 9 and out[:2] == head and out[-1] == V.shift(9)
    infill = [V.BOS, V.TASK_INFILL, V.part(0), V.part(3), V.part(0), V.program(0)]
    assert header_len(infill, V) == 4
    with pytest.raises(ValueError, match="keep_len"):
        slide_context(ctx, V, 3)


def test_logits_processor_mask(eng):
    allowed = torch.zeros(V.size, dtype=torch.bool)
    allowed[V.shift_base : V.part_base] = True  # time tokens only
    seen = []

    def processor(tokens, logits):
        seen.append([len(t) for t in tokens])
        return allowed.expand(logits.shape[0], -1)

    out = eng.generate(PROMPTS[:2], 12, seed=0, logits_processor=processor)
    assert all(V.type_of(t) is TokenType.TIME for r in out for t in r)
    assert seen[0] == [2, 7] and seen[1] == [3, 8]


def test_constraint_set_plugs_in(eng):
    from improv.engine.constraint_set import ConstraintSet

    cs = ConstraintSet(V, [], n_rows=1)
    fed = [0]

    def processor(tokens, logits):
        cs.feed(tokens[0][fed[0] :], row=0)
        fed[0] = len(tokens[0])
        return cs.logit_mask(logits.device, logits.dtype)

    prompt = [V.BOS, V.TASK_CONTINUE]
    out = eng.generate(prompt, 40, seed=1, logits_processor=processor)
    assert ConstraintSet(V, [], n_rows=1).check(prompt + out) is None


def test_checkpoint_engine_and_tokenizer(tiny_checkpoint):
    eng = Engine.load(tiny_checkpoint, device="auto")
    assert eng.config.vocab_size == eng.tokenizer.vocab_size == V.size
    assert len(eng.generate(PROMPTS[0], 5, seed=0)) <= 5


def test_sampling_functions():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    g = make_generators(0, 2)
    assert sample(logits_to_probs(logits, temperature=0), g).tolist() == [0, 1]
    assert sample(logits_to_probs(logits, top_k=1), g).tolist() == [0, 1]
    p = logits_to_probs(logits, top_k=2)
    assert (p > 0).sum(-1).tolist() == [2, 2]
    p = logits_to_probs(logits, top_p=0.5)  # row 0: 0.64 >= 0.5 with the first token alone
    assert (p > 0).sum(-1).tolist() == [1, 1]
    p = logits_to_probs(logits, min_p=0.3)  # keep tokens with p >= 0.3 * max
    assert (p > 0)[0].tolist() == [True, True, False, False]
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    per_row = logits_to_probs(logits, temperature=torch.tensor([0.0, 1.0]))
    assert per_row[0].tolist() == [1.0, 0.0, 0.0, 0.0] and (per_row[1] > 0).all()
    draws = torch.stack(
        [sample(logits_to_probs(logits), make_generators(s, 2)) for s in range(2000)]
    )
    freq = (draws[:, 0] == 0).float().mean().item()  # exponential race samples from p
    assert abs(freq - torch.softmax(logits[0], -1)[0].item()) < 0.08


def test_nucleus_equals_the_full_sort():
    """top_p ranks the top NUCLEUS_FIRST_K first and sorts only rows whose nucleus is wider:
    the same probabilities, to the bit, as sorting every row."""

    def full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
        ranked, order = torch.sort(probs, dim=-1, descending=True)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
        return torch.zeros_like(probs).scatter_(-1, order, ranked)

    g = torch.Generator().manual_seed(0)
    wide = 0
    for _ in range(50):
        scale = torch.rand(8, 1, generator=g) * 12  # rows from flat to peaked in one batch
        probs = torch.softmax(torch.randn(8, 1771, generator=g) * scale, -1)
        for top_p in (0.5, 0.95, 0.99):
            assert torch.equal(nucleus(probs, top_p), full_sort(probs, top_p))
            top = torch.topk(probs, NUCLEUS_FIRST_K).values.sum(-1)
            wide += int((top < top_p).sum())
    assert 0 < wide < 50 * 8 * 3  # both paths taken


def test_counter_based_sampling_is_batch_invariant_and_exact():
    torch.manual_seed(0)
    probs = logits_to_probs(torch.randn(5, 300) * 2, top_k=40)  # (5, 300), 260 zeros per row
    seeds, positions = [3, 9, 9, 1, 7], [10, 10, 11, 0, 2**40]
    toks = sample(probs, seeds=seeds, positions=positions)
    assert toks.tolist() == sample(probs, seeds=seeds, positions=positions).tolist()
    for b in range(5):  # a row alone draws what it draws in the batch
        one = sample(probs[b : b + 1], seeds=seeds[b : b + 1], positions=positions[b : b + 1])
        assert one.item() == toks[b].item()
        assert probs[b, toks[b]] > 0
    # Row draws over positions follow p (exponential race: exact sampling from p).
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), -1)
    draws = sample(p.expand(4000, 4), seeds=[5] * 4000, positions=list(range(4000)))
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert (freq - p).abs().max() < 0.03
    assert make_seeds(4, 3) == [4, 5, 6] and make_seeds([1, 2], 2) == [1, 2]
    torch.manual_seed(1)
    a = make_seeds(None, 2)
    torch.manual_seed(1)
    assert make_seeds(None, 2) == a and a[0] != a[1]  # unseeded: from torch's global RNG


def test_a_masked_token_never_wins_the_race(monkeypatch):
    """The noise is finite and > 0 at both ends of its 24 bits (in float32 the top one made
    q = 0: a masked token's 0 / 0 is NaN, which argmax picked, ~1 draw in 10,000 over 1,586
    tokens; a live session then drew the same forbidden note again forever); and a token
    with p = 0 loses the race even where q is 0."""
    q = sampling.exponentials_from_bits(np.array([0, 1, 2**23, 2**24 - 1], dtype=np.uint64))
    assert np.isfinite(q).all() and (q > 0).all()
    probs = logits_to_probs(torch.tensor([[0.0, 1.0, -torch.inf, 0.5]]))  # token 2 masked
    zeros = lambda seeds, positions, n: np.zeros((len(seeds), n), np.float32)  # noqa: E731
    monkeypatch.setattr(sampling, "counter_exponentials", zeros)
    assert sample(probs, seeds=[0], positions=[0]).item() != 2
